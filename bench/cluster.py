"""The cluster path on one machine: what several Ray nodes and a lost node cost. A local cluster
(`ray.cluster_utils.Cluster`: a head with no CPUs for the drivers, worker nodes with their own raylet and object
store, all sharing this machine's cores), the jobs submitted to it the way `ray job submit` runs them (RAY_ADDRESS).

- Training, the same steps twice: 2 FSDP2 workers on one 2-CPU node (PACK), then on two 1-CPU nodes
  (STRICT_SPREAD, gloo between the nodes). Training tokens/s from the run's history.
- Batch extraction, the same rows twice on two 2-CPU nodes, one replica each: undisturbed, then with one node
  removed when the first results are written and a fresh node added. Rows/s from the job's `_summary.json`, and
  whether every row came out once.

    .venv/bin/python bench/cluster.py              # the embedded SmolLM2 base (QLoRA config of the main job)
    .venv/bin/python bench/cluster.py --quick      # the tiny random model, a few steps (the tests)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results
from ray.cluster_utils import Cluster

from jsonextract.data.io import read_results, result_files

ROOT = Path(__file__).resolve().parents[1]
SNIPS = ROOT / "data" / "snips"
JSONEXTRACT = str(Path(sys.executable).with_name("jsonextract"))


def measure() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 6 steps, 96 rows (the tests)")
    ap.add_argument("--steps", type=int, default=16, help="training steps per arrangement")
    ap.add_argument("--rows", type=int, default=600, help="rows per batch run")
    args = ap.parse_args()
    steps, rows = (6, 96) if args.quick else (args.steps, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.quick:
            subprocess.run([JSONEXTRACT, "prepare-tiny", "--data", str(SNIPS), "--out", str(tmp / "model")],
                           check=True, capture_output=True)
            model, train_cfg, label = str(tmp / "model"), "configs/train/tiny_cpu.yaml", "the tiny random model"
        else:
            model = subprocess.run([JSONEXTRACT, "prepare-base"], check=True, capture_output=True,
                                   text=True).stdout.strip().splitlines()[-1]
            train_cfg, label = "configs/train/snips_cpu.yaml", "SmolLM2-135M-Instruct (NF4) + LoRA"
        print(f"\n{label}; {os.cpu_count()} cores shared by every node of the local cluster\n")
        print("| job | arrangement | figure |")
        print("|---|---|---|")
        train = {}
        for name, nodes, cpus, placement in (("one node", 1, 2, "PACK"), ("two nodes", 2, 1, "STRICT_SPREAD")):
            train[name] = train_tokens_per_s(tmp / name, model, train_cfg, steps, nodes, cpus, placement)
            print(f"| training, {steps} steps, 2 workers | {name} ({nodes} x {cpus} CPU, {placement}) | "
                  f"{train[name]:.0f} tokens/s |")
        batch = {}
        for lose in (False, True):
            name = "a node lost and replaced mid-job" if lose else "undisturbed"
            batch[name], complete = batch_rows_per_s(tmp / f"batch-{lose}", model, rows, lose)
            print(f"| batch, {rows} rows, 2 replicas on 2 nodes | {name} | {batch[name]:.1f} rows/s, "
                  f"{'every row once' if complete else 'ROWS MISSING OR TWICE'} |")
    print(f"\ntraining two nodes / one node tokens/s = {train['two nodes'] / train['one node']:.2f}")
    print(f"batch with a node lost / undisturbed rows/s = "
          f"{batch['a node lost and replaced mid-job'] / batch['undisturbed']:.2f}")
    return 0


def start_cluster(nodes: int, cpus: int):
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=cpus) for _ in range(nodes)]
    c.wait_for_nodes()
    return c, workers


def env_for(c) -> dict:
    return dict(os.environ, RAY_ADDRESS=c.address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                TOKENIZERS_PARALLELISM="false")


def train_tokens_per_s(tmp: Path, model: str, config: str, steps: int, nodes: int, cpus: int,
                       placement: str) -> float:
    """Mean training tokens/s over the logged intervals after the first (which holds the warm-up)."""
    c, _ = start_cluster(nodes, cpus)
    try:
        out = tmp / "adapter"
        cmd = [JSONEXTRACT, "train", "--config", config, f"model.name={model}", "data.max_train_records=2000",
               f"data.cache_dir={tmp / 'cache'}", f"run.storage_path={tmp / 'runs'}", f"run.output_dir={out}",
               "run.name=bench", f"run.placement_strategy={placement}", f"optim.max_steps={steps}",
               "optim.warmup_steps=1", "run.log_every_steps=2", "run.checkpoint_every_steps=0", "eval.every_steps=0",
               "eval.decode_samples=0", "eval.calibration_records=0", "eval.loss_examples=8"]
        r = subprocess.run(cmd, cwd=ROOT, env=env_for(c), capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise SystemExit(f"training failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        history = json.loads((out / "history.json").read_text())
        groups = [h["workers"] for h in history if h.get("event") == "workers"]
        if len({w["node"] for w in groups[-1]}) != nodes:
            raise SystemExit(f"workers not on {nodes} node(s): {groups[-1]}")
        rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h][1:]
        return sum(rates) / len(rates)
    finally:
        c.shutdown()


def batch_rows_per_s(tmp: Path, model: str, n: int, lose_a_node: bool) -> tuple[float, bool]:
    """The job's rows/s (its _summary.json), and whether every input id came out exactly once."""
    lines = (SNIPS / "test.jsonl").read_text().splitlines()
    tmp.mkdir(parents=True)
    inp, out = tmp / "in.jsonl", tmp / "out"
    inp.write_text("".join(json.dumps(json.loads(lines[i % len(lines)]) | {"id": f"row-{i}"}) + "\n"
                           for i in range(n)))
    c, workers = start_cluster(2, 2)
    try:
        cmd = [JSONEXTRACT, "extract", "--config", "configs/extract/cpu.yaml", "adapter=", f"model.name={model}",
               f"schema={SNIPS / 'schema.json'}", f"input={inp}", f"output={out}", "decoding.max_new_tokens=48",
               "pool.num_actors=2", "pool.cpus_per_actor=1", f"pool.batch_rows={max(n // 12, 8)}", "table_fields=0"]
        log = tmp / "log"
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(c), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        if lose_a_node:
            deadline = time.time() + 900
            while not (out.is_dir() and result_files(str(out))):
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"no results before the job ended or in 900 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.25)
            c.remove_node(workers[1], allow_graceful=False)
            c.add_node(num_cpus=2)
        if proc.wait(timeout=1800) != 0:
            raise SystemExit(f"batch job failed:\n{log.read_text()[-3000:]}")
        summary = json.loads((out / "_summary.json").read_text())
        ids = [r["id"] for r in read_results(str(out), ["id"])]
        return summary["rows_per_s"], len(ids) == n and len(set(ids)) == n
    finally:
        c.shutdown()


if __name__ == "__main__":
    sys.exit(results.main("cluster", measure))
