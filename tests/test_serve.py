"""The Serve app for real: Ray Serve on 127.0.0.1, real HTTP, the real OpenAI client."""
import concurrent.futures as cf
import json

import pytest
import requests

from jsonextract.schema import validation_error
from conftest import SNIPS

PORT = 8011
URL = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def app(ray_session, tiny_model, snips_schema):
    from ray import serve
    from serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app({"model": {"name": str(tiny_model), "max_length": 256}, "schema": str(SNIPS / "schema.json"),
                         "decoding": {"max_new_tokens": 40}, "max_batch_size": 16, "max_new_tokens_limit": 128}),
              name="jsonextract", route_prefix="/")
    yield URL
    serve.shutdown()


def post(path: str, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(URL + path, data=data, headers={"content-type": "application/json"}, timeout=120, **kw)


def test_valid_request_validates_or_says_truncated(app, snips_schema):
    r = post("/extract", {"text": "play some jazz by miles davis"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"output", "valid", "error", "usage", "latency_ms"}
    if body["valid"]:
        assert validation_error(body["output"], snips_schema) is None
    else:
        assert body["output"] is None and body["error"].startswith("truncated")
    assert body["usage"]["input_tokens"] > 0 and body["usage"]["output_tokens"] > 0


def test_request_schema_and_batch_route(app):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = post("/extract/batch", [{"text": "yes", "schema": schema}, {"text": "play jazz"}])
    assert r.status_code == 200, r.text
    first, second = r.json()
    assert first["valid"] and isinstance(first["output"]["ok"], bool)
    assert "usage" in second


@pytest.mark.parametrize("body,status,reason", [
    ({"schema": {}}, 422, "text"),                       # missing text
    ({"text": ""}, 400, "non-empty"),                    # empty text
    ({"text": "   "}, 400, "non-empty"),                 # blank text
    ({"text": 12}, 422, "string"),                       # non-string text
    (b'{"text": "unterminated', 422, "JSON"),            # malformed JSON body
    ({"text": "play " * 400}, 413, "too long"),          # over the context limit
    ({"text": "x", "schema": {"type": "objekt"}}, 400, "invalid JSON Schema"),
    ({"text": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}, 400, "unsupported"),
    ({"text": "x", "max_new_tokens": 100000}, 400, "limit"),
    ({"text": "x", "max_new_tokens": 0}, 422, "greater"),
])
def test_bad_input_gets_4xx_with_reason(app, body, status, reason):
    r = post("/extract", body)
    assert r.status_code == status, r.text
    assert reason.lower() in r.text.lower()


def test_200_requests_at_concurrency_16(app):
    texts = [json.loads(l)["text"] for l in (SNIPS / "test.jsonl").read_text().splitlines()[:200]]

    def one(t):
        return post("/extract", {"text": t, "max_new_tokens": 24})

    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, texts, timeout=600))
    assert len(responses) == 200
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    assert all(r.json()["valid"] or r.json()["error"] for r in responses)


def test_openai_client_structured_output(app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0, timeout=120)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    import openai
    try:
        resp = client.chat.completions.create(
            model="jsonextract", messages=[{"role": "user", "content": "is it raining?"}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    except openai.APIStatusError as e:
        raise AssertionError(f"{e.status_code}: {e.response.text}") from None
    content = json.loads(resp.choices[0].message.content)
    assert content["answer"] in ("yes", "no") and resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0


def test_health_schema_and_openapi(app):
    assert requests.get(f"{URL}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{URL}/schema", timeout=30).json()["schema"]["properties"]["intent"]
    spec = requests.get(f"{URL}/openapi.json", timeout=30).json()
    assert {"/extract", "/extract/batch", "/v1/chat/completions", "/healthz", "/schema"} <= set(spec["paths"])
    assert requests.get(f"{URL}/docs", timeout=30).status_code == 200
