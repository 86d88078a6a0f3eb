"""Extract JSON from a corpus with Ray Data: read -> map_batches on an actor pool (one model copy per actor) -> write.

    jsonextract extract --config configs/extract/cpu.yaml input=DATA output=OUT [adapter=DIR] [key=value ...]
    ray job submit --working-dir . -- python rayjobs/extract.py --config configs/extract/gpu.yaml input=s3://... output=s3://...

Every input row yields exactly one output row: a result, or an error row with its reason. Running again into the
same output folder skips the ids already there. With gold targets in the input, the job scores itself.
"""
from __future__ import annotations

import json
import threading
import time

import ray
import ray.data
import ray.util.scheduling_strategies

from jsonextract.batch.inputs import parse_file, resolve_inputs
from jsonextract.batch.replica import ExtractActor, balanced_batch_rows, summarise
from jsonextract.config.core import parse_args
from jsonextract.config.extract import ExtractConfig
from jsonextract.data.io import (
    filesystem,
    local_folder,
    quarantine_unreadable,
    read_results,
    remove_results,
    result_files,
    storage_env,
    write_json,
)
from jsonextract.data.schema import load_schema
from jsonextract.errors import UserError
from jsonextract.evaluation.metrics import score_results
from jsonextract.evaluation.score import format_table
from jsonextract.logs import clock, quiet_ray_data, ray_init_options
from jsonextract.models.loading import check_model_name
from jsonextract.models.manifest import read_manifest


def job_schema(cfg: ExtractConfig, manifest: dict | None) -> dict | None:
    if cfg.schema:
        return load_schema(cfg.schema)
    if manifest is not None:
        return manifest.get("schema")
    raise UserError("no schema: give schema=PATH or an adapter whose manifest has one")


def check_output_apart(output: str, inputs: list[str]) -> None:
    """The output folder must not hold input files: resuming would read them as results, and resume=false would
    delete them."""
    _, base = filesystem(output)
    inside = [p for p in inputs if p == base or p.startswith(base.rstrip("/") + "/")]
    if inside:
        raise UserError(f"output={output} holds input files ({inside[0]}{' ...' if len(inside) > 1 else ''}): "
                        "write the results to a folder of their own")


def already_done(cfg: ExtractConfig) -> set[str]:
    if not cfg.resume:
        # Starting over: an earlier run's rows left beside the new ones would give ids twice and a self-score
        # over both runs.
        removed = remove_results(cfg.output)
        if removed:
            print(f"[extract] resume=false: {len(removed)} result file(s) of an earlier run deleted from {cfg.output}")
        return set()
    moved = quarantine_unreadable(cfg.output)
    for f in moved:
        print(f"[extract] unreadable result file {f} (cut short by a crash?): set aside as {f}.corrupt; "
              "its rows are extracted again")
    return {r["id"] for r in read_results(cfg.output, ["id"], files=result_files(cfg.output))}


def build_pipeline(cfg: ExtractConfig, schema: dict | None, paths: list[str], fs, done: set[str], progress):
    """The streaming pipeline, and the number of rows it will extract; `progress` (a Progress actor) counts the
    input rows dropped as already done and the rows the replicas finish."""
    done_ref = ray.put(done)
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    ds = ds.flat_map(parse_file, fn_kwargs={"cfg": cfg})
    if cfg.limit:
        ds = ds.limit(cfg.limit)

    def not_done(batch):
        ids = ray.get(done_ref)
        if not ids:
            return batch
        kept = batch[~batch["id"].isin(ids)]
        if len(kept) < len(batch):
            ray.get(progress.add_skipped.remote(len(batch) - len(kept)))  # waited for: counted before the job ends
        return kept

    # Counting reads the input once more (parsing is cheap next to decoding): with the count, the last round of
    # batches gives every replica the same share instead of one full batch to one replica while the others idle.
    n_rows = max(ds.count() - len(done), 1)
    batch_rows = balanced_batch_rows(n_rows, cfg.pool.num_actors, cfg.pool.batch_rows)
    print(f"[extract] about {n_rows} rows to extract, in batches of {batch_rows} on {cfg.pool.num_actors} replica(s)")
    ds = ds.map_batches(not_done, batch_format="pandas")
    # One file parses into one block, which one actor would take whole: cut the stream into actor-sized blocks
    # (a streaming repartition, no all-to-all barrier) so every replica gets work.
    ds = ds.repartition(target_num_rows_per_block=batch_rows)
    ds = ds.map_batches(ExtractActor, fn_constructor_kwargs={"cfg": cfg, "schema": schema, "progress": progress},
                        batch_size=batch_rows, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(
                            size=cfg.pool.num_actors, max_tasks_in_flight_per_actor=cfg.pool.batches_in_flight),
                        num_cpus=cfg.pool.cpus_per_actor, num_gpus=cfg.pool.gpus_per_actor or None)
    return ds, n_rows


