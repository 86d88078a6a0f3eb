"""Confidence calibration: one temperature per adapter, fitted on dev after training and stored in its manifest.

A value's confidence is the geometric-mean probability of the tokens that wrote it, under the grammar-masked
distribution (grounding.confidence). A fine-tuned model's token probabilities are sharper than its accuracy;
dividing the logits by one temperature T > 1 softens them without changing any choice (the argmax does not
move), so outputs stay the same and only the reported confidence changes.

The fit: the dev records' gold answers are fed to the model the adapter is served with (teacher forcing); at
every answer position where the grammar allows more than one token, the masked logits give the gold token's
negative log-likelihood at temperature T. The NLL is convex in 1/T, and T is the best point of a grid over 1/T.
The manifest records `calibration: {"temperature": T, "dev_nll_at_1", "dev_nll", "positions", "records"}`;
the batch job, Serve and predict read it (temperature_of) and report confidences at T.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# 1/T from 0.2 to 2.0: T from 0.5 to 5, 5% apart near T = 1.
INVERSE_GRID = tuple(round(0.2 + 0.05 * i, 4) for i in range(37))


def temperature_of(manifest: dict | None) -> float:
    """The adapter's calibration temperature (1 where it has none)."""
    cal = (manifest or {}).get("calibration") or {}
    t = cal.get("temperature", 1.0) if isinstance(cal, dict) else 1.0
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) and t > 0 else 1.0


def masked_nll(model, tokenizer, prompt, grammar_of, records: list, batch_size: int = 16) -> dict:
    """Per grid point 1/T: the summed NLL of the gold tokens at the positions with a choice, and their count."""
    import torch
    import xgrammar as xgr

    from .data import pad_batch

    sums = torch.zeros(len(INVERSE_GRID), dtype=torch.float64)
    betas = torch.tensor(INVERSE_GRID, dtype=torch.float32)
    positions = used = 0
    vocab = model.config.vocab_size
    examples = []
    for r in records:
        ex = prompt.encode_example(tokenizer, r.text, r.target, 10 ** 9, r.context)
        n_prompt = next(i for i, l in enumerate(ex.labels) if l != -100)
        examples.append((ex, n_prompt, grammar_of(r)))
    device = next(model.parameters()).device
    for k in range(0, len(examples), batch_size):
        chunk = examples[k:k + batch_size]
        b = pad_batch([e for e, _, _ in chunk], tokenizer.pad_token_id)
        with torch.inference_mode():
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        mask = xgr.allocate_token_bitmask(1, vocab)
        for row, (ex, n_prompt, grammar) in enumerate(chunk):
            matcher = xgr.GrammarMatcher(grammar)
            rows, gold = [], []
            for p in range(n_prompt, len(ex.input_ids)):
                token = ex.input_ids[p]
                matcher.fill_next_token_bitmask(mask, 0)
                z = logits[row, p - 1, :vocab].float().cpu().unsqueeze(0)
                xgr.apply_token_bitmask_inplace(z, mask)
                if int(torch.isfinite(z).sum()) > 1:
                    rows.append(z[0])
                    gold.append(token)
                if not matcher.accept_token(token):  # the gold answer leaves the (bounded) grammar: stop there
                    break
            if not rows:
                continue
            used += 1
            z = torch.stack(rows)  # [positions, vocab], -inf where the grammar forbids
            g = z[torch.arange(len(gold)), torch.tensor(gold)]
            for i, beta in enumerate(betas):
                sums[i] += float((torch.logsumexp(z * beta, -1) - g * beta).sum())
            positions += len(gold)
    return {"sums": sums.tolist(), "positions": positions, "records": used}


def fit_temperature(model, tokenizer, prompt, grammar_of, records: list, batch_size: int = 16) -> dict:
    """The calibration entry for the manifest (see the module docstring)."""
    nll = masked_nll(model, tokenizer, prompt, grammar_of, records, batch_size)
    if not nll["positions"]:
        return {"temperature": 1.0, "dev_nll_at_1": None, "dev_nll": None, "positions": 0, "records": 0}
    per = [s / nll["positions"] for s in nll["sums"]]
    best = min(range(len(per)), key=per.__getitem__)
    return {"temperature": round(1 / INVERSE_GRID[best], 4), "dev_nll_at_1": per[INVERSE_GRID.index(1.0)],
            "dev_nll": per[best], "positions": nll["positions"], "records": nll["records"]}


def calibrate_adapter(adapter_dir: str, model_cfg, decoding_cfg, dev_file: str, n_records: int,
                      max_length: int) -> dict:
    """Fit the temperature of the adapter in `adapter_dir` on `dev_file` (n_records spread over it; 0 = all), with
    the model as inference loads it, and write it into the adapter's manifest. Returns the calibration entry."""
    import dataclasses

    from .data import read_jsonl, spread
    from .decoding import Extractor
    from .model import MANIFEST, load_for_inference
    from .prompt import PromptBuilder

    # SDPA attention: the fit's forward passes are whole sequences without a cache, as in training.
    lm = load_for_inference(dataclasses.replace(model_cfg, inference_attention="sdpa"), adapter_dir)
    prompt = PromptBuilder(lm.prompt, lm.schema)
    extractor = Extractor(lm.model, lm.tokenizer, prompt, decoding_cfg, max_prompt_tokens=max_length)
    records = spread([r for r in read_jsonl(dev_file, need_target=True) if r.ok], n_records)
    entry = fit_temperature(lm.model, lm.tokenizer, prompt, lambda r: extractor.grammar(lm.schema), records)
    path = Path(adapter_dir) / MANIFEST
    manifest: dict[str, Any] = json.loads(path.read_text())
    manifest["calibration"] = entry
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return entry
