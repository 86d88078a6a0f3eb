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
from jsonextract.decoding.grounding import value_tokens
from jsonextract.evaluation.calibration import _leaf_values, _pair, calibration_table
from jsonextract.lazy import lazy
from jsonextract.models.inference import load_for_inference
from jsonextract.models.manifest import MANIFEST

torch = lazy("torch")
xgr = lazy("xgrammar")

# 1/T from 0.1 to 2.0: T from 0.5 to 10, at most 5% apart near T = 1.
INVERSE_GRID = tuple(round(0.1 + 0.025 * i, 4) for i in range(77))


# Terms of exp's series kept per bin of logits (see Choice): |b * offset| <= 1 for b <= 2, so the rest is < 1e-5.
ORDER = 9


@dataclass
class Choice:
    """A position where the grammar allowed several tokens, reduced to what its log-probability at any inverse
    temperature b in the grid needs: log p = b * picked - log sum_i exp(b * d_i), with d_i = z_i - max z over the
    allowed tokens. The d_i are grouped in unit-wide bins around integer centres c; a bin's sum
    exp(b * c) * sum_i exp(b * e_i), |e_i| <= 1/2, equals exp(b * c) * sum_k b^k / k! * sum_i e_i^k, and the first
    ORDER moments give it to 1e-5 relative. A free-text position allows most of the vocabulary; as a few dozen bins,
    the fit over the whole grid is a few vectorised operations instead of an exponential per allowed token per
    grid point, and a sample no longer holds a vocabulary-sized row per choice."""
    index: int  # the token's index in the output
    picked: float  # the chosen token's logit minus the largest allowed logit
    centres: Any  # (bins,) float64 tensor: 0, -1, -2, ...; a bin may be empty
    moments: Any  # (bins, ORDER) float64 tensor: sum over the bin's tokens of (d - centre)^k


def choices(rows: list[tuple[int, Any, int]]) -> list[Choice]:
    """The Choices of one output, from (token index, grammar-masked logits row with -inf where disallowed, chosen
    token) per position; computed for all rows at once."""
    if not rows:
        return []
    z = torch.stack([r[1] for r in rows]).double()
    top = z.max(1).values
    row, col = torch.isfinite(z).nonzero(as_tuple=True)
    d = z[row, col] - top[row]
    k = torch.round(-d).long()  # the bin: centre -k
    powers = torch.ones(len(d), ORDER, dtype=torch.float64)
    powers[:, 1:] = (d + k).unsqueeze(1).expand(-1, ORDER - 1).cumprod(1)
    bins = int(k.max()) + 1
    moments = torch.zeros(len(rows) * bins, ORDER, dtype=torch.float64).index_add_(0, row * bins + k, powers)
    moments = moments.view(len(rows), bins, ORDER)
    centres = -torch.arange(bins, dtype=torch.float64)
    picked = (z[torch.arange(len(rows)), torch.tensor([r[2] for r in rows])] - top).tolist()
    return [Choice(i, p, centres, m) for (i, _, _), p, m in zip(rows, picked, moments)]


@dataclass
class Sample:
    """One valid dev output: what a value's confidence at any temperature is computed from."""
    raw: str
    output: Any
    schema: dict | None
    ends: list[int]  # character end of each output token in `raw`
    choices: list[Choice]  # the positions where the grammar allowed several tokens
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
            rows = []
            for i, t in enumerate(res.tokens):
                matcher.fill_next_token_bitmask(mask, 0)
                z = logits[row, len(p) + i - 1, :vocab].float().cpu().unsqueeze(0)
                xgr.apply_token_bitmask_inplace(z, mask)
                if int(torch.isfinite(z).sum()) > 1:
                    rows.append((i, z[0], t))
                if not matcher.accept_token(t):
                    break
            gold = flatten(rec.target)
            right = {path: _pair(path, v) in gold for path, v in _leaf_values(res.output).items()}
            ends = [len(tok.decode(res.tokens[:n + 1], skip_special_tokens=True)) for n in range(len(res.tokens))]
            samples.append(Sample(res.raw, res.output, schema, ends, choices(rows), right))
    return samples