@ray.remote(num_cpus=0)
class Progress:
    """Rows skipped as already done (counted while they stream past, so rows in = rows written + rows skipped) and
    rows extracted (each replica adds its batches), read by the driver's progress line."""

    def __init__(self):
        self.skipped = self.done = 0

    def add_skipped(self, k: int) -> None:
        self.skipped += k

    def add_done(self, k: int) -> None:
        self.done += k

    def state(self) -> tuple[int, int]:
        return self.done, self.skipped


class ProgressLine:
    """Prints `[extract] done/total rows (x%), r rows/s, ETA` every `every_s` seconds while the job writes, when
    the count has moved (a thread beside Ray Data's own execution)."""

    def __init__(self, progress, total: int, every_s: float = 10.0):
        self.progress, self.total, self.every_s = progress, total, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.t0 = time.time()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        shown = 0
        while not self.stop.wait(self.every_s):
            try:
                done, _ = ray.get(self.progress.state.remote(), timeout=5)
            except Exception:  # a progress line is never worth failing the job for
                continue
            if done == shown:
                continue
            shown, elapsed = done, time.time() - self.t0
            rate = done / elapsed
            eta = (self.total - done) / rate if rate > 0 and done < self.total else 0
            print(f"[extract] {done}/{self.total} rows ({done / max(self.total, 1):.0%}), {rate:.1f} rows/s, "
                  f"ETA {clock(eta)}", flush=True)


def write(ds, cfg: ExtractConfig) -> None:
    if cfg.output_format == "parquet":
        ds.write_parquet(cfg.output)
    else:
        ds.write_json(cfg.output)


def score(cfg: ExtractConfig, schema: dict | None) -> dict | None:
    """Metrics of every row in the output folder whose input carried a gold `target` (None if none did)."""
    rows = read_results(cfg.output, ["id", "output", "valid", "target"], files=result_files(cfg.output))
    pairs = [(r, json.loads(r["target"])) for r in rows if r.get("target")]
    return score_results(pairs, schema) if pairs else None


def main(argv: list[str]) -> int:
    cfg = parse_args(ExtractConfig, argv, __doc__)
    if not cfg.input or not cfg.output:
        raise UserError("extract needs input=PATH and output=PATH")
    paths, fs = resolve_inputs(cfg.input)  # first: a mistyped input fails in a second, before any model work
    check_output_apart(cfg.output, paths)
    manifest = read_manifest(local_folder(cfg.adapter)) if cfg.adapter else None
    schema = job_schema(cfg, manifest)
    # The base model, checked (and the embedded default built) once here, not by every actor at once.
    check_model_name(manifest["base_model"] if manifest is not None else cfg.model.name)
    done = already_done(cfg)
    print(f"[extract] {len(paths)} input file(s); {len(done)} ids already in {cfg.output}")
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"} | storage_env()}, **ray_init_options())
    quiet_ray_data()
    before = set(result_files(cfg.output))
    # On the driver's node: a helper on a worker node would die with that node and take the job with it.
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                         soft=False)
    progress = Progress.options(scheduling_strategy=here).remote()
    ds, n_rows = build_pipeline(cfg, schema, paths, fs, done, progress)
    t0 = time.time()
    with ProgressLine(progress, n_rows):
        write(ds, cfg)
    seconds = time.time() - t0
    new = [f for f in result_files(cfg.output) if f not in before]
    rows = read_results(cfg.output, ["id", "valid", "error", "output_tokens"], files=new)
    n_skipped = ray.get(progress.state.remote())[1]
    summary = summarise(rows, n_skipped, seconds) | {"rows_in": len(rows) + n_skipped}
    print("[extract] " + json.dumps(summary))
    write_json(cfg.output, "_summary.json", summary)
    metrics = score(cfg, schema)
    if metrics:
        path = write_json(cfg.output, "_metrics.json", metrics)
        print(format_table(metrics, max_fields=cfg.table_fields))
        print(f"[extract] metrics written to {path}")
    return 0

