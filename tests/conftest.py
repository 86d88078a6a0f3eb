"""Shared fixtures: the real data sets, a tiny model built once per session, and one local Ray per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SNIPS = DATA / "snips"
R8K = DATA / "restaurant8k"
JSONEXTRACT = str(Path(sys.executable).with_name("jsonextract"))  # the installed command

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # each ray.train.report otherwise blocks ~1.3 s


def has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """tests/unit (no Ray: `bash scripts/test.sh -m unit`, under two minutes) and tests/integration (real Ray
    jobs, Serve, a browser) by folder; GPU tests skip without a GPU."""
    gpu = has_gpu()
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        item.add_marker("unit" if "unit" in item.path.parent.name else "integration")
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def snips_schema():
    from jsonextract.data.schema import load_schema
    return load_schema(SNIPS / "schema.json")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tiny Llama + BPE tokenizer built from SNIPS train (the same command a user runs)."""
    from jsonextract.config import core as C
    from jsonextract.models.tiny import build

    out = tmp_path_factory.mktemp("tiny") / "model"
    return build(SNIPS, out, C.TinyModelConfig(hidden_size=128, intermediate_size=256, num_layers=2,
                                               num_heads=2, num_kv_heads=2, vocab_size=1024))


@pytest.fixture(scope="module")
def ray_session(request):
    """One local Ray per test module (the job-submission test runs its own `ray start` cluster instead);
    shut down at the end so no workers are orphaned. A module may ask for more logical CPUs (RAY_CPUS) when it
    runs more actors side by side than two would schedule."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
