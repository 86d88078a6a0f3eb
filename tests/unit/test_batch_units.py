"""Batch-job pieces that need no Ray: input resolution (paths, globs, URIs), per-file parsing, batch sizing, chunk merging."""
import json
import math
import os
import time

import pytest

from jsonextract.errors import UserError

from jsonextract.batch.inputs import parse_file, resolve_inputs
from jsonextract.batch.replica import balanced_batch_rows, merge_chunks, replica_device
from jsonextract.config.extract import ExtractConfig


@pytest.fixture()
def corpus(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "1", "text": "x"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"id": "2", "text": "y"}\n')
    (tmp_path / "c.csv").write_text("id,text\n3,z\n")
    (tmp_path / "_summary.json").write_text("{}")
    return tmp_path


def test_resolve_folder_glob_and_uri(corpus):
    names = lambda paths: sorted(p.rsplit("/", 1)[1] for p in paths)  # noqa: E731
    assert names(resolve_inputs(str(corpus))[0]) == ["a.jsonl", "b.jsonl", "c.csv"]  # _files are not input
    assert names(resolve_inputs(str(corpus / "*.jsonl"))[0]) == ["a.jsonl"]
    assert names(resolve_inputs(f"file://{corpus}/*.jsonl")[0]) == ["a.jsonl"]
    assert names(resolve_inputs(f"file://{corpus}/sub")[0]) == ["b.jsonl"]
    assert names(resolve_inputs(f"file://{corpus}")[0]) == ["a.jsonl", "b.jsonl", "c.csv"]
    with pytest.raises(UserError, match="no files match"):
        resolve_inputs(f"file://{corpus}/*.parquet")
    with pytest.raises(UserError, match="not found"):
        resolve_inputs(str(corpus / "missing.jsonl"))


def test_parse_csv_rows_get_stable_ids_and_errors():
    cfg = ExtractConfig(id_column="doc")
    rows = list(parse_file({"path": "/d/x.csv", "bytes": b"doc,text\n,hello\nk2,\n"}, cfg))
    assert rows[0]["id"] == "x.csv:0" and rows[0]["text"] == "hello" and rows[0]["error"] is None
    assert rows[1]["id"] == "k2" and "empty" in rows[1]["error"]


def test_context_column_is_an_object_or_a_string_and_anything_else_is_an_error_row():
    """CSV cells are strings: one holding a JSON object is that object, so the model sees one rendering of it."""
    csv = (b'id,text,ask\n'
           b'a,13,"{""requested_slots"": [""time""]}"\n'
           b'b,13,how many people?\n'
           b'c,13,\n')
    rows = list(parse_file({"path": "/d/x.csv", "bytes": csv}, ExtractConfig(context_column="ask")))
    assert [r["error"] for r in rows] == [None, None, None]
    assert [json.loads(r["context"]) if r["context"] else None for r in rows] == [
        {"requested_slots": ["time"]}, "how many people?", None]
    jsonl = b'{"id": "d", "text": "13", "context": ["time"]}\n{"id": "e", "text": "13", "context": 5}\n'
    bad = list(parse_file({"path": "/d/y.jsonl", "bytes": jsonl}, ExtractConfig()))
    assert [r["id"] for r in bad] == ["d", "e"]
    assert "'context' is list, not an object or string" in bad[0]["error"] and bad[0]["text"] is None
    assert "'context' is int" in bad[1]["error"]


@pytest.mark.parametrize("replicas", [1, 2, 3, 8])
@pytest.mark.parametrize("max_rows", [1, 7, 128])
def test_balanced_batches_keep_the_rounds_and_even_out_the_last(replicas, max_rows):
    for n in range(1, 600):
        b = balanced_batch_rows(n, replicas, max_rows)
        rounds = math.ceil(n / (replicas * max_rows))  # what full batches of max_rows need
        assert 1 <= b <= max_rows
        assert math.ceil(n / b) <= rounds * replicas  # no extra round
        assert b * rounds * replicas - n < rounds * replicas  # one row fewer per batch would not fit
    assert balanced_batch_rows(200, 2, 128) == 100 and balanced_batch_rows(400, 2, 128) == 100


def test_merge_chunks_first_value_wins_lists_union():
    merged = merge_chunks([{"a": None, "b": "x", "l": ["1"], "o": {"p": None}},
                           {"a": "y", "b": "z", "l": ["1", "2"], "o": {"p": "q"}}])
    assert merged == {"a": "y", "b": "x", "l": ["1", "2"], "o": {"p": "q"}}


