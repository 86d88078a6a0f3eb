"""Building blocks of the batch extraction job: input resolution and parsing into rows (malformed input becomes
error rows, never a failed read), the actor that holds one model copy, chunk merging, resume and summaries.
"""
from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
import math
import os
import time
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from jsonextract.config.extract import ExtractConfig
from jsonextract.data.io import filesystem
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.records import Columns, Record, check_record, parse_jsonl
from jsonextract.data.schema import order_like_schema, validation_error
from jsonextract.decoding.extractor import Extractor, Result, apply_grounding, extract_in_batches
from jsonextract.errors import UserError
from jsonextract.lazy import lazy
from jsonextract.models.inference import load_for_inference
from jsonextract.models.manifest import temperature_of

pafs = lazy("pyarrow.fs")
pd = lazy("pandas")
pq = lazy("pyarrow.parquet")
torch = lazy("torch")



# ---------------------------------------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------------------------------------- the actor


def balanced_batch_rows(n_rows: int, replicas: int, max_rows: int) -> int:
    """Rows per batch, at most `max_rows`, such that `n_rows` split into whole rounds of one batch per replica:
    200 rows on 2 replicas at most 128 a batch -> 100 (two equal batches, not 128 + 72)."""
    rounds = math.ceil(n_rows / (replicas * max_rows))
    return max(math.ceil(n_rows / (replicas * rounds)), 1)


def merge_chunks(objs: list[dict]) -> dict:
    """Merge per-chunk results in text order: the first non-null value of each field wins; lists are unioned
    in order; nested objects merge the same way. Sound for extraction where each field has one value in the
    document (the first mention counts), which is what the gold data of both shipped data sets assume."""
    out: dict = {}
    for obj in objs:
        for k, v in obj.items():
            cur = out.get(k)
            if cur is None:
                out[k] = v
            elif isinstance(cur, dict) and isinstance(v, dict):
                out[k] = merge_chunks([cur, v])
            elif isinstance(cur, list) and isinstance(v, list):
                out[k] = cur + [x for x in v if x not in cur]
    return out


NO_ANNOTATION = {"grounding": None, "confidence": None, "confidence_uncalibrated": None, "dropped": None}  # rows without an output


def replica_device(gpus_per_actor: float) -> str:
    """A replica given GPUs runs on the one Ray made visible to it (Ray sets CUDA_VISIBLE_DEVICES per actor, so it
    is always "cuda", index 0); a replica given none runs on the CPU."""
    if gpus_per_actor <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(f"pool.gpus_per_actor={gpus_per_actor}, but this replica sees no CUDA GPU "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}; torch {torch.__version__})")
    return "cuda"


