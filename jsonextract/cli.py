"""What every job entry point shares: `--config FILE key=value ...` parsing and clean error exits."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from .config import ConfigError, load, split_cli

T = TypeVar("T")

# Errors that are the user's input, not a bug: printed as one line, exit code 2, no stack trace.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def parse(cls: type[T], argv: list[str] | None = None) -> T:
    path, overrides = split_cli(sys.argv[1:] if argv is None else argv)
    return load(cls, path, overrides)


def run_main(main: Callable[[], int | None]) -> None:
    from .model import ModelLoadError

    try:
        code = main()
    except (*USER_ERRORS, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
