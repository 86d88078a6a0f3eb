"""One Serve deployment, many adapters: a registry folder with a SNIPS and a Restaurant-8k adapter (each trained
a few steps by the training job) over the same base, interleaved requests each answered with its own adapter's
schema, at most one adapter held per replica (so they are swapped in and out under load), and API keys."""
import concurrent.futures as cf
import json

import pytest
import requests
import torch

from jsonextract.data.schema import load_schema, validation_error
from conftest import ROOT, SNIPS, train_adapter

RESTAURANT = ROOT / "data" / "restaurant8k"
PORT = 8014
URL = f"http://127.0.0.1:{PORT}"
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def registry(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    runs = tmp_path_factory.mktemp("adapter-runs")
    train_adapter(tiny_model, root / "snips", SNIPS, "snips", runs)
    train_adapter(tiny_model, root / "restaurant", RESTAURANT, "restaurant", runs)
    (root / "not-an-adapter").mkdir()  # no manifest: not listed
    return root


@pytest.fixture(scope="module")
def app(ray_session, tiny_model, registry):
    import os
    from ray import serve
    from serve.app import build_app

    os.environ["JSONEXTRACT_API_KEYS"] = f"other-key,{KEY}"
    try:
        application = build_app({"adapters": str(registry), "default_adapter": "snips", "max_adapters_per_replica": 1,
                                 "model": {"max_length": 384},
                                 "decoding": {"max_new_tokens": 128, "max_string_length": 8, "max_array_items": 2}})
    finally:
        del os.environ["JSONEXTRACT_API_KEYS"]
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(application, name="adapters", route_prefix="/")
    yield URL
    serve.shutdown()


def post(path, body, key=KEY):
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    return requests.post(URL + path, data=json.dumps(body), headers=headers, timeout=120)


def test_interleaved_requests_get_their_own_adapters_schema(app):
    schemas = {"snips": load_schema(SNIPS / "schema.json"), "restaurant": load_schema(RESTAURANT / "schema.json")}
    texts = {"snips": [json.loads(line)["text"] for line in (SNIPS / "test.jsonl").read_text().splitlines()[:12]],
             "restaurant": [json.loads(line)["text"] for line in (RESTAURANT / "test.jsonl").read_text().splitlines()[:12]]}
    jobs = [(name, t) for pair in zip(*[[(n, t) for t in texts[n]] for n in texts]) for name, t in pair]

    def one(job):
        return job[0], post("/extract", {"text": job[1], "adapter": job[0]})

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs, timeout=600))
    assert len(answers) == 24
    for name, r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == name
        if body["valid"]:
            assert validation_error(body["output"], schemas[name]) is None
            other = "restaurant" if name == "snips" else "snips"
            assert validation_error(body["output"], schemas[other]) is not None  # not the other adapter's shape
        else:
            assert body["error"]  # truncated, or a decoding error the answer names: never a silent wrong shape
    for name in schemas:
        assert sum(r.json()["valid"] for n, r in answers if n == name) >= 4, name
    info = requests.get(f"{URL}/schema", params={"adapter": "restaurant"}, headers={"authorization": f"Bearer {KEY}"},
                        timeout=60).json()
    assert info["schema"] == schemas["restaurant"] and len(info["loaded_adapters"]) <= 2  # 1 held + 1 in use


def test_adapter_names_come_from_the_registry_only(app):
    r = requests.get(f"{URL}/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert [m["id"] for m in r.json()["data"]] == ["restaurant", "snips"]
    for bad in ("nope", "../snips", "/etc", "not-an-adapter"):
        r = post("/extract", {"text": "play jazz", "adapter": bad})
        assert r.status_code == 404 and "unknown adapter" in r.text, (bad, r.text)
    r = post("/extract", {"text": "play jazz"})  # no adapter named: the default
    assert r.status_code == 200 and r.json()["adapter"] == "snips"


def test_openai_model_field_picks_the_adapter(app):
    from openai import OpenAI
    client = OpenAI(base_url=f"{URL}/v1", api_key=KEY, max_retries=0, timeout=120)
    resp = client.chat.completions.create(model="restaurant", messages=[{"role": "user", "content": "table for 2"}],
                                          max_tokens=40)
    assert resp.model == "restaurant"
    assert [m.id for m in client.models.list().data] == ["restaurant", "snips"]


def test_api_keys(app):
    assert post("/extract", {"text": "play jazz"}, key=None).status_code == 401
    r = post("/extract", {"text": "play jazz"}, key="wrong")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert post("/extract", {"text": "play jazz"}, key="other-key").status_code == 200
    assert requests.get(f"{URL}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{URL}/healthz", timeout=30).status_code == 200  # liveness stays open


def test_registry_from_a_uri_copies_adapters_and_only_knows_its_names(registry, tmp_path):
    """An object-store registry (here the file:// scheme through the same pyarrow filesystem code as s3://):
    adapters are listed by folder name and copied to a local folder on first use."""
    from jsonextract.models.adapters import AdapterRegistry, UnknownAdapter

    reg = AdapterRegistry(f"file://{registry}")
    assert reg.names() == ["restaurant", "snips"]
    local = reg.path("restaurant")
    assert local != registry / "restaurant" and (local / "adapter_model.safetensors").is_file()
    assert reg.manifest("restaurant")["schema"] == load_schema(RESTAURANT / "schema.json")
    for bad in ("../snips", "snips/../../etc", "nope"):
        with pytest.raises(UnknownAdapter):
            reg.path(bad)


@pytest.mark.gpu
def test_replica_model_on_cuda_swaps_adapters(registry):
    """A Serve replica's model on a GPU (configs/serve/gpu.yaml's path): the base dequantised once and cast to bf16,
    the two adapters attached unmerged and swapped in turn; each gives outputs valid under its own schema (or an
    error with a reason), computed on the GPU."""
    from jsonextract.config import core as C
    from jsonextract.models.adapters import AdapterRegistry, MultiAdapterModel
    from jsonextract.decoding.extractor import Extractor

    lm = MultiAdapterModel(C.ModelConfig(dtype="bfloat16", max_length=384), AdapterRegistry(str(registry)), "cuda")
    assert lm.base.dtype == torch.bfloat16
    for name, data in (("snips", SNIPS), ("restaurant", RESTAURANT), ("snips", SNIPS)):
        adapter = lm.load(name)
        schema = load_schema(data / "schema.json")
        texts = [json.loads(l)["text"] for l in (data / "test.jsonl").read_text().splitlines()[:16]]
        with lm.active(name) as model:
            assert model.active_adapter == name and next(model.parameters()).device.type == "cuda"
            results = Extractor(model, lm.tokenizer, adapter.prompt,
                                C.DecodingConfig(max_new_tokens=128, max_string_length=8)).extract(texts)
        for r in results:
            assert (r.valid and validation_error(r.output, schema) is None) or r.reason in (
                "truncated", "invalid_json", "schema_invalid"), r
