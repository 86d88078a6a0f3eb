"""What every job entry point shares: `--config FILE key=value ...` parsing and clean error exits."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

import __main__
from jsonextract.config.core import load, split_cli
from jsonextract.errors import UserError

T = TypeVar("T")



def parse(cls: type[T], argv: list[str] | None = None) -> T:
    """The job's config from `[--config FILE] [key=value ...]`; `--help` lists every setting and exits."""
    doc = (getattr(__main__, "__doc__", None) or "").strip()
    usage = doc or f"usage: {sys.argv[0]} [--config FILE] [key=value ...]"
    path, overrides = split_cli(sys.argv[1:] if argv is None else argv, cls, usage)
    return load(cls, path, overrides)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a job's main(): a UserError is one line on stderr and exit 2; any other exception keeps its traceback."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
