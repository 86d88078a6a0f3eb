"""bf16 matrix products over an fp32 residual stream (`model.inference_dtype=bfloat16` over `model.dtype=float32`:
what `auto` picks where bf16 products measure faster): the decoder's linear layers compute in bf16, everything
between them stays fp32, and the outputs are closer to fp32's than a whole-model bf16 cast's; unmerged LoRA
adapters (Serve) still apply over such a base."""
import pytest
import torch

from jsonextract.config import core as C
from jsonextract.models.inference import load_for_inference, to_inference_dtype
from jsonextract.models.loading import load_inference_base
from jsonextract.models.precision import lower_matmul_precision, matmul_dtype
from test_merged_weights import make_adapter


def forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, output_hidden_states=True)


@pytest.fixture(scope="module")
def ids(tiny_model):
    return torch.randint(3, 1000, (4, 24), generator=torch.Generator().manual_seed(0))


def test_bf16_matmuls_keep_the_residual_stream_and_cache_in_fp32(tiny_model, ids):
    load = lambda **kw: load_for_inference(C.ModelConfig(name=str(tiny_model), **kw), None).model
    fp32, mixed, whole = load(inference_dtype="float32"), load(inference_dtype="bfloat16"), load(dtype="bfloat16")
    assert matmul_dtype(fp32) == torch.float32 and matmul_dtype(mixed) == torch.bfloat16
    ref, out, cast = forward(fp32, ids), forward(mixed, ids), forward(whole, ids)
    assert out.hidden_states[-1].dtype == torch.float32 and out.cache.layers[0].keys.dtype == torch.float32
    assert mixed.get_input_embeddings().weight.dtype == torch.float32 and mixed.model.norm.weight.dtype == torch.float32
    err = (out.hidden_states[-1] - ref.hidden_states[-1]).abs().max().item()
    err_cast = (cast.hidden_states[-1].float() - ref.hidden_states[-1]).abs().max().item()
    print(f"max |hidden - fp32|: bf16 matmuls {err:.2e}, whole model in bf16 {err_cast:.2e}")
    assert 0 < err < err_cast  # rounded in bf16, yet closer to fp32 than the cast
    assert lower_matmul_precision(mixed, torch.bfloat16) == 0  # a second call switches nothing


def test_unmerged_lora_applies_over_bf16_matmuls(tiny_model, tmp_path, ids):
    """Serve's way: the base switched first, the adapter attached after by PEFT, its own weights left in fp32."""
    from peft import PeftModel
    adapter = make_adapter(str(tiny_model), tmp_path / "a", seed=3, quantization="none")
    cfg = C.ModelConfig(name=str(tiny_model), inference_dtype="bfloat16")
    peft = PeftModel.from_pretrained(to_inference_dtype(load_inference_base(cfg), cfg), adapter).eval()
    assert {p.dtype for n, p in peft.named_parameters() if "lora_" in n} == {torch.float32}
    merged = load_for_inference(C.ModelConfig(name=str(tiny_model), inference_dtype="float32", merged_cache=""),
                                adapter).model
    with peft.disable_adapter():
        base = forward(peft, ids).logits
    got, want = forward(peft, ids).logits, forward(merged, ids).logits
    assert got.dtype == torch.float32
    effect, err = (want - base).abs().max().item(), (got - want).abs().max().item()
    print(f"adapter's effect on the logits {effect:.2e}, bf16 matmuls against fp32 merged {err:.2e}")
    assert err < 0.2 * effect
