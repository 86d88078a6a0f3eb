"""Nothing lost when the driver itself dies: `kill -9` on the batch job's and the training job's driver part way
through, then the same command again. (Their own module: each job starts its own Ray in a subprocess, so no
in-process Ray may be running.)"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import JSONEXTRACT, ROOT, SNAPSHOT, SNIPS, registered_checkpoint

ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # a session of its own: the driver and the local Ray it starts can be killed together afterwards
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, log: Path, limit_s: float = 600) -> None:
    """SIGKILL the driver as soon as `ready()` holds, then everything else of its session (the local Ray)."""
    deadline = time.time() + limit_s
    while not ready():
        assert proc.poll() is None, f"job ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"kill point not reached in {limit_s:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=ENV, capture_output=True,
                   timeout=120)


def temporary_folders() -> set[str]:
    """The training job's temporary checkpoint folders in the temporary directory."""
    return {p.name for p in Path(tempfile.gettempdir()).iterdir()
            if p.name.startswith(("ckpt-", "resume-", "final-checkpoint-", "adapter-"))}


def test_batch_driver_killed_half_way_then_rerun_outputs_every_row_once(tiny_model, tmp_path):
    from jsonextract.data.io import read_results, result_files

    lines = (SNIPS / "test.jsonl").read_text().splitlines()
    rows = [json.loads(lines[i % len(lines)]) | {"id": f"row-{i}"} for i in range(2000)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [JSONEXTRACT, "extract", "--config", "configs/extract/cpu.yaml", "adapter=",
           f"model.name={tiny_model}", f"schema={SNIPS / 'schema.json'}", f"input={inp}", f"output={out}",
           "decoding.max_new_tokens=8", "pool.batch_rows=50", "output_format=jsonl"]
    log = tmp_path / "first.log"
    proc = start(cmd, log)
    kill_when(proc, lambda: out.is_dir() and len(result_files(str(out))) >= 2, log)
    written = len(read_results(str(out))) if result_files(str(out)) else 0
    assert written < 2000, "the first run finished before it was killed: nothing was tested"

    second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    ids = [r["id"] for r in read_results(str(out))]
    assert len(ids) == 2000 and set(ids) == {r["id"] for r in rows}  # every id exactly once
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_skipped_already_done"] > 0  # the second run resumed, it did not start over


def test_training_driver_killed_after_a_checkpoint_then_rerun_resumes(tiny_model, tmp_path):
    storage = tmp_path / "runs"
    cmd = [JSONEXTRACT, "train", "--config", "configs/train/tiny_cpu.yaml", f"model.name={tiny_model}",
           "optim.max_steps=16", "run.checkpoint_every_steps=2", "eval.every_steps=0", "eval.decode_samples=0",
           "eval.calibration_records=0",
           "run.name=killed", f"run.storage_path={storage}", f"run.output_dir={tmp_path / 'adapter'}",
           f"data.cache_dir={tmp_path / 'cache'}", "data.max_train_records=400"]
    log = tmp_path / "first.log"
    proc = start(cmd, log)
    kill_when(proc, lambda: registered_checkpoint((storage / "killed" / SNAPSHOT).read_text), log)

    before = temporary_folders()
    second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # the checkpoints written, the one resumed from and the final one were temporary local copies: none is left
    assert temporary_folders() <= before, temporary_folders() - before
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    history = json.loads((tmp_path / "adapter" / "history.json").read_text())
    resumed = [h["step"] for h in history if h.get("event") == "resume"]
    assert manifest["step"] == 16 and len(resumed) == 1 and 2 <= resumed[0] < 16, (resumed, second.stdout[-2000:])
    steps = [h["step"] for h in history if "loss" in h]
    assert steps[-1] == 16 and len(set(steps)) == len(steps)  # no step trained twice after the resume
