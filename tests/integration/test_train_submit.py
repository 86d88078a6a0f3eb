"""`ray start --head` + `ray job submit ... -- python rayjobs/train.py` on 127.0.0.1, in a module of its own:
`ray stop --force` ends every Ray process on the machine, so no other test's Ray session may be alive then
(the module-scoped sessions of the other modules are shut down at their module's end)."""
import os
import subprocess
import sys
from pathlib import Path

from jsonextract.config import core as C
from conftest import ROOT, SNIPS


def test_ray_job_submit_on_local_cluster(tiny_model, tmp_path):
    """`ray start --head` on 127.0.0.1, `ray job submit ... -- python rayjobs/train.py`, adapter generates."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    ray = str(Path(sys.executable).parent / "ray")
    ports = ["--port=6391", "--dashboard-port=8277", "--ray-client-server-port=20011", "--dashboard-agent-listen-port=52377"]
    subprocess.run([ray, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", *ports, "--disable-usage-stats"], check=True, env=env,
                   capture_output=True, timeout=120)
    try:
        out = tmp_path / "adapter"
        cmd = [ray, "job", "submit", "--address", "http://127.0.0.1:8277", "--working-dir", str(ROOT), "--",
               "python", "rayjobs/train.py", "--config", "configs/train/tiny_cpu.yaml", f"model.name={tiny_model}",
               f"data.train_file={SNIPS / 'train.jsonl'}", f"data.dev_file={SNIPS / 'dev.jsonl'}",
               "data.max_train_records=200", "optim.max_steps=2", "optim.batch_size=4", "eval.decode_samples=2",
               "eval.loss_examples=16", "eval.calibration_records=0", "decoding.max_new_tokens=16",
               f"run.storage_path={tmp_path / 'runs'}", f"run.output_dir={out}", "run.name=job"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout.lower()
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    from jsonextract.models.inference import load_for_inference
    lm = load_for_inference(C.ModelConfig(), str(out))
    ids = lm.tokenizer("play jazz", return_tensors="pt")
    assert lm.model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
