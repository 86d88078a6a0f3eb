"""Grounding (where each value is in the text) and confidence (how sure the decoder was), on known cases and on
the real decoder with a model output made to disagree with its text."""
import pytest

from jsonextract.decoding.grounding import drop_ungrounded, ground, leaf_spans
from jsonextract.data.schema import validation_error

SCHEMA = {"type": "object", "properties": {
    "intent": {"type": "string", "enum": ["PlayMusic", "BookRestaurant"]},
    "people": {"type": "integer"},
    "slots": {"type": "object", "properties": {
        "artist": {"type": "string"}, "track": {"type": "string"}, "city": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}}}}},
    "required": ["intent"]}


def spans(text, g):
    return {p: text[s["start"]:s["end"]] for p, s in g.items() if s and "start" in s}


def test_exact_normalized_fuzzy_label_and_missing():
    text = "Play  Blue in-Green by Miles Davis, then Kind of Blue, for 4 people in Pariss"
    out = {"intent": "PlayMusic", "people": 4, "slots": {"artist": "Miles Davis", "track": "blue in green",
                                                         "city": "Paris", "tags": ["kind of blue", "tokyo"]}}
    g = ground(out, text, SCHEMA)
    assert g["intent"] == {"match": "label"} and g["people"] == {"match": "label"}
    assert g["slots.artist"]["match"] == "exact" and g["slots.track"]["match"] == "normalized"
    assert g["slots.tags[0]"]["match"] == "normalized" and g["slots.tags[1]"] is None
    assert g["slots.city"]["match"] == "exact"  # "Paris" is inside "Pariss": an exact substring
    assert spans(text, g) == {"slots.artist": "Miles Davis", "slots.track": "Blue in-Green",
                              "slots.city": "Paris", "slots.tags[0]": "Kind of Blue"}
    fuzzy = ground({"slots": {"artist": "miles davies"}}, text, SCHEMA)["slots.artist"]
    assert fuzzy["match"] == "fuzzy" and "Miles Davis" in text[fuzzy["start"] - 1:fuzzy["end"] + 1]
    assert ground({"slots": {"city": "Rome"}}, text, SCHEMA)["slots.city"] is None  # short: no fuzzy guess


def test_repeated_value_takes_the_occurrence_nearest_the_previous_field():
    text = "jazz by Miles Davis. Later: Kind of Blue by Miles Davis"
    out = {"slots": {"track": "Kind of Blue", "artist": "Miles Davis"}}
    g = ground(out, text, SCHEMA)
    assert g["slots.artist"]["start"] == text.rindex("Miles Davis")


def test_drop_ungrounded_keeps_the_output_schema_valid():
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"},
                                               "c": {"type": "array", "items": {"type": "string"}}},
              "required": ["a"], "additionalProperties": False}
    out = {"a": "zzz", "b": "yyy", "c": ["here", "xxx", "there"]}
    g = ground(out, "here and there", schema)
    new, dropped, kept = drop_ungrounded(out, g, schema)
    assert new == {"a": "zzz", "c": ["here", "there"]} and dropped == ["b", "c[1]"] and kept == ["a"]
    assert validation_error(new, schema) is None and out["b"] == "yyy"  # the input is not changed


def test_leaf_spans_are_the_canonical_json():
    text, s = leaf_spans({"a": "x\"y", "b": [1, None, "é"], "c": {"d": True}}, None)
    assert text == '{"a":"x\\"y","b":[1,null,"é"],"c":{"d":true}}'
    assert text[slice(*s["a"])] == 'x\\"y' and text[slice(*s["b[2]"])] == "é" and text[slice(*s["c.d"])] == "true"
    assert "b[1]" not in s


