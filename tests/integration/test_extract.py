"""The batch job for real: Ray Data read -> actor pool map_batches -> write, on the tiny model."""
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jsonextract.config import core as C
from jsonextract.config.extract import ExtractConfig
from jsonextract.data.schema import load_schema, validation_error
from jsonextract.batch import job as extract_job
from conftest import JSONEXTRACT, R8K, ROOT, SNIPS

MALFORMED = [
    b"{not json at all",
    b'{"id": "m-missing", "note": "no text field"}',
    b'{"id": "m-empty", "text": ""}',
    b'{"id": "m-blank", "text": "   "}',
    b'{"id": "m-number", "text": 42}',
    b'{"id": "m-null", "text": null}',
    b'{"id": "m-list", "text": ["a", "b"]}',
    b'["an", "array", "not", "an", "object"]',
    b'{"id": "m-bytes", "text": "caf\xe9 \xff\xfe"}',
    b'{"id": "m-cut", "text": "I need a table for',
    b'{"id": "m-context", "text": "13", "context": ["time"]}',
]
PLAIN_13 = b'{"id": "plain-13", "text": "13"}'  # restaurant8k-test-00000 is "13" asked for a time: same text, no context


def run(cfg_overrides: list[str]) -> list[dict]:
    cfg = C.load(ExtractConfig, None, cfg_overrides)
    assert extract_job.main(cfg_overrides) == 0
    return read_all(cfg.output)


def run_cli(args: list[str], timeout: int = 120):
    """`jsonextract extract` as a user runs it, in its own process (its own Ray when it gets that far)."""
    import subprocess
    return subprocess.run([JSONEXTRACT, "extract", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def read_all(output: str) -> list[dict]:
    from jsonextract.data.io import read_results
    return read_results(output)


def base_overrides(tiny_model, out: Path, **extra) -> list[str]:
    over = {"model.name": str(tiny_model), "schema": str(R8K / "schema.json"), "output": str(out),
            "decoding.max_new_tokens": 24, "decoding.batch_size": 32, "pool.num_actors": 2,
            "pool.cpus_per_actor": 0.5, "pool.batch_rows": 32, **extra}
    return [f"{k}={v}" for k, v in over.items()]


@pytest.fixture(scope="module")
def r8k_input(tmp_path_factory) -> Path:
    lines = (R8K / "test.jsonl").read_bytes().splitlines()[:200]
    mixed = lines[:50] + MALFORMED[:5] + lines[50:150] + MALFORMED[5:] + [PLAIN_13] + lines[150:]
    p = tmp_path_factory.mktemp("in") / "r8k_mixed.jsonl"
    p.write_bytes(b"\n".join(mixed) + b"\n")
    return p


def test_every_row_out_exactly_once_with_error_rows(ray_session, tiny_model, r8k_input, tmp_path, capsys):
    rows = run(base_overrides(tiny_model, tmp_path / "out", input=r8k_input))
    # 212 rows, at most 32 a batch, 2 replicas: 8 batches of 27 (4 each), not 6 x 32 + 20 (4 batches for one, 3 for the other)
    assert "about 212 rows to extract, in batches of 27 on 2 replica(s)" in capsys.readouterr().out
    assert len(rows) == 212 and len({r["id"] for r in rows}) == 212
    gold_ids = {json.loads(l)["id"] for l in (R8K / "test.jsonl").read_text().splitlines()[:200]}
    assert gold_ids <= {r["id"] for r in rows}
    bad = [r for r in rows if r["id"] not in gold_ids | {"plain-13"}]
    assert len(bad) == 11 and all(not r["valid"] and r["error"].startswith("bad_input:") for r in bad)
    reasons = " ".join(r["error"] for r in bad)
    for what in ("not valid JSON", "missing 'text'", "is empty", "not a string", "not an object", "not UTF-8",
                 "'context' is list, not an object or string"):
        assert what in reasons
    # rows with and without context share the job's batches; the context is in the prompt of its own row only
    by_id = {r["id"]: r for r in rows}
    asked, plain = by_id["restaurant8k-test-00000"], by_id["plain-13"]
    assert asked["input_tokens"] > plain["input_tokens"] > 0
    assert any(r["id"] == "r8k_mixed.jsonl:51" for r in bad)  # no id: stable "<file>:<line>"
    schema = load_schema(R8K / "schema.json")
    for r in rows:
        if r["valid"]:
            assert validation_error(json.loads(r["output"]), schema) is None
        else:
            assert r["output"] is None and r["error"]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_in"] == 212 and summary["rows_written"] == 212
    assert sum(summary["errors_by_reason"].values()) == 212 - summary["valid"]
    metrics = json.loads((tmp_path / "out" / "_metrics.json").read_text())
    assert metrics["n"] == 200  # gold targets present: the job scored itself


def test_resume_skips_done_ids(ray_session, tiny_model, tmp_path):
    src = (SNIPS / "test.jsonl").read_text().splitlines()[:40]
    first, full = tmp_path / "first.jsonl", tmp_path / "all.jsonl"
    first.write_text("\n".join(src[:20]) + "\n")
    full.write_text("\n".join(src) + "\n")
    out = tmp_path / "out"
    run(base_overrides(tiny_model, out, input=first, schema=SNIPS / "schema.json"))  # a run that got half way
    rows = run(base_overrides(tiny_model, out, input=full, schema=SNIPS / "schema.json"))
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(json.loads(l)["id"] for l in src)  # the union is exactly the input, no duplicates
    assert json.loads((out / "_summary.json").read_text())["rows_skipped_already_done"] == 20


def test_resume_false_starts_over(ray_session, tiny_model, tmp_path):
    """resume=false into a folder that holds an earlier run: the earlier rows are replaced, not kept beside the new
    ones (each id once, and the self-score counts one run)."""
    src = (SNIPS / "test.jsonl").read_text().splitlines()[:12]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(src) + "\n")
    out = tmp_path / "out"
    run(base_overrides(tiny_model, out, input=inp, schema=SNIPS / "schema.json"))
    rows = run(base_overrides(tiny_model, out, input=inp, schema=SNIPS / "schema.json", resume="false"))
    assert sorted(r["id"] for r in rows) == sorted(json.loads(l)["id"] for l in src)
    assert json.loads((out / "_metrics.json").read_text())["n"] == 12


def test_crashed_actor_loses_no_rows(ray_session, tiny_model, tmp_path):
    src = (R8K / "test.jsonl").read_text().splitlines()[:30]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(src) + "\n")
    marker = tmp_path / "died"
    rows = run(base_overrides(tiny_model, tmp_path / "out", input=inp, fail_actor_once=marker, **{"pool.batch_rows": 8}))
    assert marker.exists()  # an actor really died
    assert sorted(r["id"] for r in rows) == sorted(json.loads(l)["id"] for l in src)


