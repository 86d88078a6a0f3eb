"""Confidence calibration: one temperature per adapter, fitted on dev after training and stored in its manifest.

A value's confidence is the geometric-mean probability of the tokens that wrote it, under the grammar-masked
distribution (grounding.confidence). Dividing the logits by one temperature T changes every such probability
and no choice (the argmax does not move), so outputs stay the same and only the reported confidence changes.

The fit: the adapter decodes dev records as the jobs do; each valid output's tokens are fed back (teacher
forcing) and, at every position where the grammar allowed more than one token, the masked logits give the
token's log-probability at any temperature. For each T of a grid, every predicted value gets its confidence,
and T is the one that minimises the negative log-likelihood of the values being right (a value is right when
its path and normalised value are in the gold object, as the field metrics count it). The manifest records
`calibration: {"temperature": T, "dev_value_nll_at_1", "dev_value_nll", "dev_ece_at_1", "dev_ece", "values",
"records"}`; the batch job, Serve and predict read it (temperature_of) and report confidences at T.

The gold answers' token NLL is not the objective: on the SNIPS main job it chose T = 0.91 (sharper), while the
values were overconfident (docs/experiments.md): most of a gold answer's tokens are easy, and the errors that
matter are whole values written with confidence.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonextract.config.core import prompt_budget
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.records import Example, pad_batch, read_jsonl, spread
from jsonextract.data.schema import flatten
from jsonextract.decoding.extractor import Extractor, extract_in_batches
from jsonextract.decoding.grounding import confidence
from jsonextract.evaluation.calibration import _leaf_values, _pair, calibration_table
from jsonextract.lazy import lazy
from jsonextract.models.inference import load_for_inference
from jsonextract.models.manifest import MANIFEST

torch = lazy("torch")
xgr = lazy("xgrammar")

# 1/T from 0.1 to 2.0: T from 0.5 to 10, at most 5% apart near T = 1.
INVERSE_GRID = tuple(round(0.1 + 0.025 * i, 4) for i in range(77))


@dataclass
class Sample:
    """One valid dev output: what a value's confidence at any temperature is computed from."""
    raw: str
    output: Any
    schema: dict | None
    ends: list[int]  # character end of each output token in `raw`
    choices: list[tuple[int, Any, int]]  # (token index, masked logits row, the token) where the grammar allowed several
    right: dict[str, bool]  # per value path: is the value right


def value_samples(extractor, records: list, batch_size: int = 16) -> list[Sample]:
    """Decode `records` with `extractor` (at temperature 1) and collect a Sample per valid output with values."""
    extractor.temperature = 1.0
    results = extract_in_batches(extractor, [r.text for r in records], batch_size,
                                 contexts=[r.context for r in records])
    tok, model = extractor.tokenizer, extractor.model
    schema = extractor.default_schema
    todo = [(r, res) for r, res in zip(records, results) if res.valid and res.tokens and _leaf_values(res.output)]
    vocab = model.config.vocab_size
    mask = xgr.allocate_token_bitmask(1, vocab)
    device = next(model.parameters()).device
    samples = []
    for k in range(0, len(todo), batch_size):
        chunk = todo[k:k + batch_size]
        prompts = [extractor.prompt.encode_prompt(tok, r.text, schema, extractor.max_prompt_tokens, r.context).ids
                   for r, _ in chunk]
        b = pad_batch([Example(p + res.tokens, [-100] * len(p) + res.tokens) for p, (_, res) in zip(prompts, chunk)],
                      tok.pad_token_id)
        with torch.inference_mode():
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        for row, (p, (rec, res)) in enumerate(zip(prompts, chunk)):
            matcher = xgr.GrammarMatcher(extractor.grammar(schema))
            choices = []
            for i, t in enumerate(res.tokens):
                matcher.fill_next_token_bitmask(mask, 0)
                z = logits[row, len(p) + i - 1, :vocab].float().cpu().unsqueeze(0)
                xgr.apply_token_bitmask_inplace(z, mask)
                if int(torch.isfinite(z).sum()) > 1:
                    choices.append((i, z[0], t))
                if not matcher.accept_token(t):
                    break
            gold = flatten(rec.target)
            right = {path: _pair(path, v) in gold for path, v in _leaf_values(res.output).items()}
            ends = [len(tok.decode(res.tokens[:n + 1], skip_special_tokens=True)) for n in range(len(res.tokens))]
            samples.append(Sample(res.raw, res.output, schema, ends, choices, right))
    return samples


def confidences(sample: Sample, beta: float) -> dict[str, float]:
    """Per value path: its confidence with the logits multiplied by `beta` (= 1/T)."""
    lps = [0.0] * len(sample.ends)  # forced tokens: probability 1 at any temperature
    if sample.choices:
        z = torch.stack([c[1] for c in sample.choices]) * beta
        picked = z[torch.arange(len(sample.choices)), torch.tensor([c[2] for c in sample.choices])]
        for (i, _, _), lp in zip(sample.choices, (picked - torch.logsumexp(z, -1)).tolist()):
            lps[i] = lp
    return confidence(sample.raw, sample.output, sample.schema, sample.ends, lps)


def value_nll(samples: list[Sample], beta: float) -> tuple[float, float, int]:
    """(mean negative log-likelihood of the values' rightness, expected calibration error, values) at 1/T = beta."""
    total, scored = 0.0, []
    for s in samples:
        for path, c in confidences(s, beta).items():
            if path in s.right:
                c = min(max(c, 1e-6), 1 - 1e-6)
                total -= math.log(c) if s.right[path] else math.log(1 - c)
                scored.append((c, s.right[path]))
    return total / max(len(scored), 1), calibration_table(scored)[1] or 0.0, len(scored)


def fit_temperature(samples: list[Sample]) -> dict:
    """The calibration entry for the manifest (see the module docstring)."""
    at_one, ece_one, n = value_nll(samples, 1.0)
    if not n:
        return {"temperature": 1.0, "dev_value_nll_at_1": None, "dev_value_nll": None, "dev_ece_at_1": None,
                "dev_ece": None, "values": 0, "records": len(samples)}
    fits = {beta: value_nll(samples, beta) for beta in INVERSE_GRID}
    best = min(fits, key=lambda b: fits[b][0])
    return {"temperature": round(1 / best, 4), "dev_value_nll_at_1": at_one, "dev_value_nll": fits[best][0],
            "dev_ece_at_1": ece_one, "dev_ece": fits[best][1], "values": n, "records": len(samples)}


def calibrate_adapter(adapter_dir: str, model_cfg, decoding_cfg, dev_file: str, n_records: int) -> dict:
    """Fit the temperature of the adapter in `adapter_dir` on `dev_file` (n_records spread over it; 0 = all), with
    the model as inference loads it, and write it into the adapter's manifest. Returns the calibration entry."""
    # SDPA attention: the teacher-forced passes are whole sequences without a cache, which it computes as is.
    lm = load_for_inference(dataclasses.replace(model_cfg, inference_attention="sdpa"), adapter_dir)
    extractor = Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, lm.schema), decoding_cfg,
                          max_prompt_tokens=prompt_budget(model_cfg, decoding_cfg))
    records = spread([r for r in read_jsonl(dev_file, need_target=True) if r.ok], n_records)
    entry = fit_temperature(value_samples(extractor, records, decoding_cfg.batch_size))
    path = Path(adapter_dir) / MANIFEST
    manifest: dict[str, Any] = json.loads(path.read_text())
    manifest["calibration"] = entry
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return entry