class ScoredValues:
    """Every sample's scored values as flat tensors, so the fit at one inverse temperature is a few vectorised
    operations. A value's confidence is the geometric mean of the probabilities of the tokens that wrote it
    (grounding.confidence, rounded as reported); forced tokens have probability 1 at any temperature."""

    def __init__(self, samples: list[Sample]):
        centres, moments, rows_of, picked, at = [], [], [], [], []
        value_of, token_of, right = [], [], []
        tokens = 0
        for s in samples:
            for c in s.choices:
                rows_of.append(torch.full((len(c.centres),), len(picked), dtype=torch.long))
                centres.append(c.centres)
                moments.append(c.moments)
                picked.append(c.picked)
                at.append(tokens + c.index)
            for path, idx in value_tokens(s.raw, s.output, s.schema, s.ends).items():
                if path in s.right:
                    value_of += [len(right)] * len(idx)
                    token_of += [tokens + i for i in idx]
                    right.append(s.right[path])
            tokens += len(s.ends)
        f64 = torch.float64
        self.centres = torch.cat(centres) if centres else torch.zeros(0, dtype=f64)
        self.moments = torch.cat(moments) if moments else torch.zeros(0, ORDER, dtype=f64)
        self.rows_of = torch.cat(rows_of) if rows_of else torch.zeros(0, dtype=torch.long)
        self.picked, self.at = torch.tensor(picked, dtype=f64), torch.tensor(at, dtype=torch.long)
        self.value_of = torch.tensor(value_of, dtype=torch.long)
        self.token_of = torch.tensor(token_of, dtype=torch.long)
        self.right, self.tokens = torch.tensor(right, dtype=torch.bool), tokens
        self.size = torch.bincount(self.value_of, minlength=len(right)).to(f64)  # tokens per value
        self.series = torch.tensor([1 / math.factorial(k) for k in range(ORDER)], dtype=f64)

    def __len__(self) -> int:
        return len(self.right)

    def logprobs(self, beta: float) -> Any:
        """Every output token's log-probability (all samples' tokens in a row) with the logits multiplied by `beta`."""
        bins = torch.exp(beta * self.centres) * (self.moments @ (self.series * beta ** torch.arange(ORDER)))
        norm = torch.zeros(len(self.picked), dtype=torch.float64).index_add_(0, self.rows_of, bins)
        lps = torch.zeros(self.tokens, dtype=torch.float64)
        lps[self.at] = beta * self.picked - torch.log(norm)
        return lps

    def confidences(self, beta: float) -> Any:
        """Each value's reported confidence with the logits multiplied by `beta` (= 1/T)."""
        lps = self.logprobs(beta)
        mean = torch.zeros(len(self), dtype=torch.float64).index_add_(0, self.value_of, lps[self.token_of]) / self.size
        return torch.round(torch.exp(mean) * 1e4) / 1e4

    def nll(self, beta: float) -> tuple[float, float, int]:
        """(mean negative log-likelihood of the values' rightness, expected calibration error, values) at 1/T =
        beta."""
        if not len(self):
            return 0.0, 0.0, 0
        c = self.confidences(beta).clamp(1e-6, 1 - 1e-6)
        nll = -torch.where(self.right, torch.log(c), torch.log1p(-c)).mean().item()
        return nll, calibration_table(list(zip(c.tolist(), self.right.tolist())))[1] or 0.0, len(self)


def value_nll(samples: list[Sample], beta: float) -> tuple[float, float, int]:
    """(mean negative log-likelihood of the values' rightness, expected calibration error, values) at 1/T = beta."""
    return ScoredValues(samples).nll(beta)


def fit_temperature(samples: list[Sample]) -> dict:
    """The calibration entry for the manifest (see the module docstring)."""
    values = ScoredValues(samples)
    at_one, ece_one, n = values.nll(1.0)
    if not n:
        return {"temperature": 1.0, "dev_value_nll_at_1": None, "dev_value_nll": None, "dev_ece_at_1": None,
                "dev_ece": None, "values": 0, "records": len(samples)}
    fits = {beta: values.nll(beta) for beta in INVERSE_GRID}
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
