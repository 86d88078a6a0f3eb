"""The quick variant of the main job on the real SmolLM2 base, end to end: base -> fine-tune (Ray Train, 2 workers,
FSDP2, QLoRA, 12 steps) -> Ray Data extraction of a dev slice -> evaluate -> report. The fine-tuned adapter must
clearly beat the zero-shot base on the same records, and the log is quiet and useful: a few lines per step, the
training progress with an ETA, none of the libraries' noise."""
import json
import os
import subprocess
import warnings

from conftest import JSONEXTRACT, ROOT


def test_quick_pipeline_learns_and_reports(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([JSONEXTRACT, "run", "--config", "configs/pipeline/quick.yaml",
                        f"out={tmp_path}", f"adapter_dir={tmp_path / 'adapter'}",
                        f"runs_dir={tmp_path / 'runs'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (r.stdout + r.stderr).splitlines()
    noise = ["LOAD_GLOBAL", "RETURN_VALUE", "kernels-community", "Loading weights", "Saving the dataset",
             "Reporting training result", "streaming_executor", "Started a local Ray instance", "Converting"]
    if any("A worker died" in line for line in log):
        # A training worker process died (once in CI: a heap-corruption abort inside a native library) and Ray
        # Train restarted the group (run.max_failures): Ray's report of it and the repeated steps are a log that
        # should be read, so only the libraries' noise is checked then. The job must still have succeeded.
        warnings.warn("a training worker died and the run was restarted; log length not checked")
        assert sum("[train rank0] step 12/12" in line for line in log) >= 2
    else:
        assert len(log) <= 80, "\n".join(log)
        noise.append("Traceback")
    for text in noise:
        assert not [line for line in log if text in line], text
    assert any("[train rank0] step 12/12" in line and "ETA" in line for line in log)
    assert sum(line.startswith("== ") for line in log) >= 5  # one header per step
    run = tmp_path / "quick"
    metrics = json.loads((run / "metrics.json").read_text())
    both = json.loads((run / "baseline_metrics.json").read_text())
    zero_shot, tuned = both["zero-shot base"], both["fine-tuned"]
    assert metrics["n"] == 40 and zero_shot["n"] == 20 and tuned["n"] == 20
    assert metrics["schema_valid_rate"] >= 0.9
    assert tuned["f1"] >= zero_shot["f1"] + 0.10, (tuned["f1"], zero_shot["f1"])
    # the quick config extracts with grounding=snap, as the main jobs do: every free-text value left is in the
    # text (snapped to it or removed), and the counts of what the policy changed reach the metrics
    grounding = metrics["grounding"]
    assert grounding["grounded_share"] in (1.0, None) and grounding["snapped"] >= 0 and grounding["dropped"] >= 0
    report = (run / "report.md").read_text()
    assert "## Test metrics" in report and "loss.png" in report and "**Wrong**" in report
    assert "## Zero-shot base vs fine-tuned" in report
    assert (run / "loss.png").stat().st_size > 1000 and (run / "dev_f1.png").is_file()
    # the confidence temperature was fitted on dev after training, and the report compares before and after
    cal = json.loads((tmp_path / "adapter" / "manifest.json").read_text())["calibration"]
    assert cal["records"] > 0 and cal["values"] > 0 and cal["dev_value_nll"] <= cal["dev_value_nll_at_1"]
    if cal["temperature"] != 1.0:
        assert "Confidence before and after the adapter's temperature" in report
