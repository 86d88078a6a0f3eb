"""Schema-constrained generation for batch and online use.

xgrammar compiles each JSON Schema (bounded: see schema.bounded) into a grammar; a logits processor masks every
token the grammar does not allow. Hard-won facts:
- xgrammar forces object keys into the schema's order and writes `", "` / `": "` unless told otherwise. Training
  targets are compact JSON with keys in schema order (prompt.answer_text), and we compile with
  separators=(",", ":") and fixed order, so the grammar allows exactly the training format; a grammar that
  disagrees with it cost 16 F1 points in calibration. (any_order=True in xgrammar 0.2.8 lets a key repeat:
  an untrained model then writes `"intent":..` forever.)
- any_whitespace=False: free whitespace lets a weak model loop forever.
- The mask once let a raw control character into a string: every output is parsed and validated here, and a
  failure is an error result, never a success.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from jsonextract.config.core import DecodingConfig
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.schema import (
    SchemaError,
    bounded,
    canonical_json,
    check_schema,
    unsupported_features,
    validation_error,
)
from jsonextract.decoding.generated import DecodeStats
from jsonextract.decoding.grammar import Drafter
from jsonextract.decoding.grounding import confidence, drop_ungrounded, ground, snap, spans_of_whole_words
from jsonextract.decoding.kv_cache import PrefixCache
from jsonextract.decoding.loop import greedy_generate
from jsonextract.decoding.reference import reference_generate
from jsonextract.decoding.scheduling import PassCost
from jsonextract.lazy import lazy

xgr = lazy("xgrammar")


GRAMMAR_CACHE_BYTES = 256 << 20  # xgrammar's own compiled-grammar cache, bounded


@dataclass
class Result:
    output: Any  # the parsed, schema-valid object, or None
    valid: bool
    error: str | None  # "truncated", "invalid_json: ...", "schema_invalid: ...", "input_too_long", ...
    raw: str = ""  # the generated text
    input_tokens: int = 0
    output_tokens: int = 0
    input_truncated: bool = False  # the source text was cut to fit the context
    grounding: dict | None = None  # {path: {"start", "end", "match"} | {"match": "label"} | None} (grounding.py)
    confidence: dict | None = None  # {path: probability of the tokens that wrote the value} (calibrated)
    confidence_uncalibrated: dict | None = None  # the same at temperature 1, where a calibration temperature is set
    dropped: list | None = None  # paths removed by grounding=drop_ungrounded or snap
    snapped: dict | None = None  # {path: the value the model wrote} for each value grounding=snap replaced
    tokens: list[int] | None = None  # the output's token ids, eos included (not in the output row)

    @property
    def reason(self) -> str | None:
        return self.error.split(":", 1)[0] if self.error else None

    def to_row(self) -> dict:
        def js(v):
            return None if v is None else json.dumps(v, ensure_ascii=False)
        return {"output": canonical_json(self.output) if self.output is not None else None, "valid": self.valid,
                "error": self.error, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "input_truncated": self.input_truncated, "grounding": js(self.grounding),
                "confidence": js(self.confidence), "confidence_uncalibrated": js(self.confidence_uncalibrated),
                "dropped": js(self.dropped), "snapped": js(self.snapped)}


@dataclass
class Extractor:
    """Text (+ optional per-item schema) -> validated JSON, in batches."""
    model: Any
    tokenizer: Any
    prompt: PromptBuilder
    cfg: DecodingConfig
    max_prompt_tokens: int = 448
    truncate_input: bool = True  # False: an over-long text is an `input_too_long` error instead of being cut
    grammar_cache_size: int = 256  # compiled grammars kept (LRU): a server sees a new schema with many requests
    temperature: float = 1.0  # confidence calibration: token log-probabilities at this temperature (the adapter's, calibration.temperature_of)
    _compiler: Any = None

    def __post_init__(self) -> None:
        # Bounded by entries here and by bytes inside xgrammar (its compiler cache is unlimited by default).
        self._compiled = functools.lru_cache(maxsize=self.grammar_cache_size)(self._compile)
        self._prefix = PrefixCache()
        self._drafter = Drafter(self.tokenizer)
        self._cost = PassCost.for_device(next(self.model.parameters()).device)  # then learnt from the passes
        self.stats = DecodeStats()

    @property
    def default_schema(self) -> dict | None:
        return self.prompt.schema

    def compiler(self):
        if self._compiler is None:

            vocab = self.model.config.vocab_size
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab,
                                                      stop_token_ids=[self.tokenizer.eos_token_id])
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
        return self._compiler

    def grammar(self, schema: dict):
        """Compiled grammar for `schema` (LRU-cached); SchemaError if the schema is invalid or unsupported."""
        # The cache key keeps the schema's property order, which is the grammar's: it fixes the order of the keys
        # (any_order=False) to the one the model was trained on (PromptBuilder.answer_text). A key-sorted key once
        # made every grammar alphabetical, and the model, forced off its trained order, put values under the wrong
        # keys: Restaurant-8k field F1 53 instead of 72 on 64 test records.
        return self._compiled(canonical_json(schema))

    def _compile(self, key: str):
        schema = json.loads(key)
        check_schema(schema)
        bad = unsupported_features(schema)
        if bad:
            raise SchemaError(f"unsupported JSON Schema feature: {', '.join(bad)} (the constrained decoder "
                              f"cannot enforce it)")
        b = bounded(schema, self.cfg.max_string_length, self.cfg.max_array_items)
        try:
            return self.compiler().compile_json_schema(
                json.dumps(b), any_whitespace=False, separators=(",", ":"), strict_mode=True, any_order=False)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError for unsupported keywords
            raise SchemaError(f"unsupported JSON Schema feature: {e}") from None

    def extract(self, texts: list[str], schemas: list[dict | None] | None = None,
                max_new_tokens: int | None = None, grounding: str | None = None,
                contexts: list | None = None) -> list[Result]:
        """One Result per text, in order, from one generate() call: the caller decides what a batch is
        (@serve.batch, the batch actor's token groups, `extract_in_batches`). `grounding`: the policy
        (default: decoding.grounding). `contexts`: per text, what it answers (object, string or None), shown in
        the prompt; grounding points into the text only."""
        schemas = schemas or [None] * len(texts)
        contexts = contexts or [None] * len(texts)
        max_new = max_new_tokens or self.cfg.max_new_tokens
        results: list[Result | None] = [None] * len(texts)
        rows: list[tuple[int, list[int], dict | None, bool]] = []
        for i, (text, schema, context) in enumerate(zip(texts, schemas, contexts)):
            schema = schema if schema is not None else self.default_schema
            enc = self.prompt.encode_prompt(self.tokenizer, text, schema, self.max_prompt_tokens, context)
            if enc.truncated and not self.truncate_input:
                results[i] = Result(None, False, "input_too_long: text exceeds the context budget of "
                                    f"{self.max_prompt_tokens} prompt tokens", input_tokens=len(enc.ids))
                continue
            rows.append((i, enc.ids, schema, enc.truncated))
        if rows:
            policy = grounding or self.cfg.grounding
            for (i, ids, schema, trunc), res in zip(rows, self._generate(rows, max_new, policy)):
                res.input_tokens, res.input_truncated = len(ids), trunc
                results[i] = res
                if res.valid:
                    apply_grounding(res, texts[i], schema, policy)
        return results  # type: ignore[return-value]

    def _generate(self, rows, max_new: int, policy: str) -> list[Result]:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        grammars = None
        if self.cfg.constrained:
            if any(r[2] is None for r in rows):
                raise SchemaError("constrained decoding needs a schema: none given and the model has none")
            grammars = [self.grammar(r[2]) for r in rows]
        common = dict(max_new=max_new, eos_id=eos, pad_id=pad, grammars=grammars,
                      vocab_size=self.model.config.vocab_size)
        common["temperature"] = self.temperature
        if self.cfg.engine == "generate":
            gen = reference_generate(self.model, [r[1] for r in rows], **common)
        else:
            gen = greedy_generate(self.model, [r[1] for r in rows], cost=self._cost,
                                  drafter=self._drafter if self.cfg.jump_forward else None,
                                  prefix=self._prefix if self.cfg.prefix_cache else None, **common)
        self.stats.add(gen)
        out = []
        raw = gen.raw_logprobs or gen.logprobs
        for toks, lps, lps1, r in zip(gen.tokens, gen.logprobs, raw, rows):
            res = self._finish(toks, r[2], eos, pad, max_new)
            res.tokens = toks[:res.output_tokens]
            if res.valid and policy != "off":  # the call's policy, not only the config's
                res.confidence = self._confidence(res, toks, lps, r[2])
                if self.temperature != 1.0:
                    res.confidence_uncalibrated = self._confidence(res, toks, lps1, r[2])
            out.append(res)
        return out

    def weights_changed(self) -> None:
        """Call after changing the model's weights in place: the cached prompt prefix was computed with the old."""
        self._prefix = PrefixCache()

    def _confidence(self, res: Result, toks: list[int], logprobs: list[float], schema: dict | None) -> dict:
        body = toks[:res.output_tokens]
        ends = [len(self.tokenizer.decode(body[:k + 1], skip_special_tokens=True)) for k in range(len(body))]
        return confidence(res.raw, res.output, schema, ends, logprobs)

    def _finish(self, toks: list[int], schema: dict | None, eos: int, pad: int, max_new: int) -> Result:
        ended = eos in toks
        if ended:
            toks = toks[: toks.index(eos)]
        toks = [t for t in toks if t != pad]
        raw = self.tokenizer.decode(toks, skip_special_tokens=True)
        n_out = len(toks) + int(ended)
        if not ended:
            return Result(None, False, f"truncated: no end of output within {max_new} new tokens", raw,
                          output_tokens=n_out)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            return Result(None, False, f"invalid_json: {e.msg} at column {e.colno}", raw, output_tokens=n_out)
        if schema is not None:
            msg = validation_error(obj, schema)
            if msg:
                return Result(None, False, f"schema_invalid: {msg}", raw, output_tokens=n_out)
        return Result(obj, True, None, raw, output_tokens=n_out)


def apply_grounding(res: Result, text: str, schema: dict | None, policy: str) -> None:
    """Add grounding to a valid result; under drop_ungrounded remove the free-text values not in the text; under
    snap first replace the values not copied from it by its nearest span, then remove those with none."""
    if policy == "off":
        res.confidence = res.confidence_uncalibrated = None
        return
    res.grounding = ground(res.output, text, schema)
    if policy == "snap":
        res.output, res.snapped = snap(res.output, res.grounding, text, schema)
        if res.snapped:
            res.grounding = ground(res.output, text, schema)
    if policy in ("drop_ungrounded", "snap"):
        keep = res.grounding if policy == "drop_ungrounded" else spans_of_whole_words(res.grounding, text)
        res.output, res.dropped, _ = drop_ungrounded(res.output, keep, schema)
        if res.dropped:
            res.grounding = ground(res.output, text, schema)  # list elements after a removed one moved up
            shifted = tuple(p.rsplit("[", 1)[0] + "[" for p in res.dropped if p.endswith("]"))
            kept = lambda p: p not in res.dropped and not p.startswith(shifted or ("\0",))  # noqa: E731
            res.confidence = {p: c for p, c in (res.confidence or {}).items() if kept(p)}
            if res.confidence_uncalibrated is not None:
                res.confidence_uncalibrated = {p: c for p, c in res.confidence_uncalibrated.items() if kept(p)}


def extract_in_batches(extractor: Extractor, texts: list[str], batch_size: int,
                       max_new_tokens: int | None = None, contexts: list | None = None) -> list[Result]:
    """For callers that batch by count (the dev decoder, predict, chunks of one long text, benchmarks). Texts of
    similar length share a batch (less left padding); results come back in input order."""
    contexts = contexts or [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[Result | None] = [None] * len(texts)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        for i, r in zip(idx, extractor.extract([texts[i] for i in idx], max_new_tokens=max_new_tokens,
                                               contexts=[contexts[i] for i in idx])):
            out[i] = r
    return out  # type: ignore[return-value]
