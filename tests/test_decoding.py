import json

import pytest

from jsonextract import config as C
from jsonextract.data import read_jsonl
from jsonextract.decoding import Extractor
from jsonextract.model import load_for_inference
from jsonextract.prompt import PromptBuilder
from jsonextract.schema import SchemaError, validation_error
from conftest import SNIPS


@pytest.fixture(scope="module")
def extractor(tiny_model, snips_schema):
    lm = load_for_inference(C.ModelConfig(name=str(tiny_model)), None)
    return Extractor(lm.model, lm.tokenizer, PromptBuilder(C.PromptConfig(), snips_schema),
                     C.DecodingConfig(max_new_tokens=48, batch_size=25))


def test_untrained_model_constrained_on_50_snips_texts(extractor, snips_schema):
    recs = [r for r in read_jsonl(SNIPS / "test.jsonl")][:50]
    results = extractor.extract([r.text for r in recs])
    assert len(results) == 50
    for res in results:
        if res.valid:
            assert res.error is None and validation_error(res.output, snips_schema) is None
            assert json.loads(res.raw) == res.output
        else:
            assert res.output is None and res.reason in ("truncated", "invalid_json", "schema_invalid")
    assert sum(r.valid for r in results) > 0  # the grammar does let an untrained model finish objects


def test_tiny_budget_reports_truncated(extractor):
    res = extractor.extract(["play some jazz"], max_new_tokens=3)[0]
    assert not res.valid and res.reason == "truncated" and res.output is None


def test_per_item_schema_and_invalid_schema(extractor):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    res = extractor.extract(["anything"], schemas=[schema])[0]
    assert res.valid and isinstance(res.output["ok"], bool)
    with pytest.raises(SchemaError):
        extractor.extract(["x"], schemas=[{"type": "nonsense"}])


def test_over_long_input_error_when_truncation_off(extractor):
    import dataclasses
    ex = dataclasses.replace(extractor, truncate_input=False, max_prompt_tokens=32)
    res = ex.extract(["play " * 100])[0]
    assert res.reason == "input_too_long"


def test_compiled_grammars_are_a_bounded_lru(extractor):
    import dataclasses
    ex = dataclasses.replace(extractor, grammar_cache_size=2)
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "boolean"}}, "required": [f"k{i}"],
                "additionalProperties": False} for i in range(3)]
    for s in schemas + schemas[:1]:
        ex.grammar(s)
    info = ex._compiled.cache_info()
    assert info.currsize == 2 and info.misses == 4  # the first schema was evicted by the third, compiled again
