"""The batch job's model side: the replica (one model copy per Ray Data actor; never raises on a row, failures are
error rows), batch sizing, merging the chunks of a long text, and the job's summary."""
from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

from jsonextract.config.core import prompt_budget
from jsonextract.config.extract import ExtractConfig
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.schema import order_like_schema, validation_error
from jsonextract.decoding.extractor import Extractor, Result, apply_grounding, extract_in_batches
from jsonextract.errors import UserError
from jsonextract.lazy import lazy
from jsonextract.logs import verbose
from jsonextract.models.inference import load_for_inference
from jsonextract.models.manifest import temperature_of
from jsonextract.models.precision import matmul_dtype

pafs = lazy("pyarrow.fs")
pd = lazy("pandas")
pq = lazy("pyarrow.parquet")
torch = lazy("torch")



# ---------------------------------------------------------------------------------------------- inputs


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


NO_ANNOTATION = {"grounding": None, "confidence": None, "confidence_uncalibrated": None, "dropped": None,
                 "snapped": None}  # rows without an output


def error_row(error: str) -> dict:
    """The result columns of a row with no output: bad input, or a failure the replica caught."""
    return {"output": None, "valid": False, "error": error, "input_tokens": 0, "output_tokens": 0,
            "input_truncated": False, "chunks": 0} | NO_ANNOTATION


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

    def __init__(self, cfg: ExtractConfig, schema: dict | None, progress=None):
        t0 = time.perf_counter()
        if cfg.fail_actor_once and not os.path.exists(cfg.fail_actor_once):
            Path(cfg.fail_actor_once).write_text("died once")
            self._die = True
        else:
            self._die = False

        self.cfg, self.progress = cfg, progress  # progress: the job's Progress actor (None outside the job)
        device = replica_device(cfg.pool.gpus_per_actor)
        lm = load_for_inference(cfg.model, cfg.adapter or None, device)
        schema = schema if schema is not None else lm.schema
        self.tokenizer = lm.tokenizer
        budget = prompt_budget(cfg.model, cfg.decoding)
        self.extractor = Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, schema), cfg.decoding,
                                   max_prompt_tokens=budget, truncate_input=cfg.long_text == "truncate",
                                   temperature=temperature_of(lm.manifest))
        self.overhead = len(self.extractor.prompt.encode_prompt(self.tokenizer, "").ids)
        print(f"[extract] replica ready on {device}, matrix products in {str(matmul_dtype(lm.model)).removeprefix('torch.')}: "
              f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    def __call__(self, batch):
        t0 = time.time()
        if self._die:  # TEST ONLY: simulate a crashed replica (process exit, like an OOM kill)
            os._exit(1)
        rows = batch.to_dict("records")
        results: list[dict | None] = [None] * len(rows)
        todo = []
        for i, r in enumerate(rows):
            if r["error"]:
                results[i] = error_row(r["error"])
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
        if self.progress is not None:
            self.progress.add_done.remote(len(rows))  # not waited for: the driver's progress line reads it
        if verbose():  # per replica and batch: how evenly the replicas share the work
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
                return [error_row(f"internal: {type(e).__name__}: {e}")]
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
                                            "confidence_uncalibrated", "dropped", "snapped")}


# ---------------------------------------------------------------------------------------------- output side


def summarise(rows: list[dict], skipped: int, seconds: float) -> dict:
    reasons = Counter((r["error"] or "").split(":", 1)[0] for r in rows if not r["valid"])
    out_tokens = sum(r.get("output_tokens") or 0 for r in rows)
    return {"rows_written": len(rows), "rows_skipped_already_done": skipped,
            "valid": sum(1 for r in rows if r["valid"]), "errors_by_reason": dict(reasons),
            "seconds": seconds, "rows_per_s": len(rows) / max(seconds, 1e-9),
            "output_tokens_per_s": out_tokens / max(seconds, 1e-9)}
