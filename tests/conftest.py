"""Shared fixtures: the real data sets, a tiny model built once per session, and one local Ray per session."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SNIPS = DATA / "snips"
R8K = DATA / "restaurant8k"
JSONEXTRACT = str(Path(sys.executable).with_name("jsonextract"))  # the installed command

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(scope="session", autouse=True)
def adapter_copies(tmp_path_factory):
    """Copies of object-store folders go to this session's temporary folder, not the user's cache: set before
    any Ray node or job starts, so every process the tests start inherits it."""
    os.environ["JSONEXTRACT_COPIES"] = str(tmp_path_factory.mktemp("copies"))


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


def train_adapter(base, out, data, name, tmp):
    """A few steps of the real training job (one process, no Ray) on a data set: the adapter and its manifest
    (schema, prompt) are what `jsonextract train` writes."""
    from jsonextract.config import core as C
    from jsonextract.config.train import TrainConfig
    from jsonextract.training import job as train_job

    over = [f"model.name={base}", "model.max_length=256", f"data.train_file={data / 'train.jsonl'}",
            "data.dev_file=", "data.max_train_records=64", "optim.batch_size=8", "optim.max_steps=3",
            "optim.warmup_steps=1", "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]",
            "eval.decode_samples=0", "run.use_ray=false", f"run.name={name}", f"run.storage_path={tmp / 'runs'}",
            f"data.cache_dir={tmp / 'cache'}", "run.checkpoint_every_steps=0"]
    cfg = train_job.absolute_paths(C.load(TrainConfig, None, over))
    train_job.fit_to(cfg, out)


BUCKET = "jsonextract-test"


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints, in its storage folder


def registered_checkpoint(read_snapshot: Callable[[], str]) -> bool:
    """Whether Ray Train would resume from a checkpoint now: it resumes from the checkpoints its snapshot lists, and
    lists one only after the upload and after its controller has taken in the report, which can be seconds after
    the folder with its manifest is written. Losing the driver or a worker's node before then leaves nothing to
    resume from, and the run starts over."""
    try:
        snapshot = json.loads(read_snapshot())
    except (OSError, json.JSONDecodeError):  # not written yet, or caught half written
        return False
    return bool((snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))


def put(fs, path: str, data: bytes) -> None:
    """Write `data` to `path` in the test bucket."""
    with fs.open_output_stream(f"{BUCKET}/{path}") as f:
        f.write(data)


@pytest.fixture(scope="module")
def s3():
    """{env: the variables a job needs, fs: a pyarrow filesystem on the bucket}; the server stops at the end."""
    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process's pyarrow reads the bucket the same way the job does
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/")
        yield {"env": env, "fs": fs}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


_session: pytest.Session | None = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process here, with pytest's exit status, once every report is written: the interpreter's own
    teardown of native libraries the tests loaded in-process (Ray's core worker, the AWS SDK under pyarrow's S3
    filesystem, torch's thread pools) segfaulted once in CI after all tests had passed, which failed the run."""
    if _session is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(_session.exitstatus))
