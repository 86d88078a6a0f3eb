"""Extract JSON from a corpus with Ray Data: read -> map_batches on an actor pool (one model copy per actor) -> write.

    jsonextract extract --config configs/extract/cpu.yaml input=DATA output=OUT [adapter=DIR] [key=value ...]
    ray job submit --working-dir . -- python rayjobs/extract.py --config configs/extract/gpu.yaml input=s3://... output=s3://...

Every input row yields exactly one output row: a result, or an error row with its reason. Running again into the
same output folder skips the ids already there. With gold targets in the input, the job scores itself.
"""
from __future__ import annotations

import json
import time

from jsonextract.batch.replica import ExtractActor, balanced_batch_rows, parse_file, resolve_inputs, summarise
from jsonextract.config.core import parse_args
from jsonextract.config.extract import ExtractConfig
from jsonextract.data.io import (
    filesystem,
    quarantine_unreadable,
    read_results,
    remove_results,
    result_files,
    write_json,
)
from jsonextract.data.schema import load_schema
from jsonextract.errors import UserError
from jsonextract.evaluation.metrics import score_results
from jsonextract.evaluation.score import format_table
from jsonextract.models.loading import check_model_name
from jsonextract.models.manifest import read_manifest


def job_schema(cfg: ExtractConfig) -> dict | None:
    if cfg.schema:
        return load_schema(cfg.schema)
    if cfg.adapter:
        return read_manifest(cfg.adapter).get("schema")
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


def build_pipeline(cfg: ExtractConfig, schema: dict | None, paths: list[str], fs, done: set[str], skipped):
    """The streaming pipeline; `skipped` (a SkipCounter) counts the input rows dropped as already done while they
    stream past, so rows in = rows written + rows skipped."""
    import ray
    import ray.data

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
            ray.get(skipped.add.remote(len(batch) - len(kept)))  # waited for: counted before the job ends
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
    ds = ds.map_batches(ExtractActor, fn_constructor_kwargs={"cfg": cfg, "schema": schema},
                        batch_size=batch_rows, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(
                            size=cfg.pool.num_actors, max_tasks_in_flight_per_actor=cfg.pool.batches_in_flight),
                        num_cpus=cfg.pool.cpus_per_actor, num_gpus=cfg.pool.gpus_per_actor or None)
    return ds


def skip_counter():
    import ray

    @ray.remote(num_cpus=0)
    class SkipCounter:
        def __init__(self):
            self.n = 0

        def add(self, k: int) -> None:
            self.n += k

        def total(self) -> int:
            return self.n

    return SkipCounter.remote()


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
    import ray

    cfg = parse_args(ExtractConfig, argv, __doc__)
    if not cfg.input or not cfg.output:
        raise UserError("extract needs input=PATH and output=PATH")
    paths, fs = resolve_inputs(cfg.input)  # first: a mistyped input fails in a second, before any model work
    check_output_apart(cfg.output, paths)
    schema = job_schema(cfg)
    # The base model, checked (and the embedded default built) once here, not by every actor at once.
    check_model_name(read_manifest(cfg.adapter)["base_model"] if cfg.adapter else cfg.model.name)
    done = already_done(cfg)
    print(f"[extract] {len(paths)} input file(s); {len(done)} ids already in {cfg.output}")
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    before = set(result_files(cfg.output))
    skipped = skip_counter()
    ds = build_pipeline(cfg, schema, paths, fs, done, skipped)
    t0 = time.time()
    write(ds, cfg)
    seconds = time.time() - t0
    new = [f for f in result_files(cfg.output) if f not in before]
    rows = read_results(cfg.output, ["id", "valid", "error", "output_tokens"], files=new)
    n_skipped = ray.get(skipped.total.remote())
    summary = summarise(rows, n_skipped, seconds) | {"rows_in": len(rows) + n_skipped}
    print("[extract] " + json.dumps(summary))
    write_json(cfg.output, "_summary.json", summary)
    metrics = score(cfg, schema)
    if metrics:
        path = write_json(cfg.output, "_metrics.json", metrics)
        print(format_table(metrics, max_fields=20))
        print(f"[extract] metrics written to {path}")
    return 0

