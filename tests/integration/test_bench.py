"""Every benchmark's quick mode runs, so the benchmarks never rot (the figures themselves live in the README)."""
import os
import subprocess
import sys


from conftest import ROOT


def run_bench(name: str, timeout: int = 900) -> str:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--quick"], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_train_bench_quick():
    import re
    out = run_bench("train.py")
    assert "| op time: vocabulary head + loss |" in out and "| padding share of positions computed |" in out
    assert "| previous job (plain shuffle, SDPA, model logits, peft layers), 2 workers x 1 CPU, FSDP2 |" in out
    assert "| part | previous job's settings | defaults with peft's LoRA layers | defaults |" in out
    assert "| the main job's settings (configs/train/snips_cpu.yaml), 2 workers x 1 CPU, FSDP2 |" in out
    assert "| the main job's settings, 1 worker x 2 CPUs (unsharded) |" in out
    pads = re.search(r"\| padding share of positions computed \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+)% \|", out)
    assert pads and float(pads[3]) < float(pads[1])  # length-grouped steps pad less than a plain shuffle
    assert re.search(r"^speedup: training job tokens/s vs the previous job on the same machine = \d+\.\d\dx$", out,
                     re.M), out[-800:]


def test_extract_bench_quick():
    import re
    from jsonextract.config.core import load
    from jsonextract.config.extract import ExtractConfig
    job_batch = load(ExtractConfig, ROOT / "configs/extract/cpu.yaml", []).decoding.batch_size  # the bench's JOB_BATCH
    out = run_bench("extract.py")
    assert "| generate(), step by step" in out and "| Ray Data job, defaults |" in out and "roofline:" in out
    assert "constrained / unconstrained" in out
    rows = {l.split(" | ")[0][2:]: l for l in out.splitlines() if l.startswith("| ")}
    defaults = ["+ dequantized weights, adapter merged (defaults)",
                "defaults without prompt length groups (one prompt pass)", f"defaults, batch {job_batch} (the job's)"]
    fp32 = "defaults in fp32 weights (model.inference_dtype=float32)"
    # bf16 products measured faster on this CPU: the defaults run in bf16, which rounds other than fp32
    if "inference dtype on this CPU: bfloat16" in out:
        assert all(v in rows for v in defaults) and "| Ray Data job, " + fp32 + " |" in out
        assert f"defaults with the whole model cast to bf16 (residual stream and cache too), batch {job_batch}" in rows
        defaults = [fp32, f"{fp32}, batch {job_batch}"]
    for variant in ["+ jump-forward", "+ shared prefix", *defaults]:
        assert "| 16/16 |" in rows[variant], rows[variant]  # the same outputs as step-by-step decoding (fp32)
    assert re.search(r"^speedup: job rows/s vs step-by-step decoding on the same base = \d+\.\d\dx; "
                     r"field F1 delta = [+-]\d+\.\d\d$", out, re.M), out[-800:]


def test_serve_bench_quick():
    out = run_bench("serving.py")
    assert "| batched (max_batch_size 32) | 32 |" in out and "| unbatched (max_batch_size 1) | 32 |" in out
    assert "batched / unbatched" in out and "defaults / previous decoding path requests/s" in out


def test_adapt_bench_quick():
    out = run_bench("adapt.py")
    assert "| qlora |" in out and "| lora |" in out and "| full |" in out and "QLoRA / full-weight dev loss" in out


def test_load_bench_quick():
    """Mixed valid/invalid load, steady and with the Model replica killed: the bench itself fails (exit 1) on any
    5xx other than a clean 503, a hung request, or an invalid request answered with anything but a 4xx."""
    out = run_bench("load.py")
    assert "| replica killed |" in out and "faults: none" in out


def test_grounding_bench_quick():
    out = run_bench("grounding.py")
    assert "| off |" in out and "| annotate |" in out and "annotate / off time" in out


def test_cluster_bench_quick():
    import re
    out = run_bench("cluster.py")
    assert "| training, 6 steps, 2 workers | two nodes (2 x 1 CPU, STRICT_SPREAD) |" in out
    assert out.count("every row once") == 2 and "MISSING" not in out  # a lost node loses no row
    assert re.search(r"^training two nodes / one node tokens/s = \d+\.\d\d$", out, re.M), out[-800:]
    assert re.search(r"^batch with a node lost / undisturbed rows/s = \d+\.\d\d$", out, re.M), out[-800:]
