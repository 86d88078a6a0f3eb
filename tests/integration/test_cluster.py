"""The cluster path on one machine: a Ray cluster of three nodes (`ray.cluster_utils.Cluster`: a head with no CPUs
for the drivers, two worker nodes of 2 CPUs each, every node its own raylet and object store) and an S3-compatible
bucket (moto's server on 127.0.0.1). The jobs connect the way `ray job submit` runs them on a real cluster
(RAY_ADDRESS) and reach the bucket through the standard AWS variables, which only the drivers have (the nodes
start without them); a worker node is removed while they run (its raylet and every process on it killed), then a
fresh one added.

Own module: the cluster is the only Ray on the machine while these tests run."""
import collections
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import BUCKET, JSONEXTRACT, ROOT, SNAPSHOT, SNIPS, put, registered_checkpoint, train_adapter

PORT = 8016


@contextlib.contextmanager
def bare_env():
    """Nodes start without the bucket's variables, as a real cluster's nodes do (their environment is their own,
    not the driver's): the jobs must pass them on to the processes they start."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    try:
        yield
    finally:
        os.environ.update(saved)


@pytest.fixture
def cluster():
    """A head (0 CPUs: drivers and their helpers only) and two 2-CPU worker nodes; all stopped after."""
    from ray.cluster_utils import Cluster

    # `head`: a custom resource a deployment can ask for to stay on the head (the Serve ingress, in its test)
    with bare_env():
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"head": 1},
                                                          "include_dashboard": True, "dashboard_host": "127.0.0.1"})
        workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        c.shutdown()


def job_env(c, s3) -> dict:
    return dict(os.environ, RAY_ADDRESS=c.address, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                TOKENIZERS_PARALLELISM="false", **s3["env"])


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def wait_until(ready, proc: subprocess.Popen, log: Path, what: str, limit_s: float = 300) -> None:
    deadline = time.time() + limit_s
    while not ready():
        assert proc.poll() is None, f"job ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{what} not seen in {limit_s:g} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.25)


def replace_node(c, node) -> object:
    """Remove a worker node abruptly (no graceful drain: its raylet and workers are killed, as when a machine
    dies), then add a fresh 2-CPU node so the job can get its resources back."""
    c.remove_node(node, allow_graceful=False)
    with bare_env():
        return c.add_node(num_cpus=2)


def test_training_on_two_nodes_from_the_bucket_survives_losing_a_node(cluster, s3, tiny_model, tmp_path):
    """Two FSDP2 workers on two nodes (STRICT_SPREAD: never both on one), data and checkpoints in the bucket, the
    token cache built by one worker per node at most; one worker's node removed after the first checkpoint: Ray
    Train restarts the group on the surviving node and a fresh one, the run resumes from the bucket's checkpoint
    and ends at the last step."""
    c, (node_a, node_b) = cluster
    lines = (SNIPS / "train.jsonl").read_text().splitlines()[:400]
    put(s3["fs"], "cluster/train.jsonl", ("\n".join(lines) + "\n").encode())
    put(s3["fs"], "cluster/dev.jsonl", (SNIPS / "dev.jsonl").read_bytes()[:20000].rsplit(b"\n", 1)[0] + b"\n")
    put(s3["fs"], "cluster/schema.json", (SNIPS / "schema.json").read_bytes())
    storage, out = f"s3://{BUCKET}/cluster/runs", f"s3://{BUCKET}/cluster/adapter"
    cmd = [JSONEXTRACT, "train", "--config", "configs/train/tiny_cpu.yaml", f"model.name={tiny_model}",
           f"data.train_file=s3://{BUCKET}/cluster/train.jsonl", f"data.dev_file=s3://{BUCKET}/cluster/dev.jsonl",
           f"data.schema_file=s3://{BUCKET}/cluster/schema.json", f"data.cache_dir={tmp_path / 'cache'}",
           "run.name=nodes", f"run.storage_path={storage}", f"run.output_dir={out}",
           "run.placement_strategy=STRICT_SPREAD",
           "optim.max_steps=30", "optim.batch_size=8", "run.checkpoint_every_steps=4", "eval.every_steps=0",
           "eval.decode_samples=0", "eval.calibration_records=0", "eval.loss_examples=16", "run.log_every_steps=2"]
    log = tmp_path / "train.log"
    proc = start(cmd, job_env(c, s3), log)

    def read_snapshot() -> str:
        with s3["fs"].open_input_stream(f"{BUCKET}/cluster/runs/nodes/{SNAPSHOT}") as f:
            return f.read().decode()

    wait_until(lambda: registered_checkpoint(read_snapshot), proc, log, "the first checkpoint registered")
    fresh = replace_node(c, node_b)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]

    with s3["fs"].open_input_stream(f"{BUCKET}/cluster/adapter/history.json") as f:
        history = json.loads(f.read())
    with s3["fs"].open_input_stream(f"{BUCKET}/cluster/adapter/manifest.json") as f:
        manifest = json.loads(f.read())
    groups = [h["workers"] for h in history if h.get("event") == "workers"]
    first, last = groups[0], groups[-1]
    assert {w["node"] for w in first} == {node_a.node_id, node_b.node_id}  # one worker on each node
    assert {w["node"] for w in last} == {node_a.node_id, fresh.node_id}, (last, log.read_text()[-3000:])
    for group in groups:  # at most one worker per node tokenised; the others read its cache
        per_node = {}
        for w in group:
            per_node[w["node"]] = per_node.get(w["node"], 0) + w["tokenised"]
        assert max(per_node.values()) <= 1
    resumed = [h["step"] for h in history if h.get("event") == "resume"]
    assert manifest["step"] == 30 and len(resumed) == 1 and 4 <= resumed[0] < 30, (resumed, log.read_text()[-3000:])
    steps = [h["step"] for h in history if "loss" in h]
    assert steps[-1] == 30 and len(set(steps)) == len(steps)  # no step trained twice after the resume
    assert "world size 2 on cpu, 2 nodes" in log.read_text()


def test_batch_job_on_two_nodes_survives_losing_a_node(cluster, s3, tiny_model, tmp_path):
    """Input and output in the bucket, one replica on each node; one node removed mid-job and a fresh one added:
    every input id comes out exactly once and the summary accounts for every row."""
    from jsonextract.data.io import read_results, result_files

    c, (node_a, node_b) = cluster
    lines = (SNIPS / "test.jsonl").read_text().splitlines()
    rows = [json.loads(lines[i % len(lines)]) | {"id": f"row-{i}"} for i in range(1500)]
    put(s3["fs"], "batch/in/a.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:750]).encode())
    put(s3["fs"], "batch/in/b.jsonl", "".join(json.dumps(r) + "\n" for r in rows[750:]).encode())
    out = f"s3://{BUCKET}/batch/out"
    cmd = [JSONEXTRACT, "extract", "--config", "configs/extract/cpu.yaml", "adapter=", f"model.name={tiny_model}",
           f"schema={SNIPS / 'schema.json'}", f"input=s3://{BUCKET}/batch/in/*.jsonl", f"output={out}",
           "decoding.max_new_tokens=8", "pool.batch_rows=50", "pool.num_actors=2", "pool.cpus_per_actor=1"]
    log = tmp_path / "extract.log"
    proc = start(cmd, job_env(c, s3), log)
    wait_until(lambda: len(result_files(out)) >= 2, proc, log, "the first result files")
    assert set(replica_nodes(c, "ExtractActor")) == {node_a.node_id, node_b.node_id}  # one replica per node
    written_before = len(read_results(out, ["id"]))
    replace_node(c, node_b)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert written_before < 1500, "the job finished before the node was removed: nothing was tested"

    ids = [r["id"] for r in read_results(out, ["id"])]
    assert len(ids) == 1500 and set(ids) == {r["id"] for r in rows}  # every id exactly once
    with s3["fs"].open_input_stream(f"{BUCKET}/batch/out/_summary.json") as f:
        summary = json.loads(f.read())
    assert summary["rows_in"] == 1500 and summary["rows_written"] == 1500
    assert summary["valid"] + sum(summary["errors_by_reason"].values()) == 1500


def replica_nodes(c, name: str) -> list[str]:
    """The node of each live actor whose class name contains `name` (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(address=c.address, filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.node_id for a in actors if name in a.class_name]


def model_replica_nodes(c) -> list[str]:
    return replica_nodes(c, "ServeReplica:jsonextract:Model")


def test_serve_from_the_bucket_on_two_nodes_answers_through_losing_a_node(cluster, s3, tiny_model, tmp_path):
    """The adapter registry in the bucket (listed and loaded from it by name), two Model replicas on two nodes, the
    ingress on the head; one replica's node removed while requests flow: every answer is a 200 or a 503 with
    Retry-After, and once Serve has replaced the replica, all are 200 again."""
    from jsonextract.data.io import put_folder

    c, (_, node_b) = cluster
    train_adapter(tiny_model, tmp_path / "snips", SNIPS, "snips", tmp_path)
    put_folder(tmp_path / "snips", f"s3://{BUCKET}/registry/snips")
    spec = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": PORT},
            # The bucket's variables reach the replicas on other nodes through the application's runtime_env.
            "applications": [{"name": "jsonextract", "route_prefix": "/", "import_path": "serve.app:build_app",
                              "runtime_env": {"env_vars": s3["env"]},
                              "args": {"adapters": f"s3://{BUCKET}/registry", "default_adapter": "snips",
                                       "decoding": {"max_new_tokens": 24}},
                              "deployments": [
                                  {"name": "Model", "num_replicas": 2, "ray_actor_options": {"num_cpus": 1}},
                                  {"name": "Api", "num_replicas": 1,
                                   "ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.01}}}]}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = job_env(c, s3) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([JSONEXTRACT, "serve", str(path)], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{PORT}"
    texts = [json.loads(line)["text"] for line in (SNIPS / "test.jsonl").read_text().splitlines()[:50]]
    try:
        def up() -> bool:
            try:
                return (requests.get(f"{url}/healthz", timeout=5).status_code == 200
                        and len(set(model_replica_nodes(c))) == 2)
            except requests.RequestException:  # not listening yet, or the ingress still starting (a timeout)
                return False
        wait_until(up, proc, log, "Serve with a Model replica on each node", limit_s=240)
        assert requests.get(f"{url}/adapters", timeout=30).json()["adapters"] == ["snips"]  # listed from the bucket
        for name in ("../registry/snips", "s3://elsewhere/x", "no-such"):  # names only: never a path
            r = requests.post(f"{url}/extract", json={"text": "play jazz", "adapter": name}, timeout=60)
            assert r.status_code in (400, 404), (name, r.status_code, r.text)

        answers: list[tuple[float, int, str | None]] = []  # (time, status, Retry-After)
        stop = threading.Event()

        def client(k: int) -> None:
            for i in range(k, 100_000, 3):  # bounded; `stop` ends it long before
                if stop.is_set():
                    return
                try:
                    r = requests.post(f"{url}/extract", json={"text": texts[i % len(texts)], "adapter": "snips"},
                                      timeout=60)
                    answers.append((time.time(), r.status_code, r.headers.get("retry-after")))
                except requests.RequestException as e:  # no answer at all: recorded as status -1
                    answers.append((time.time(), -1, repr(e)))

        start = time.time()
        with cf.ThreadPoolExecutor(3) as pool:
            clients = [pool.submit(client, k) for k in range(3)]
            try:
                wait_until(lambda: sum(a[1] == 200 for a in answers) >= 10, proc, log, "ten answers", limit_s=60)
                removed_at = time.time()
                replace_node(c, node_b)

                def replaced() -> bool:  # two replicas again, wherever Serve put the new one
                    nodes = model_replica_nodes(c)
                    return len(nodes) == 2 and node_b.node_id not in nodes
                wait_until(replaced, proc, log, "a replacement Model replica", limit_s=120)
                recovered_at = time.time()
                wait_until(lambda: sum(a[0] > recovered_at + 5 for a in answers) >= 20, proc, log,
                           "answers after the recovery", limit_s=120)
            finally:
                stop.set()
            for f in clients:
                f.result(timeout=120)
        counts = collections.Counter(status for _, status, _ in answers)
        print(f"answers by status {dict(counts)}; node removed {removed_at - start:.0f} s in, "
              f"replacement replica up {recovered_at - removed_at:.0f} s later")
        assert set(counts) <= {200, 503}, counts
        assert all(retry for _, status, retry in answers if status == 503)  # every 503 says when to retry
        late = [status for t, status, _ in answers if t > recovered_at + 5]
        assert late and set(late) == {200}, collections.Counter(late)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run shuts the application down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


WHERE = """
import json, subprocess, sys, ray
ray.init(address="auto", logging_level="ERROR")
alive = lambda: [n for n in ray.nodes() if n["Alive"]]
before = len(alive())
node = ray.get(ray.remote(num_gpus=1)(lambda: ray.get_runtime_context().get_node_id()).remote(), timeout=240)
status = subprocess.run([sys.executable.replace("python", "ray"), "status"], capture_output=True, text=True).stdout
seen = {"before": before, "after": len(alive()), "task_node": node,
        "gpus": {n["NodeID"]: n["Resources"].get("GPU", 0) for n in alive()}, "status": status}
with open(sys.argv[1], "w") as f:  # not stdout, where the driver also prints the autoscaler's events
    json.dump(seen, f)
"""


def test_cluster_yaml_worker_type_scales_up_from_zero_when_a_job_asks(tmp_path):
    """cluster.yaml's node types run under Ray's fake multi-node provider, which starts a local raylet for each
    node the autoscaler launches: nothing runs beside the head at first (every worker type has min_workers 0),
    a task that asks for a GPU makes the autoscaler launch a node of a GPU type, and the task runs there. What
    changes from the file: the cloud provider (fake), the head type's name (the provider's), and the resources
    a fake node declares (one CPU each on this two-core machine; the GPUs as declared, logical only)."""
    spec = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, t in spec["available_node_types"].items():
        if name != spec["head_node_type"]:
            types[name] = {"resources": t["resources"] | {"CPU": 1, "object_store_memory": 100 * 2**20},
                           "node_config": {}, "min_workers": t["min_workers"], "max_workers": t["max_workers"]}
    fake = {k: spec[k] for k in ("cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes")} | {
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": types, "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": []}
    path = tmp_path / "fake-cluster.yaml"
    path.write_text(yaml.safe_dump(fake))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    # The fake provider's nodes join the GCS at this machine's address on port 6379: the head must listen there.
    subprocess.run([ray_cli, "start", "--head", "--port=6379", f"--autoscaling-config={path}", "--num-cpus=0",
                    "--include-dashboard=false"], env=env, check=True, capture_output=True, timeout=120)
    try:
        result = tmp_path / "seen.json"
        r = subprocess.run([sys.executable, "-c", WHERE, str(result)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        seen = json.loads(result.read_text())
        assert seen["before"] == 1 and seen["after"] == 2, seen  # the head alone, then one node launched
        assert seen["gpus"][seen["task_node"]] >= 1  # the task ran on the launched GPU node
        gpu_types = [n for n, t in spec["available_node_types"].items() if t["resources"].get("GPU")]
        assert any(f" {name}" in seen["status"] for name in gpu_types), seen["status"]  # `ray status` names it
    finally:
        subprocess.run([ray_cli, "stop"], env=env, capture_output=True, timeout=120)
