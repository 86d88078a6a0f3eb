"""Extract JSON from a corpus with Ray Data: read -> map_batches on an actor pool (one model copy per actor) -> write.

    python rayjobs/extract.py --config configs/extract/tiny_cpu.yaml input=DATA output=OUT [adapter=DIR] [key=value ...]
    ray job submit --working-dir . -- python rayjobs/extract.py --config configs/extract/gpu.yaml input=s3://... output=s3://...

Every input row yields exactly one output row: a result, or an error row with its reason. Running again into the
same output folder skips the ids already there. With gold targets in the input, the job scores itself.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jsonextract import cli  # noqa: E402
from jsonextract.errors import UserError  # noqa: E402
from jsonextract.batch import (ExtractActor, output_files, parse_file, read_output_rows, resolve_inputs,  # noqa: E402
                               summarise)
from jsonextract.extract_config import ExtractConfig  # noqa: E402
from jsonextract.metrics import Scorer, format_table, prediction_of  # noqa: E402
from jsonextract.model import check_model_name, read_manifest  # noqa: E402
from jsonextract.schema import load_schema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def job_schema(cfg: ExtractConfig) -> dict | None:
    if cfg.schema:
        return load_schema(cfg.schema)
    if cfg.adapter:
        return read_manifest(cfg.adapter).get("schema")
    raise UserError("no schema: give schema=PATH or an adapter whose manifest has one")


def already_done(cfg: ExtractConfig) -> set[str]:
    if not cfg.resume:
        return set()
    return {r["id"] for r in read_output_rows(output_files(cfg.output), cfg.output, ["id"])}


def build_pipeline(cfg: ExtractConfig, schema: dict | None, paths: list[str], fs, done_ref):
    import ray
    import ray.data

    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    ds = ds.flat_map(parse_file, fn_kwargs={"cfg": cfg})
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    parsed = ds

    def not_done(batch):
        done = ray.get(done_ref)
        return batch[~batch["id"].isin(done)] if done else batch

    ds = ds.map_batches(not_done, batch_format="pandas")
    # One file parses into one block, which one actor would take whole: cut the stream into actor-sized blocks
    # (a streaming repartition, no all-to-all barrier) so every replica gets work.
    ds = ds.repartition(target_num_rows_per_block=cfg.pool.batch_rows)
    ds = ds.map_batches(ExtractActor, fn_constructor_kwargs={"cfg": cfg, "schema": schema},
                        batch_size=cfg.pool.batch_rows, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=cfg.pool.num_actors),
                        num_cpus=cfg.pool.cpus_per_actor, num_gpus=cfg.pool.gpus_per_actor or None)
    return parsed, ds


def write(ds, cfg: ExtractConfig) -> None:
    if cfg.output_format == "parquet":
        ds.write_parquet(cfg.output)
    else:
        ds.write_json(cfg.output)


def score(cfg: ExtractConfig, schema: dict | None) -> dict | None:
    rows = read_output_rows(output_files(cfg.output), cfg.output, ["id", "output", "valid", "target"])
    gold = [r for r in rows if r.get("target")]
    if not gold:
        return None
    s = Scorer()
    for r in gold:
        obj, json_ok, schema_ok = prediction_of(r, schema)
        s.add(obj, json.loads(r["target"]), json_ok, schema_ok and bool(r["valid"]))
    return s.result()


def write_json_next_to_output(cfg: ExtractConfig, name: str, obj: dict) -> str:
    import pyarrow.fs as pafs
    fs, base = pafs.FileSystem.from_uri(cfg.output) if "://" in cfg.output else \
        (pafs.LocalFileSystem(), str(Path(cfg.output).resolve()))
    path = f"{base}/{name}"
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=1).encode())
    return path


def main() -> int:
    import ray

    cfg = cli.parse(ExtractConfig)
    if not cfg.input or not cfg.output:
        raise UserError("extract needs input=PATH and output=PATH")
    schema = job_schema(cfg)
    # The base model, checked (and the embedded default built) once here, not by every actor at once.
    check_model_name(read_manifest(cfg.adapter)["base_model"] if cfg.adapter else cfg.model.name)
    paths, fs = resolve_inputs(cfg.input)
    done = already_done(cfg)
    print(f"[extract] {len(paths)} input file(s); {len(done)} ids already in {cfg.output}")
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}})
    before = set(output_files(cfg.output))
    parsed, ds = build_pipeline(cfg, schema, paths, fs, ray.put(done))
    n_in = parsed.count()
    t0 = time.time()
    write(ds, cfg)
    seconds = time.time() - t0
    new = [f for f in output_files(cfg.output) if f not in before]
    rows = read_output_rows(new, cfg.output, ["id", "valid", "error", "output_tokens"])
    summary = summarise(rows, n_in - len(rows), seconds) | {"rows_in": n_in}
    print("[extract] " + json.dumps(summary))
    write_json_next_to_output(cfg, "_summary.json", summary)
    metrics = score(cfg, schema)
    if metrics:
        path = write_json_next_to_output(cfg, "_metrics.json", metrics)
        print(format_table(metrics, max_fields=20))
        print(f"[extract] metrics written to {path}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
