"""Confidence calibration: the temperature fitted on dev, stored in the adapter's manifest, applied where confidence
is reported."""
import json

import pytest
import torch

from jsonextract import config as C
from jsonextract.data import read_jsonl
from conftest import SNIPS


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory, snips_schema):
    from jsonextract.model import attach_lora, load_base, load_tokenizer, write_manifest
    out = tmp_path_factory.mktemp("adapter") / "a"
    torch.manual_seed(0)
    model = attach_lora(load_base(C.ModelConfig(name=str(tiny_model))), C.LoraSettings(r=4, alpha=8, dropout=0.0))
    model.save_pretrained(str(out))
    load_tokenizer(str(tiny_model)).save_pretrained(str(out))
    write_manifest(out, base_model=str(tiny_model), prompt=C.PromptConfig(), schema=snips_schema, config={})
    return out


def test_fitted_temperature_lowers_the_dev_nll_follows_the_logit_scale_and_lands_in_the_manifest(tiny_adapter):
    from jsonextract.decoding import Extractor
    from jsonextract.model import load_for_inference, read_manifest
    from jsonextract.prompt import PromptBuilder
    from jsonextract.temperature import calibrate_adapter, fit_temperature, temperature_of

    mcfg = C.ModelConfig(merged_cache="", inference_attention="sdpa")
    dcfg = C.DecodingConfig(max_new_tokens=48)
    entry = calibrate_adapter(str(tiny_adapter), mcfg, dcfg, str(SNIPS / "dev.jsonl"), 24, 256)
    assert entry["records"] == 24 and entry["positions"] > 24
    assert entry["dev_nll"] < entry["dev_nll_at_1"]  # a random model is not calibrated at 1
    assert temperature_of(read_manifest(tiny_adapter)) == entry["temperature"] != 1.0

    # logits three times as large (the final norm scaled): the fitted temperature is three times as large
    lm = load_for_inference(mcfg, str(tiny_adapter))
    prompt = PromptBuilder(lm.prompt, lm.schema)
    ex = Extractor(lm.model, lm.tokenizer, prompt, dcfg)
    records = [r for r in read_jsonl(SNIPS / "dev.jsonl") if r.ok][::30][:24]
    base = fit_temperature(lm.model, lm.tokenizer, prompt, lambda r: ex.grammar(lm.schema), records)
    with torch.no_grad():
        lm.model.get_decoder().norm.weight.mul_(3.0)
    sharp = fit_temperature(lm.model, lm.tokenizer, prompt, lambda r: ex.grammar(lm.schema), records)
    assert sharp["temperature"] == pytest.approx(3 * base["temperature"], rel=0.15)


def test_temperature_changes_the_confidence_not_the_output(tiny_adapter):
    from jsonextract.decoding import Extractor
    from jsonextract.model import load_for_inference
    from jsonextract.prompt import PromptBuilder

    lm = load_for_inference(C.ModelConfig(merged_cache=""), str(tiny_adapter))
    texts = [r.text for r in read_jsonl(SNIPS / "test.jsonl") if r.ok][:8]
    runs = {}
    for t in (1.0, 2.0):
        for engine in ("loop", "generate"):
            ex = Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, lm.schema),
                           C.DecodingConfig(max_new_tokens=48, engine=engine), temperature=t)
            runs[t, engine] = ex.extract(texts)
    for engine in ("loop", "generate"):
        one, two = runs[1.0, engine], runs[2.0, engine]
        assert [r.raw for r in one] == [r.raw for r in two]
        valid = [(a, b) for a, b in zip(one, two) if a.valid and a.confidence]
        assert valid
        for a, b in valid:
            assert a.confidence_uncalibrated is None and b.confidence_uncalibrated == pytest.approx(a.confidence)
            assert set(b.confidence) == set(a.confidence)
            # a sharp token gets softer at T=2; a forced one (probability 1) stays at 1
            assert all(b.confidence[p] <= a.confidence[p] + 1e-6 for p in a.confidence)
        assert any(b.confidence[p] < a.confidence[p] - 1e-3 for a, b in valid for p in a.confidence)
        row = two[0].to_row()
        assert "confidence_uncalibrated" in row