def test_reading_results_has_no_side_effects_and_resume_quarantines_explicitly(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from jsonextract.data.io import quarantine_unreadable, read_results, result_files

    pq.write_table(pa.table({"id": ["a", "b"], "valid": [True, False]}), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.parquet").write_bytes(b"PAR1 cut short")
    (tmp_path / "_summary.json").write_text("{}")
    assert [p.rsplit("/", 1)[1] for p in result_files(tmp_path)] == ["part-0.parquet", "part-1.parquet"]
    with pytest.raises(UserError, match="part-1.parquet"):
        read_results(tmp_path)
    assert (tmp_path / "part-1.parquet").is_file()  # a reader never renames anything
    assert [p.rsplit("/", 1)[1] for p in quarantine_unreadable(tmp_path)] == ["part-1.parquet"]
    assert (tmp_path / "part-1.parquet.corrupt").is_file()
    assert read_results(tmp_path, ["id", "error"]) == [{"id": "a", "error": None}, {"id": "b", "error": None}]


def test_a_folder_in_object_storage_is_copied_once_per_version_and_shared_by_processes(tmp_path, monkeypatch):
    """file:// goes through the same pyarrow filesystem code as s3://. A later process (a fresh memo) reuses the
    copy of an unchanged folder instead of leaving one copy per process; a changed folder gets a new copy; where
    the copies folder cannot be made, the temporary directory takes its place."""
    import tempfile
    from jsonextract.data import io

    monkeypatch.setenv("JSONEXTRACT_COPIES", str(tmp_path / "copies"))
    monkeypatch.setattr(io, "_copies", {})
    remote = tmp_path / "bucket" / "adapter"
    remote.mkdir(parents=True)
    (remote / "weights.bin").write_bytes(b"v1")
    first = io.local_folder(f"file://{remote}")
    assert first.name == "adapter" and first.parent.parent == tmp_path / "copies"
    assert (first / "weights.bin").read_bytes() == b"v1"
    monkeypatch.setattr(io, "_copies", {})  # another process on the machine
    assert io.local_folder(f"file://{remote}") == first
    (remote / "weights.bin").write_bytes(b"v2 retrained")
    assert io.local_folder(f"file://{remote}") == first  # a process keeps the version it first saw
    monkeypatch.setattr(io, "_copies", {})
    second = io.local_folder(f"file://{remote}")
    assert second != first and (second / "weights.bin").read_bytes() == b"v2 retrained"
    assert (first / "weights.bin").read_bytes() == b"v1"  # a process still reading the old version keeps it
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == sorted([first.parent.name, second.parent.name])
    # a copy left half made by a killed process is removed by the next copy once it is old; a recent one (maybe
    # still being written by another process) is left alone
    old, recent = tmp_path / "copies" / ".copying-killed", tmp_path / "copies" / ".copying-busy"
    for folder in (old, recent):
        (folder / "adapter").mkdir(parents=True)
    os.utime(old, (time.time() - io.ABANDONED_COPY_S - 60,) * 2)
    (remote / "weights.bin").write_bytes(b"v3")
    monkeypatch.setattr(io, "_copies", {})
    io.local_folder(f"file://{remote}")
    assert not old.exists() and recent.is_dir()
    with pytest.raises(UserError, match="folder not found"):
        io.local_folder(f"file://{tmp_path / 'bucket' / 'missing'}")
    monkeypatch.setenv("JSONEXTRACT_COPIES", str(remote / "weights.bin" / "copies"))  # cannot be made
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(io, "_copies", {})
    assert io.local_folder(f"file://{remote}").parent.parent.parent == tmp_path / "tmp"


def test_replica_device_follows_the_gpus_it_was_given():
    """No GPUs asked for: the CPU. GPUs asked for on a machine without CUDA: an error naming the setting, not a
    replica that quietly runs on the CPU (or one that waits for a GPU forever)."""
    import torch
    assert replica_device(0) == "cpu"
    if torch.cuda.is_available():
        assert replica_device(1) == "cuda"
    else:
        with pytest.raises(UserError, match=r"pool.gpus_per_actor=0.5.*no CUDA GPU"):
            replica_device(0.5)


def test_progress_eta_reads_as_minutes_and_whole_seconds():
    from jsonextract.logs import clock
    assert clock(2939.7) == "49:00"  # was printed "48:60"
    assert clock(59.5) == "1:00" and clock(0) == "0:00" and clock(61.2) == "1:01" and clock(-3) == "0:00"