@pytest.mark.parametrize("policy", ["annotate", "drop_ungrounded"])
def test_decoder_output_that_disagrees_with_the_text_is_flagged(tiny_model, policy):
    """Patterns make the untrained model write "paris" (in the text) and "tokyo" (not in it). The grammar keeps the
    schema's key order: with the optional "to" last, the untrained model writes it."""
    from jsonextract.config import core as C
    from jsonextract.decoding.extractor import Extractor
    from jsonextract.models.loading import load_base, load_tokenizer
    from jsonextract.data.prompt import PromptBuilder

    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^paris$"},
                                               "mode": {"type": "string", "enum": ["air", "rail"]},
                                               "to": {"type": "string", "pattern": "^tokyo$"}},
              "required": ["city", "mode"], "additionalProperties": False}
    ex = Extractor(load_base(C.ModelConfig(name=str(tiny_model))), load_tokenizer(str(tiny_model)),
                   PromptBuilder(C.PromptConfig(), schema), C.DecodingConfig(max_new_tokens=40))
    text = "We fly from Paris tomorrow."
    res = ex.extract([text], grounding=policy)[0]
    assert res.valid, res.error
    assert res.grounding["city"] == {"start": 12, "end": 17, "match": "normalized"}
    assert res.grounding["mode"] == {"match": "label"}
    assert all(0.0 <= p <= 1.0 for p in res.confidence.values()) and {"city", "mode"} <= set(res.confidence)
    if policy == "annotate":
        assert res.output["to"] == "tokyo" and res.grounding["to"] is None and not res.dropped
    else:
        assert "to" not in res.output and res.dropped == ["to"] and "to" not in res.confidence
        assert validation_error(res.output, schema) is None
    row = res.to_row()
    assert row["grounding"] and row["confidence"]  # batch rows carry them as JSON columns


def test_grounding_metrics_from_result_rows():
    """Precision of grounded vs ungrounded values, the drop_ungrounded counterfactual and calibration, computed
    from batch rows and gold targets by hand-checkable counts."""
    import json
    from jsonextract.evaluation.calibration import grounding_metrics

    rows = [
        ({"valid": True, "output": json.dumps({"intent": "PlayMusic", "slots": {"artist": "miles", "album": "x"}}),
          "grounding": json.dumps({"intent": {"match": "label"}, "slots.artist": {"start": 0, "end": 5, "match": "exact"},
                                   "slots.album": None}),
          "confidence": json.dumps({"intent": 0.99, "slots.artist": 0.9, "slots.album": 0.3})},
         {"intent": "PlayMusic", "slots": {"artist": "Miles"}}),
        ({"valid": False, "output": None, "grounding": None, "confidence": None}, {"intent": "AddToPlaylist"}),
    ]
    m = grounding_metrics(rows)
    assert m["free_text_values"] == 2 and m["grounded_share"] == 0.5
    assert m["precision_grounded"] == 1.0 and m["precision_ungrounded"] == 0.0
    assert m["annotate"]["precision"] == 2 / 3 and m["drop_ungrounded"]["precision"] == 1.0
    assert m["annotate"]["recall"] == m["drop_ungrounded"]["recall"] == 2 / 3  # the wrong album cost no recall
    by_bucket = {b["bucket"]: b for b in m["calibration"]}
    assert by_bucket["[0.00, 0.50)"]["n"] == 1 and by_bucket["[0.00, 0.50)"]["accuracy"] == 0.0
    assert by_bucket["[0.95, 1.00]"]["accuracy"] == 1.0
    assert abs(m["expected_calibration_error"] - (0.3 + 0.1 + 0.01) / 3) < 1e-9
    assert grounding_metrics([({"valid": True, "output": "{}", "grounding": None}, {})]) is None


def test_static_review_page_of_a_batch_output(tmp_path):
    import json
    from jsonextract.errors import UserError
    from jsonextract.evaluation.view import main

    out = tmp_path / "out"
    out.mkdir()
    text = "play <b>jazz</b> by Miles Davis"
    row = {"id": "a", "valid": True, "output": json.dumps({"slots": {"artist": "miles davis", "album": "Kind of Blue"}}),
           "grounding": json.dumps({"slots.artist": {"start": 20, "end": 31, "match": "normalized"}, "slots.album": None}),
           "confidence": json.dumps({"slots.artist": 0.8}), "error": None}
    (out / "part-0.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({"id": "b", "valid": False, "output": None,
                                                                           "error": "truncated"}) + "\n")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": text}) + "\n" + json.dumps({"id": "b", "text": "x"}) + "\n")
    page = tmp_path / "review.html"
    assert main([str(out), "--input", str(inp), "--out", str(page)]) == 0
    html = page.read_text()
    assert '<mark class="normalized" data-path="slots.artist" title="slots.artist (normalized) · confidence 0.80">Miles Davis</mark>' in html
    assert "&lt;b&gt;jazz&lt;/b&gt;" in html and "<b>jazz" not in html  # the text is escaped
    assert "not in the text: slots.album" in html and "truncated" in html
    with pytest.raises(UserError):  # the command prints it as one line, exit 2
        main([str(tmp_path / "nope"), "--input", str(inp)])
