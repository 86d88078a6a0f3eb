"""The `jsonextract` command: one subcommand per job, each with `--help` listing its settings.

    jsonextract train    --config configs/train/snips_cpu.yaml [key=value ...]
    jsonextract extract  --config configs/extract/cpu.yaml input=DATA output=OUT [adapter=DIR]
    jsonextract evaluate predictions=OUT gold=GOLD.jsonl
    jsonextract run      --config configs/pipeline/snips.yaml      (the main job: every step above, then a report)
    jsonextract serve    configs/serve/cpu.yaml                    (Ray Serve: `serve run` on that file)
    jsonextract predict  --adapter DIR --data FILE.jsonl --out preds.jsonl   (one process, no Ray)
    jsonextract view     OUT --input DATA.jsonl --out review.html
    jsonextract prepare-base [--out DIR]                           (the embedded SmolLM2-135M-Instruct base)
    jsonextract prepare-tiny --data data/snips --out DIR           (the tiny random model the tests use)

`--verbose` before the subcommand keeps the libraries' own progress bars and warnings. A problem in what you
gave (a config key, a path, a record) is one line on stderr and exit status 2; anything else keeps its traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

from jsonextract.errors import UserError
from jsonextract.logs import quiet_libraries

# subcommand -> (module with `main(argv) -> int`, one line for the command list). Imported only when chosen, so
# `jsonextract --help` and each job's `--help` load no model library.
COMMANDS = {
    "train": ("jsonextract.training.job", "fine-tune a causal LM with LoRA/QLoRA under Ray Train (FSDP2)"),
    "extract": ("jsonextract.batch.job", "extract JSON from a corpus with Ray Data, one result row per input row"),
    "evaluate": ("jsonextract.evaluation.job", "score predictions against gold records"),
    "run": ("jsonextract.pipeline", "the main job: base model -> fine-tune -> extract -> evaluate -> report"),
    "serve": ("jsonextract.serving", "run the Ray Serve application described by a config file"),
    "predict": ("jsonextract.decoding.predict", "extract from a JSONL file in this process, without Ray"),
    "view": ("jsonextract.evaluation.view", "an HTML page to review a batch job's extractions"),
    "prepare-base": ("jsonextract.models.base", "convert the embedded SmolLM2-135M-Instruct base (offline)"),
    "prepare-tiny": ("jsonextract.models.tiny", "build the tiny random test model for a data set (offline)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: jsonextract [--verbose] COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return "\n".join(lines + ["", (__doc__ or "").split("\n\n", 1)[1].strip()])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--verbose"]:
        os.environ["JSONEXTRACT_VERBOSE"] = "1"  # read by jsonextract.logs in this process and the ones it starts
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    quiet_libraries()  # before any library loads; inherited by the processes the command starts
    run_main(lambda: importlib.import_module(COMMANDS[args[0]][0]).main(args[1:]))


def run_main(main) -> None:
    """Run a command: a UserError is one line on stderr and exit 2; any other exception keeps its traceback."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