def test_text_folder_and_parquet_inputs(ray_session, tiny_model, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, l in enumerate((R8K / "test.jsonl").read_text().splitlines()[:5]):
        (docs / f"doc{i}.txt").write_text(json.loads(l)["text"])
    rows = run(base_overrides(tiny_model, tmp_path / "out-text", input=docs, output_format="jsonl"))
    assert sorted(r["id"] for r in rows) == [f"doc{i}.txt" for i in range(5)]
    recs = [json.loads(l) for l in (R8K / "test.jsonl").read_text().splitlines()[:6]]
    table = pa.table({"doc_id": [r["id"] for r in recs], "body": [r["text"] for r in recs],
                      "lang": ["en"] * 6})
    pq.write_table(table, tmp_path / "in.parquet")
    rows = run(base_overrides(tiny_model, tmp_path / "out-pq", input=tmp_path / "in.parquet", text_column="body",
                              id_column="doc_id", passthrough_columns="[lang]"))
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in recs)
    assert all(r["pass_lang"] == "en" for r in rows)


def test_long_text_is_chunked_and_merged(ray_session, tiny_model, tmp_path):
    long = " ".join(json.loads(l)["text"] for l in (R8K / "test.jsonl").read_text().splitlines()[:60])
    inp = tmp_path / "long.jsonl"
    inp.write_text(json.dumps({"id": "long", "text": long}) + "\n" + json.dumps({"id": "short", "text": "hi"}) + "\n")
    rows = {r["id"]: r for r in run(base_overrides(tiny_model, tmp_path / "out", input=inp,
                                                   **{"model.max_length": 160}))}
    assert rows["long"]["chunks"] > 1 and rows["short"]["chunks"] == 1
    rows = {r["id"]: r for r in run(base_overrides(tiny_model, tmp_path / "out2", input=inp, long_text="truncate",
                                                   **{"model.max_length": 160}))}
    assert rows["long"]["input_truncated"] and not rows["short"]["input_truncated"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_job_on_cuda(tiny_model, tmp_path, dtype):
    """One replica on the GPU (pool.gpus_per_actor=1): every row comes out once, valid outputs validate against the
    schema, and the replica said it ran on cuda."""
    src = (R8K / "test.jsonl").read_text().splitlines()[:100]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(src) + "\n")
    over = base_overrides(tiny_model, tmp_path / "out", input=inp, **{
        "pool.num_actors": 1, "pool.gpus_per_actor": 1, "pool.batch_rows": 64, "model.dtype": dtype})
    # A subprocess with its own Ray (the GPU is found on start), so the replica's log line can be read.
    r = run_cli(over, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replica ready on cuda" in r.stdout + r.stderr
    rows = read_all(str(tmp_path / "out"))
    assert sorted(r["id"] for r in rows) == sorted(json.loads(l)["id"] for l in src)
    schema = load_schema(R8K / "schema.json")
    assert all(validation_error(json.loads(r["output"]), schema) is None for r in rows if r["valid"])


def test_output_folder_holding_the_inputs_is_refused(tmp_path):
    """Results written among the inputs would be read back as results on resume, and resume=false deletes result
    files: the job refuses before touching anything, naming the output."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text((R8K / "test.jsonl").read_text().splitlines()[0] + "\n")
    for out in (data, data.parent):
        r = run_cli([f"input={data}", f"output={out}", f"schema={R8K / 'schema.json'}", "resume=false"])
        assert r.returncode == 2 and f"output={out} holds input files" in r.stderr and "Traceback" not in r.stderr
    assert (data / "in.jsonl").is_file()


def test_missing_input_is_clear_error(tmp_path):
    r = run_cli([f"input={tmp_path / 'nope*.jsonl'}", f"output={tmp_path / 'o'}", f"schema={R8K / 'schema.json'}"])
    assert r.returncode == 2 and "no files match" in r.stderr and "Traceback" not in r.stderr