class ExtractActor:
    """One model copy per actor (map_batches on an actor pool). Never raises on a row: failures are error rows."""

    def __init__(self, cfg: ExtractConfig, schema: dict | None):
        t0 = time.perf_counter()
        if cfg.fail_actor_once and not os.path.exists(cfg.fail_actor_once):
            Path(cfg.fail_actor_once).write_text("died once")
            self._die = True
        else:
            self._die = False

        self.cfg = cfg
        device = replica_device(cfg.pool.gpus_per_actor)
        lm = load_for_inference(cfg.model, cfg.adapter or None, device)
        schema = schema if schema is not None else lm.schema
        self.tokenizer = lm.tokenizer
        budget = cfg.model.max_length - cfg.decoding.max_new_tokens
        self.extractor = Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, schema), cfg.decoding,
                                   max_prompt_tokens=budget, truncate_input=cfg.long_text == "truncate",
                                   temperature=temperature_of(lm.manifest))
        self.overhead = len(self.extractor.prompt.encode_prompt(self.tokenizer, "").ids)
        print(f"[extract] replica ready on {device}: model loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    def __call__(self, batch):
        t0 = time.time()
        if self._die:  # TEST ONLY: simulate a crashed replica (process exit, like an OOM kill)
            os._exit(1)
        rows = batch.to_dict("records")
        results: list[dict | None] = [None] * len(rows)
        todo = []
        for i, r in enumerate(rows):
            if r["error"]:
                results[i] = {"output": None, "valid": False, "error": r["error"], "input_tokens": 0,
                              "output_tokens": 0, "input_truncated": False, "chunks": 0} | NO_ANNOTATION
            else:
                todo.append(i)
        contexts = [json.loads(r["context"]) if r.get("context") else None for r in rows]
        for group in self._token_groups([rows[i]["text"] + (rows[i].get("context") or "") for i in todo], todo):
            for i, res in zip(group, self._extract([rows[i]["text"] for i in group], [contexts[i] for i in group])):
                results[i] = res
        out = pd.DataFrame([{**{k: r[k] for k in ("id", "source", "target")}, **res,
                             **{k: r[k] for k in r if k.startswith("pass_")}} for r, res in zip(rows, results)])
        t1 = time.time()
        span = "-".join(time.strftime("%H:%M:%S", time.localtime(t)) for t in (t0, t1))
        print(f"[extract] replica {os.getpid()}: {len(rows)} rows in {t1 - t0:.1f} s "
              f"({len(rows) / max(t1 - t0, 1e-9):.1f} rows/s; {span})", flush=True)
        return out

    def _token_groups(self, texts: list[str], idx: list[int]) -> list[list[int]]:
        """The actor's generate() batches: rows sorted by length, grouped so that rows x longest prompt stays under
        pool.max_batch_tokens and a group has at most decoding.batch_size rows."""
        lengths = [min(len(t) // 3 + self.overhead, self.extractor.max_prompt_tokens) for t in texts]  # cheap estimate
        order = sorted(range(len(idx)), key=lambda j: lengths[j])
        groups, cur, longest = [], [], 0
        for j in order:
            longest_new = max(longest, lengths[j])
            if cur and (longest_new * (len(cur) + 1) > self.cfg.pool.max_batch_tokens
                        or len(cur) >= self.cfg.decoding.batch_size):
                groups.append(cur)
                cur, longest_new = [], lengths[j]
            cur.append(idx[j])
            longest = longest_new
        return groups + ([cur] if cur else [])

    def _extract(self, texts: list[str], contexts: list) -> list[dict]:
        try:
            results = [self._one_or_chunks(t, c, r)
                       for t, c, r in zip(texts, contexts, self.extractor.extract(texts, contexts=contexts))]
        except Exception as e:  # a failure of the whole batch: retry row by row so one bad row cannot sink it
            if len(texts) == 1:
                return [{"output": None, "valid": False, "error": f"internal: {type(e).__name__}: {e}",
                         "input_tokens": 0, "output_tokens": 0, "input_truncated": False, "chunks": 0}
                        | NO_ANNOTATION]
            return [r for t, c in zip(texts, contexts) for r in self._extract([t], [c])]
        return results

    def _one_or_chunks(self, text: str, context, res) -> dict:
        if self.cfg.long_text == "chunk" and res.reason == "input_too_long":
            return self._chunked(text, context)
        return res.to_row() | {"chunks": 1}

    def _chunked(self, text: str, context=None) -> dict:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        overhead = len(self.extractor.prompt.encode_prompt(self.tokenizer, "", context=context).ids)
        window = max(self.extractor.max_prompt_tokens - overhead - 8, 16)
        chunks = [self.tokenizer.decode(ids[i:i + window]) for i in range(0, len(ids), window)]
        results = extract_in_batches(self.extractor, chunks, self.cfg.decoding.batch_size,
                                     contexts=[context] * len(chunks))
        good = [r.output for r in results if r.valid]
        base = {"input_tokens": sum(r.input_tokens for r in results),
                "output_tokens": sum(r.output_tokens for r in results), "input_truncated": False,
                "chunks": len(chunks)} | NO_ANNOTATION
        if not good:
            return base | {"output": None, "valid": False, "error": f"{results[0].error} (all {len(chunks)} chunks)"}
        merged = merge_chunks(good)
        schema = self.extractor.default_schema
        msg = validation_error(merged, schema) if schema is not None else None
        if msg:
            return base | {"output": None, "valid": False, "error": f"schema_invalid: merged chunks {msg}"}
        # Grounded against the whole text, so offsets are into the whole text. A value's confidence comes from
        # the chunk that first wrote its path.
        res = Result(order_like_schema(merged, schema), True, None,
                     confidence={p: c for r in reversed(results) if r.valid for p, c in (r.confidence or {}).items()},
                     confidence_uncalibrated={p: c for r in reversed(results) if r.valid
                                              for p, c in (r.confidence_uncalibrated or {}).items()} or None)
        apply_grounding(res, text, schema, self.cfg.decoding.grounding)
        row = res.to_row()
        return base | {k: row[k] for k in ("output", "valid", "error", "grounding", "confidence",
                                            "confidence_uncalibrated", "dropped")}


# ---------------------------------------------------------------------------------------------- output side


def summarise(rows: list[dict], skipped: int, seconds: float) -> dict:
    reasons = Counter((r["error"] or "").split(":", 1)[0] for r in rows if not r["valid"])
    out_tokens = sum(r.get("output_tokens") or 0 for r in rows)
    return {"rows_written": len(rows), "rows_skipped_already_done": skipped,
            "valid": sum(1 for r in rows if r["valid"]), "errors_by_reason": dict(reasons),
            "seconds": seconds, "rows_per_s": len(rows) / max(seconds, 1e-9),
            "output_tokens_per_s": out_tokens / max(seconds, 1e-9)}
