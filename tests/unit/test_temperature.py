"""Confidence calibration: the temperature fitted on dev, stored in the adapter's manifest, applied where confidence is
reported."""
import pytest
import torch

from jsonextract.config import core as C
from jsonextract.data.records import read_jsonl
from conftest import R8K, SNIPS


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory, snips_schema):
    from jsonextract.models.loading import attach_lora, load_base, load_tokenizer
    from jsonextract.models.manifest import write_manifest
    out = tmp_path_factory.mktemp("adapter") / "a"
    torch.manual_seed(0)
    model = attach_lora(load_base(C.ModelConfig(name=str(tiny_model))), C.LoraSettings(r=4, alpha=8, dropout=0.0))
    model.save_pretrained(str(out))
    load_tokenizer(str(tiny_model)).save_pretrained(str(out))
    write_manifest(out, base_model=str(tiny_model), prompt=C.PromptConfig(), schema=snips_schema, config={})
    return out


def test_the_fit_lowers_the_values_nll_and_follows_the_logit_scale(monkeypatch):
    """The zero-shot SmolLM2 base on Restaurant-8k dev: valid outputs, some values right, some wrong. The fitted
    temperature lowers the NLL of the values' rightness; with logits three times as large it is three times as large."""
    from jsonextract.models.base import DEFAULT_DIR, ensure_base
    from jsonextract.decoding.extractor import Extractor
    from jsonextract.models.inference import load_for_inference
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.training import temperature
    from jsonextract.training.temperature import Sample, fit_temperature, value_nll, value_samples
    from conftest import ROOT

    lm = load_for_inference(C.ModelConfig(name=str(ensure_base(ROOT / DEFAULT_DIR)), merged_cache="",
                                          inference_attention="sdpa"), None)
    ex = Extractor(lm.model, lm.tokenizer, PromptBuilder(C.PromptConfig(), load_schema(R8K / "schema.json")),
                   C.DecodingConfig(max_new_tokens=64))
    records = [r for r in read_jsonl(R8K / "dev.jsonl") if r.ok][::20][:32]
    # Beside each output's choices, the same positions with logits three times as large.
    tripled, choices = [], temperature.choices

    def and_tripled(rows):
        tripled.append(choices([(i, z * 3, k) for i, z, k in rows]))
        return choices(rows)

    monkeypatch.setattr(temperature, "choices", and_tripled)
    samples = value_samples(ex, records)
    rights = [ok for s in samples for ok in s.right.values()]
    assert samples and any(rights) and not all(rights), rights
    entry = fit_temperature(samples)
    assert entry["values"] == len(rights) and entry["dev_value_nll"] <= entry["dev_value_nll_at_1"]
    t = entry["temperature"]
    assert value_nll(samples, 1 / t)[0] == pytest.approx(entry["dev_value_nll"], rel=1e-3)  # t is rounded
    sharp = [Sample(s.raw, s.output, s.schema, s.ends, c, s.right) for s, c in zip(samples, tripled)]
    assert fit_temperature(sharp)["temperature"] == pytest.approx(3 * t, rel=0.1)


def test_a_choices_log_probabilities_match_the_masked_softmax_at_every_grid_temperature():
    """The fit reads a position's log-probability from its binned logits (temperature.Choice); it must equal the
    softmax over the allowed tokens, for narrow and wide logit ranges, a few or thousands of allowed tokens."""
    from jsonextract.training.temperature import INVERSE_GRID, Sample, ScoredValues, choices

    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, (scale, allowed) in enumerate([(1.0, 2), (5.0, 40), (20.0, 3000), (60.0, 5000)]):
        z = torch.randn(6000, generator=gen) * scale
        z[torch.randperm(6000, generator=gen)[allowed:]] = float("-inf")
        token = int(torch.nonzero(torch.isfinite(z))[-1])
        rows.append((i, z, token))
    sample = Sample('{"a":"x"}', {"a": "x"}, None, [2, 4, 6, 9], choices(rows), {"a": True})
    values = ScoredValues([sample])
    for beta in (INVERSE_GRID[0], 1.0, INVERSE_GRID[-1]):
        want = torch.stack([torch.log_softmax(z.double() * beta, 0)[t] for _, z, t in rows])
        assert torch.allclose(values.logprobs(beta), want, rtol=1e-6, atol=1e-9), beta


def test_calibration_lands_in_the_manifest(tiny_adapter):
    from jsonextract.models.manifest import read_manifest
    from jsonextract.training.temperature import calibrate_adapter
    from jsonextract.models.manifest import temperature_of

    entry = calibrate_adapter(str(tiny_adapter), C.ModelConfig(merged_cache=""), C.DecodingConfig(max_new_tokens=48),
                              str(SNIPS / "dev.jsonl"), 16)
    assert entry["records"] <= 16 and read_manifest(tiny_adapter)["calibration"] == entry
    assert temperature_of(read_manifest(tiny_adapter)) == entry["temperature"]
    assert temperature_of({"calibration": {"temperature": -1}}) == temperature_of({}) == 1.0


def test_temperature_changes_the_confidence_not_the_output(tiny_adapter):
    from jsonextract.decoding.extractor import Extractor
    from jsonextract.models.inference import load_for_inference
    from jsonextract.data.prompt import PromptBuilder

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
        assert "confidence_uncalibrated" in two[0].to_row()
