"""Grounding (where each value is in the text) and confidence (how sure the decoder was), on known cases and on
the real decoder with a model output made to disagree with its text."""
import pytest

from jsonextract.decoding.grounding import drop_ungrounded, ground, leaf_spans, nearest_span, snap
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


def test_snap_replaces_values_not_copied_from_the_text_by_the_nearest_whole_words():
    schema = {"type": "object", "properties": {
        "first": {"type": "string"}, "last": {"type": "string"}, "title": {"type": "string"},
        "when": {"type": "string"}, "mode": {"type": "string", "enum": ["cancel", "book"]},
        "code": {"type": "string", "pattern": "^[a-z]+$"}}}
    text = "Cancel the table for Owen Au, the Parables for Wooden Ears party."
    out = {"first": "Ovenn", "last": "U", "title": "Pables for Wooden Ears", "when": "this year", "mode": "cancel",
           "code": "table"}
    g = ground(out, text, schema)
    assert g["first"] is None and g["last"]["match"] == "normalized" and g["title"]["match"] == "fuzzy"
    new, snapped = snap(out, g, text, schema)
    # misspelt, inside a word ("U" of "Au"), cut short by the fuzzy match: each becomes whole words of the text
    assert new["first"] == "Owen" and new["last"] == "Au" and new["title"] == "Parables for Wooden Ears"
    assert snapped == {"first": "Ovenn", "last": "U", "title": "Pables for Wooden Ears"}
    assert new["when"] == "this year"  # nothing close: left for the caller to drop
    assert new["mode"] == "cancel" and new["code"] == "table"  # labels, and values already copied, stay
    assert out["first"] == "Ovenn"  # the input is not changed
    assert nearest_span("Wooden Ears.", text)[1:] == (text.index("Wooden"), text.index(" party"))
    assert nearest_span("x", "  ...  ") is None


def test_snap_makes_no_replacement_the_schema_rejects():
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]+$"}}}
    out = {"name": "ovenn"}
    new, snapped = snap(out, ground(out, "for Owen please", schema), "for Owen please", schema)
    assert new == out and snapped == {}


def test_snap_policy_on_a_result_drops_what_it_cannot_snap_and_keeps_confidence_aligned():
    from jsonextract.decoding.extractor import Result, apply_grounding
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"},
                                               "c": {"type": "string"}}}
    text = "Book it for Kimberley Babat."
    res = Result({"a": "Kimmerley", "b": "Babat", "c": "tomorrow"}, True, None,
                 confidence={"a": 0.5, "b": 0.9, "c": 0.4})
    apply_grounding(res, text, schema, "snap")
    assert res.output == {"a": "Kimberley", "b": "Babat"} and res.snapped == {"a": "Kimmerley"}
    assert res.dropped == ["c"] and res.confidence == {"a": 0.5, "b": 0.9}
    assert {p: text[g["start"]:g["end"]] for p, g in res.grounding.items()} == res.output
    row = res.to_row()
    assert row["snapped"] == '{"a": "Kimmerley"}' and row["dropped"] == '["c"]'


def test_leaf_spans_are_the_canonical_json():
    text, s = leaf_spans({"a": "x\"y", "b": [1, None, "é"], "c": {"d": True}}, None)
    assert text == '{"a":"x\\"y","b":[1,null,"é"],"c":{"d":true}}'
    assert text[slice(*s["a"])] == 'x\\"y' and text[slice(*s["b[2]"])] == "é" and text[slice(*s["c.d"])] == "true"
    assert "b[1]" not in s


@pytest.mark.parametrize("policy", ["annotate", "drop_ungrounded", "snap"])
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
        assert not res.snapped  # "paris" is the text's word; "tokyo" is like none of them
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
        ({"valid": True, "output": json.dumps({"intent": "PlayMusic"}), "grounding": json.dumps(
            {"intent": {"match": "label"}}), "confidence": json.dumps({"intent": 0.99}), "snapped": None,
          "dropped": json.dumps(["slots.album"])}, {"intent": "PlayMusic"}),
    ]
    m = grounding_metrics(rows)
    assert m["snapped"] == 0 and m["dropped"] == 1  # what the run's own policy did
    assert m["free_text_values"] == 2 and m["grounded_share"] == 0.5
    assert m["precision_grounded"] == 1.0 and m["precision_ungrounded"] == 0.0
    assert m["annotate"]["precision"] == 3 / 4 and m["drop_ungrounded"]["precision"] == 1.0
    assert m["annotate"]["recall"] == m["drop_ungrounded"]["recall"] == 3 / 4  # the wrong album cost no recall
    by_bucket = {b["bucket"]: b for b in m["calibration"]}
    assert by_bucket["[0.00, 0.50)"]["n"] == 1 and by_bucket["[0.00, 0.50)"]["accuracy"] == 0.0
    assert by_bucket["[0.95, 1.00]"]["accuracy"] == 1.0
    assert abs(m["expected_calibration_error"] - (0.3 + 0.1 + 0.01 + 0.01) / 4) < 1e-9
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
