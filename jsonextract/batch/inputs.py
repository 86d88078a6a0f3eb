"""The batch job's input side: which files an `input` spec names, and each file parsed into rows (malformed input
becomes error rows naming file and line, never a failed read)."""
from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from jsonextract.config.extract import ExtractConfig
from jsonextract.data.io import filesystem
from jsonextract.data.records import Columns, Record, check_record, parse_jsonl
from jsonextract.errors import UserError
from jsonextract.lazy import lazy

pafs = lazy("pyarrow.fs")
pq = lazy("pyarrow.parquet")


def resolve_inputs(spec: str) -> tuple[list[str], Any]:
    """(paths, pyarrow filesystem) for a file, folder, glob or URI (`s3://bucket/dir/*.jsonl`, `file:///...`);
    an empty match is an error naming `spec`."""
    has_glob = any(c in spec for c in "*?[")
    if "://" in spec:
        root = spec.split("*")[0].rsplit("/", 1)[0] if has_glob else spec  # the folder above the first wildcard
        fs, base = filesystem(root)
        pattern = base + spec[len(root):] if has_glob else None  # same form as the FileInfo paths it is matched to
    elif has_glob:
        paths = sorted(str(Path(p).resolve()) for p in glob.glob(str(Path(spec).expanduser()), recursive=True)
                       if Path(p).is_file())
        if not paths:
            raise UserError(f"input: no files match {spec}")
        return paths, pafs.LocalFileSystem()
    else:
        (fs, base), pattern = filesystem(spec), None
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"input not found: {spec}")
    if info.type == pafs.FileType.File:
        return [base], fs
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    paths = sorted(e.path for e in entries if e.type == pafs.FileType.File
                   and not PurePosixPath(e.path).name.startswith((".", "_"))
                   and (pattern is None or glob_match(e.path, pattern)))
    if not paths:
        raise UserError(f"input: no files {'match' if pattern else 'under'} {spec}")
    return paths, fs

def glob_match(path: str, pattern: str) -> bool:
    """Shell-style: `*` stays within one path segment; `**` spans any number of them."""
    if "**" in pattern:
        return fnmatch.fnmatch(path, pattern.replace("**", "*"))
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatch(a, b) for a, b in zip(parts, pats))

def file_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return fmt
    return "text"

def to_row(cfg: ExtractConfig, rec: Record) -> dict:
    """The pipeline row of one input record: a bad record becomes an error row, never a dropped one. The gold
    target is optional here: a usable text with an unusable target is extracted, without a target."""
    usable = rec.text is not None
    row = {"id": rec.id, "text": rec.text if usable else None,
           "target": json.dumps(rec.target, ensure_ascii=False) if rec.target is not None else None,
           # JSON text: Ray Data's columns hold one type, and a context is an object or a string
           "context": json.dumps(rec.context, ensure_ascii=False) if rec.context is not None else None,
           "error": None if usable else f"bad_input: {rec.error}", "source": rec.source}
    for c in cfg.passthrough_columns:
        v = rec.raw.get(c) if isinstance(rec.raw, dict) else None
        row[f"pass_{c}"] = None if v is None else (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
    return row

def parse_file(item: dict, cfg: ExtractConfig) -> Iterator[dict]:
    """flat_map over read_binary_files rows: one pipeline row per record of the file, in file order."""
    path, data = item["path"], item["bytes"]
    name = PurePosixPath(path).name
    cols = Columns(cfg.text_column, cfg.id_column, cfg.target_column, cfg.context_column)
    fmt = file_format(path, cfg.input_format)
    if fmt == "text":  # one document per file
        try:
            obj = {cfg.text_column: data.decode("utf-8"), cfg.id_column: name}
        except UnicodeDecodeError as e:
            yield to_row(cfg, Record(name, None, None, path, f"{path}: not UTF-8 ({e.reason} at byte {e.start})"))
            return
        yield to_row(cfg, check_record(obj, path, name, cols=cols))
        return
    if fmt == "jsonl":
        for rec in parse_jsonl(data.split(b"\n"), path, cols=cols):
            yield to_row(cfg, rec)
        return
    try:
        if fmt == "parquet":
            records = pq.read_table(io.BytesIO(data)).to_pylist()
        else:
            records = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    except Exception as e:  # an unreadable file is one error row, the rest of the corpus goes on
        yield to_row(cfg, Record(name, None, None, path, f"{path}: cannot read as {fmt}: {e}"))
        return
    for n, obj in enumerate(records):
        yield to_row(cfg, check_record(obj, f"{path}:{n}", f"{name}:{n}", cols=cols))
