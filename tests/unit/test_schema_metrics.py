import json
import subprocess

import pytest

from jsonextract.evaluation.metrics import score_results
from jsonextract.data.schema import (SchemaError, bounded, check_schema, flatten, load_schema, order_like_schema,
                                validation_error)
from conftest import JSONEXTRACT, SNIPS


def test_invalid_schema_is_a_clear_error(tmp_path):
    with pytest.raises(SchemaError, match="type"):
        check_schema({"type": "objekt"})
    p = tmp_path / "s.json"
    p.write_text("{not json")
    with pytest.raises(SchemaError, match="line 1"):
        load_schema(p)


def test_validation_message_names_path(snips_schema):
    assert validation_error({"intent": "PlayMusic", "slots": {}}, snips_schema) is None
    msg = validation_error({"intent": "PlayMusic", "slots": {"colour": "red"}}, snips_schema)
    assert msg and "slots" in msg


def test_flatten_paths_sets_and_nulls():
    obj = {"intent": " PlayMusic ", "slots": {"artist": ["A", "b "], "year": None}, "n": 3}
    assert flatten(obj) == {("intent", "playmusic"), ("slots.artist", "a"), ("slots.artist", "b"), ("n", "3")}


def test_bounded_adds_limits_only_where_missing():
    s = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string", "maxLength": 3},
                                          "c": {"type": "array", "items": {"type": ["string", "null"]}}}}
    b = bounded(s, 10, 4)
    assert b["properties"]["a"]["maxLength"] == 10 and b["properties"]["b"]["maxLength"] == 3
    assert b["properties"]["c"]["maxItems"] == 4 and b["properties"]["c"]["items"]["maxLength"] == 10
    assert "maxLength" not in s["properties"]["a"]  # the original is untouched


def test_order_like_schema_follows_properties_and_refs(snips_schema):
    target = {"slots": {"playlist": "x", "artist": "y"}, "intent": "AddToPlaylist"}
    ordered = order_like_schema(target, snips_schema)
    assert list(ordered) == ["intent", "slots"] and list(ordered["slots"]) == ["artist", "playlist"]


def test_metrics_hand_computed():
    gold = [{"intent": "A", "slots": {"x": "1", "y": "2"}}, {"intent": "B", "slots": {}}]
    pred = [{"intent": "a", "slots": {"x": "1", "y": "3", "z": "4"}}, None]
    m = score_results(zip(pred, gold))
    # record 1: intent hit, x hit, y wrong (1 fp + 1 fn), z spurious (1 fp); record 2 invalid: intent missed (1 fn)
    assert (m["groups"]["intent"]["tp"], m["groups"]["intent"]["fn"]) == (1, 1)
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    assert m["json_valid_rate"] == 0.5 and m["exact_match"] == 0.0
    assert m["per_field"]["slots.y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 1}


def test_null_on_both_sides_is_not_a_hit():
    m = score_results([({"a": None}, {"a": None})])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["exact_match"] == 1.0


def _evaluate(pred, gold, out):
    return subprocess.run([JSONEXTRACT, "evaluate", f"predictions={pred}",
                           f"gold={gold}", f"out={out}"], capture_output=True, text=True, timeout=120)


def test_evaluate_cli_gold_against_itself_and_empty(tmp_path):
    gold = SNIPS / "test.jsonl"
    rows = [json.loads(l) for l in gold.read_text().splitlines()]
    perfect = tmp_path / "perfect.jsonl"
    perfect.write_text("\n".join(json.dumps({"id": r["id"], "output": json.dumps(r["target"])}) for r in rows))
    r = _evaluate(perfect, gold, tmp_path / "m1.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m1.json").read_text())
    assert m["f1"] == 1.0 and m["exact_match"] == 1.0 and m["schema_valid_rate"] == 1.0
    assert "field F1" in r.stdout and "slots.artist" in r.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n".join(json.dumps({"id": r["id"], "output": "{}"}) for r in rows))
    r = _evaluate(empty, gold, tmp_path / "m2.json")
    m = json.loads((tmp_path / "m2.json").read_text())
    assert m["recall"] == 0.0 and m["json_valid_rate"] == 1.0 and m["schema_valid_rate"] == 0.0


def test_evaluate_cli_bad_input_is_one_line_error(tmp_path):
    r = _evaluate(tmp_path / "nope.jsonl", SNIPS / "test.jsonl", tmp_path / "m.json")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_unenforceable_keywords_are_found_but_property_names_are_not():
    from jsonextract.data.schema import unsupported_features
    s = {"type": "object", "properties": {"not": {"type": "string"}, "x": {"anyOf": [{"not": {"type": "null"}}]}},
         "if": {"required": ["x"]}}
    assert unsupported_features(s) == ["if at /", "not at /properties/x/anyOf/0"]
    assert unsupported_features({"type": "object", "properties": {"not": {"type": "string"}}}) == []


def test_one_scorer_for_decoder_results_result_rows_and_plain_objects():
    from jsonextract.decoding.extractor import Result
    from jsonextract.evaluation.metrics import judge
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    assert judge(Result({"a": "x"}, True, None), schema) == ({"a": "x"}, True, True)
    assert judge(Result(None, False, "truncated: ..."), schema) == (None, False, False)
    assert judge({"id": "1", "output": '{"a": "x"}', "valid": True}, schema) == ({"a": "x"}, True, True)
    assert judge({"id": "1", "output": '{"a": 3}', "valid": True}, schema) == ({"a": 3}, True, False)
    assert judge({"id": "1", "output": "{not json"}, schema) == (None, False, False)
    assert judge({"output": "a field called output"}) == ({"output": "a field called output"}, True, True)
    assert judge(None) == (None, False, False)
    m = score_results([(Result({"a": "x"}, True, None), {"a": "x"}), ({"id": "2", "output": None}, {"a": "y"})])
    assert m["n"] == 2 and m["exact_match"] == 0.5 and m["schema_valid_rate"] == 0.5
