"""Loading a model for inference, in the order it happens: the adapter's manifest, the tokenizer, the merged
weights from the cache or the base with the adapter merged in, the cast to the inference dtype, the attention
kernel. The batch replicas, Serve and predict all load through `load_for_inference`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonextract import hardware
from jsonextract.config.core import ModelConfig, PromptConfig, build
from jsonextract.data.io import local_folder
from jsonextract.lazy import lazy
from jsonextract.logs import detail
from jsonextract.models.attention import set_inference_attention
from jsonextract.models.loading import ModelLoadError, keeps_4bit, load_inference_base, load_tokenizer, torch_dtype
from jsonextract.models.manifest import MANIFEST, read_manifest, trained_base
from jsonextract.models.merged_cache import MergedCache
from jsonextract.models.precision import lower_matmul_precision

peft = lazy("peft")
torch = lazy("torch")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    prompt: PromptConfig
    schema: dict | None
    manifest: dict | None


def load_for_inference(model_cfg: ModelConfig, adapter: str | None, device: str = "cpu",
                       merge: bool = True) -> LoadedModel:
    """Base (+ adapter) ready for generation. With an adapter, the base model id, its quantisation, the prompt
    settings and the schema come from its manifest, so inference renders exactly the prompt the adapter was
    trained on, over the same base."""
    manifest = None
    prompt = PromptConfig()
    schema = None
    tok_source = model_cfg.name
    if adapter:
        adapter = str(local_folder(adapter))  # a URI: a local copy shared by the processes on this machine
        if not Path(adapter).is_dir():
            raise ModelLoadError(f"adapter directory not found: {adapter}")
        manifest = read_manifest(adapter)
        model_cfg = trained_base(manifest, model_cfg)
        prompt = build(PromptConfig, manifest["prompt"], source=f"{adapter}/{MANIFEST}")
        schema = manifest.get("schema")
        tok_source = adapter
    tokenizer = load_tokenizer(tok_source)
    # Merge only into plain weights: never into 4-bit weights (PEFT would re-quantise the sum) nor into the
    # original full-precision weights of an NF4 base (the LoRA learned to compensate the quantisation error):
    # into the dequantised NF4 values only.
    plain = not keeps_4bit(model_cfg)
    cache = MergedCache.for_model(model_cfg, adapter) if adapter and merge and plain else None
    model = cache.load(device) if cache else None  # an entry exists only for adapters that were merged
    if model is None:
        model = load_inference_base(model_cfg, device)
        if adapter:
            model = attach_adapter(model, adapter, merge=merge and plain, cache=cache)
    model = to_inference_dtype(model, model_cfg, device).eval()
    set_inference_attention(model, model_cfg.inference_attention)  # after any save to the merged-weights cache
    return LoadedModel(model, tokenizer, prompt, schema, manifest)


def attach_adapter(base, adapter: str, merge: bool, cache: MergedCache | None):
    """The adapter over `base`, merged into it where that is sound (and then written to `cache`)."""
    model = peft.PeftModel.from_pretrained(base, adapter)
    targets = set(model.peft_config["default"].target_modules or [])
    tied = getattr(base.config, "tie_word_embeddings", False) and bool(targets & {"lm_head", "embed_tokens"})
    # Never merge into weights that something else shares: merging an lm_head LoRA into a tied lm_head rewrites
    # the input embedding too, and the model's outputs fall apart.
    if merge and not tied:
        model = model.merge_and_unload()  # plain weights: no LoRA branch cost per token
        if cache:
            cache.save(model)
    return model


def inference_dtype(cfg: ModelConfig, device: str = "cpu"):
    """The dtype of the decoder's matrix products at inference (cfg.inference_dtype): `auto` is bf16 on a CPU
    that multiplies bf16 matrices at least hardware.BF16_MIN_SPEEDUP times as fast as fp32 (measured), else cfg.dtype."""
    if cfg.inference_dtype != "auto":
        return torch_dtype(cfg.inference_dtype)
    if auto_measures_bf16(cfg, device) and hardware.bf16_matmul_speedup() >= hardware.BF16_MIN_SPEEDUP:
        return torch.bfloat16
    return torch_dtype(cfg.dtype)


def auto_measures_bf16(cfg: ModelConfig, device: str) -> bool:
    """Whether `auto` decides by measuring bf16 products: fp32 models on a CPU (GPUs keep cfg.dtype)."""
    return cfg.inference_dtype == "auto" and cfg.dtype == "float32" and torch.device(device).type == "cpu"


def to_inference_dtype(model, cfg: ModelConfig, device: str = "cpu"):
    """Switch plain weights to the inference dtype. Done after the NF4 base is dequantised and the adapter merged
    (both in cfg.dtype), so the merged sum is rounded once. A base kept in 4-bit keeps its compute dtype. A dtype
    narrower than the model's (bf16 over fp32) goes to the decoder's matrix products only, the residual stream
    stays in the model's dtype (`precision.lower_matmul_precision`: half the output changes of a whole-model cast);
    a wider one casts the whole model."""
    if keeps_4bit(cfg):  # (not is_loaded_in_4bit: it outlives dequantize())
        return model
    dtype = inference_dtype(cfg, device)
    name, own = (str(d).removeprefix("torch.") for d in (dtype, model.dtype))
    note = f"model.inference_dtype={cfg.inference_dtype}"
    measured = auto_measures_bf16(cfg, device)
    if measured:
        note += f"; bf16 products measured at {hardware.bf16_matmul_speedup():.2g}x fp32's speed on this CPU"
    if model.dtype == dtype:
        if measured:  # a user on a CPU without fast bf16 learns why it stayed fp32
            detail(f"[model] matrix products in {name} ({note})")
        return model
    if dtype.itemsize < model.dtype.itemsize:
        lower_matmul_precision(model, dtype)
        detail(f"[model] matrix products in {name}, activations in {own} ({note})")
        return model
    detail(f"[model] inference in {name} ({note})")
    return model.to(dtype)
