"""The merged-weights cache (model.merged_cache): the first load of an adapter writes the dequantised base with the
adapter merged; later loads read exactly those values without building them; a changed adapter never reads a
stale entry; a damaged entry is rebuilt; only KEEP entries stay."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jsonextract.config import core as C
from jsonextract import hardware
from jsonextract.models import inference, loading as M, manifest, merged_cache as merged_weights


def make_adapter(base: str, out, seed: int, quantization: str = "nf4") -> str:
    """A LoRA adapter over `base` with random (non-zero) B matrices, so merging changes the weights."""
    model = M.attach_lora(M.load_base(C.ModelConfig(name=base, quantization=quantization)), C.LoraSettings(r=4))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    model.save_pretrained(out)
    M.load_tokenizer(base).save_pretrained(out)
    manifest.write_manifest(out, base_model=base, prompt=C.PromptConfig(), schema=None,
                              config={"model": {"quantization": quantization}})
    return str(out)


def weights(lm) -> dict:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.fixture
def cfg(tiny_model, tmp_path):
    return C.ModelConfig(name=str(tiny_model), merged_cache=str(tmp_path / "cache"))


def entries(cfg) -> list:
    return sorted(p.name for p in Path(cfg.merged_cache).iterdir() if not p.name.startswith("."))


def test_second_load_reads_the_entry_and_gets_the_same_weights(cfg, tiny_model, tmp_path, monkeypatch):
    adapter = make_adapter(str(tiny_model), tmp_path / "a", seed=1)
    in_memory = weights(inference.load_for_inference(dataclasses.replace(cfg, merged_cache=""), adapter))
    first = weights(inference.load_for_inference(cfg, adapter))
    assert len(entries(cfg)) == 1
    base_only = M.load_inference_base(dataclasses.replace(cfg, quantization="nf4")).state_dict()
    assert any(not torch.equal(base_only[k], first[k]) for k in first)  # the adapter really was merged

    def must_not_run(*a, **k):
        raise AssertionError("a cache hit must not load the base or the adapter")
    monkeypatch.setattr(inference, "load_inference_base", must_not_run)
    monkeypatch.setattr(inference, "attach_adapter", must_not_run)
    second = weights(inference.load_for_inference(cfg, adapter))
    assert first.keys() == second.keys() == in_memory.keys()
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], in_memory[k]) for k in first)


def test_changed_adapter_gets_its_own_entry_and_old_ones_are_pruned(cfg, tiny_model, tmp_path):
    adapters = [make_adapter(str(tiny_model), tmp_path / f"a{i}", seed=i) for i in range(merged_weights.KEEP + 1)]
    loaded = [weights(inference.load_for_inference(cfg, a)) for a in adapters]
    assert len(entries(cfg)) == merged_weights.KEEP  # the least recently used one went
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loaded[0][k], loaded[1][k])
    # retrained in place (same folder, new weights): a new key, never the stale entry
    make_adapter(str(tiny_model), tmp_path / "a1", seed=99)
    again = weights(inference.load_for_inference(cfg, adapters[1]))
    assert not torch.equal(again[k], loaded[1][k])
    in_memory = weights(inference.load_for_inference(dataclasses.replace(cfg, merged_cache=""), adapters[1]))
    assert torch.equal(again[k], in_memory[k])


def test_damaged_entry_is_rebuilt(cfg, tiny_model, tmp_path, capsys):
    adapter = make_adapter(str(tiny_model), tmp_path / "a", seed=3)
    first = weights(inference.load_for_inference(cfg, adapter))
    entry = Path(cfg.merged_cache) / entries(cfg)[0]
    (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    again = weights(inference.load_for_inference(cfg, adapter))
    assert "unreadable" in capsys.readouterr().out
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert json.loads((entry / merged_weights.INFO).read_text())["base"] == str(tiny_model)


@pytest.mark.parametrize("change, merge", [({"inference_weights": "nf4"}, True), ({"merged_cache": ""}, True),
                                           ({}, False)])
def test_unmerged_or_disabled_loads_write_nothing(cfg, tiny_model, tmp_path, change, merge):
    adapter = make_adapter(str(tiny_model), tmp_path / "a", seed=4)
    inference.load_for_inference(dataclasses.replace(cfg, **change), adapter, merge=merge)
    assert not Path(cfg.merged_cache).exists()


def test_inference_dtype_rounds_the_merged_weights_once(cfg, tiny_model, tmp_path, monkeypatch):
    """bf16 inference weights are the fp32 merge rounded once (the cache keeps the fp32 entry for both), in the
    decoder's linear layers only (embeddings and norms stay fp32), and `auto` picks bf16 where bf16 products
    measure fast enough."""
    adapter = make_adapter(str(tiny_model), tmp_path / "a", seed=5)
    fp32 = weights(inference.load_for_inference(dataclasses.replace(cfg, inference_dtype="float32"), adapter))
    bf16 = weights(inference.load_for_inference(dataclasses.replace(cfg, inference_dtype="bfloat16"), adapter))
    assert len(entries(cfg)) == 1
    assert {v.dtype for v in fp32.values()} == {torch.float32}
    matmul = {k for k in fp32 if k.startswith("model.layers.") and k.endswith("_proj.weight")}
    assert matmul and {bf16[k].dtype for k in matmul} == {torch.bfloat16}
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in matmul)
    assert all(torch.equal(bf16[k], fp32[k]) for k in fp32.keys() - matmul)  # embeddings, norms: fp32 as merged
    for speedup, want in ((hardware.BF16_MIN_SPEEDUP, torch.bfloat16), (0.65, torch.float32)):
        monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda: speedup)
        assert inference.inference_dtype(cfg) == want
        assert inference.inference_dtype(cfg, "cuda") == torch.float32  # GPUs: model.dtype
        assert inference.inference_dtype(dataclasses.replace(cfg, inference_dtype="float32")) == torch.float32


def test_auto_keeps_fp32_where_onednn_is_held_to_avx2():
    """bf16 products run in oneDNN, which an environment may hold below the CPU's bf16 units; at AVX2 they run
    in its reference kernel, far slower than fp32, whatever the CPU flags say. `auto` measures, so it keeps fp32
    there (the cap must be set before torch loads oneDNN: a fresh process)."""
    code = ("from jsonextract import hardware; from jsonextract.models.inference import inference_dtype; "
            "from jsonextract.config.core import ModelConfig; "
            "print(hardware.bf16_matmul_speedup(), inference_dtype(ModelConfig()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}).stdout
    speedup, dtype = out.split()
    assert float(speedup) < 1 and dtype == "torch.float32", out
