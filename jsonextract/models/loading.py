"""Model loading: base model by Hugging Face id or local path (optionally 4-bit NF4), LoRA attached by peft, and
adapter directories (PEFT files + tokenizer + manifest.json) saved and loaded with a prompt-version check.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonextract.models.attention import set_inference_attention
from jsonextract.errors import UserError
from jsonextract.config.core import LoraSettings, ModelConfig, PromptConfig, build
from jsonextract.models.merged_cache import MergedCache
from jsonextract.models.precision import lower_matmul_precision
from jsonextract.data.prompt import PROMPT_VERSION
from jsonextract.data.schema import schema_hash

MANIFEST = "manifest.json"


class ModelLoadError(UserError):
    """A model or adapter that cannot be loaded; the message names the path and the fix."""


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_name(name: str) -> None:
    """Fail early on a missing local model; build the embedded default base on first use."""
    from jsonextract.models import base as base

    p = Path(name).expanduser()
    if base.is_default(name):
        try:
            base.ensure_base(p)
        except base.BaseModelError as e:
            raise ModelLoadError(str(e)) from None
        return
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model path {p} has no config.json (not a Hugging Face model folder)")
        return
    # Hub ids are `org/name`; anything else that is not on disk is a missing local path.
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"model path not found: {name} (the embedded default is {base.DEFAULT_DIR}: "
                             f"`python -m jsonextract.models.base`; the tiny test model: `python -m jsonextract.models.tiny`)")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"  # batched generation needs left padding (transformers 5)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, device: str = "cpu"):
    """Base causal LM, optionally quantised to 4-bit NF4, in train mode (see keep_4bit_layout)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_model_name(cfg.name)
    dtype = torch_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantization == "nf4":
        # quant_storage must equal the compute dtype: FSDP flattens/shards all parameters of a unit together and
        # refuses mixed dtypes, so the packed 4-bit bytes are stored in a tensor of the compute dtype.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"cannot load model '{cfg.name}': {e}") from None
    if cfg.quantization == "none":
        model.to(device)
    # from_pretrained returns eval mode; training code expects train mode (and see keep_4bit_layout).
    model.train()
    return model


def load_inference_base(cfg: ModelConfig, device: str = "cpu"):
    """The base for inference only. An NF4 base is dequantised once (cfg.inference_weights): the same weight
    values in `cfg.dtype`, so an adapter trained over the NF4 base sees what it was trained on, and no 4-bit
    unpacking per forward pass (1.6-1.7x faster decoding on 2 CPU cores: bench/extract.py, README)."""
    model = load_base(cfg, device)
    if cfg.quantization == "nf4" and cfg.inference_weights == "dequantized":
        model = model.dequantize()
    return model.eval()


def keeps_4bit(cfg: ModelConfig) -> bool:
    """Inference over the NF4 base in 4-bit (model.inference_weights=nf4): nothing to merge into or cast."""
    return cfg.quantization == "nf4" and cfg.inference_weights == "nf4"


def resolve_device(choice: str) -> str:
    """`auto` | `cpu` | `cuda` -> the device to load onto: `auto` is a CUDA GPU when there is one."""
    import torch
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


# bf16 decoding wins where it is measured at least this much faster than model.dtype at decoding's shapes
# (measured ratios lie far from it: 2.6-7x with AMX or Zen 5's AVX512-BF16, below 0.7x elsewhere).
BF16_MIN_SPEEDUP = 1.5


@functools.cache
def bf16_matmul_speedup() -> float:
    """How many times faster than fp32 this CPU multiplies decoding-shaped matrices in bf16 (a 64-row activation
    by a 576x1536 weight, SmolLM2's MLP; the best of a few, at torch's thread count; about 30 ms, once a process;
    where bf16 is emulated, one timed call 20x fp32's is enough: 0.2 s instead of 0.47 on a Zen 3, one thread)."""
    # Measured, not read from CPU flags: which kernel a bf16 product gets depends on the CPU, on oneDNN's
    # dispatch and on the environment, and the flags do not tell the speed. At decoding's shapes (32-1000 rows by
    # 576x1536), one thread, fp32 / bf16 time: 2-core Sapphire Rapids (AMX) 2.6-7.3x; the same CPU with oneDNN held to
    # AVX512-BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) 0.65x; 2-core AMD EPYC Zen 5 (AVX512-BF16, no AMX) 3.1-4.6x
    # (MKL's fp32 runs there at about 100 GFLOP/s, oneDNN's bf16 at 290-470); oneDNN held to AVX2 0.01x (its
    # reference kernel: 174 ms against 2 ms).
    import time

    import torch

    def best(dtype, give_up: float = float("inf")) -> float:
        a, b = torch.randn(64, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b  # oneDNN builds its kernel on the first call
        times = []
        for _ in range(4):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
            if times[-1] > give_up:  # far too slow to win: oneDNN's reference kernel takes 174 ms a call
                break
        return min(times)

    with torch.inference_mode():
        fp32 = best(torch.float32)
        return fp32 / best(torch.bfloat16, give_up=20 * fp32)


def inference_dtype(cfg: ModelConfig, device: str = "cpu"):
    """The dtype of the decoder's matrix products at inference (cfg.inference_dtype): `auto` is bf16 on a CPU
    that multiplies bf16 matrices at least BF16_MIN_SPEEDUP times as fast as fp32 (measured), else cfg.dtype."""
    import torch
    if cfg.inference_dtype != "auto":
        return torch_dtype(cfg.inference_dtype)
    if auto_measures_bf16(cfg, device) and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP:
        return torch.bfloat16
    return torch_dtype(cfg.dtype)


def auto_measures_bf16(cfg: ModelConfig, device: str) -> bool:
    """Whether `auto` decides by measuring bf16 products: fp32 models on a CPU (GPUs keep cfg.dtype)."""
    import torch
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
        note += f"; bf16 products measured at {bf16_matmul_speedup():.2g}x fp32's speed on this CPU"
    if model.dtype == dtype:
        if measured:  # a user on a CPU without fast bf16 learns why it stayed fp32
            print(f"[model] matrix products in {name} ({note})", flush=True)
        return model
    if dtype.itemsize < model.dtype.itemsize:
        lower_matmul_precision(model, dtype)
        print(f"[model] matrix products in {name}, activations in {own} ({note})", flush=True)
        return model
    print(f"[model] inference in {name} ({note})", flush=True)
    return model.to(dtype)


def keep_4bit_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers pinned.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode under no_grad rewrites `weight.data` into a
    blocked layout, turns the double-quantised absmax into bf16 and marks the *shared* quant_state as repacked.
    Under FSDP2 `weight` is the all-gathered unsharded parameter: the next all-gather refills it from the
    unchanged shards in the old layout while the quant_state still says "repacked", so every forward after the
    first evaluation computed with scrambled weights (dev loss 19 where the written adapter has 0.02; training
    diverged after each evaluation). A model that trains, or shares weights with one that trains, keeps the
    canonical layout on every CPU; inference-only models may repack (it is bitsandbytes' fast CPU path)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def attach_lora(model, cfg: LoraSettings):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    pcfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, pcfg)


def write_manifest(adapter_dir: str | Path, *, base_model: str, prompt: PromptConfig, schema: dict | None,
                   config: dict, metrics: dict | None = None, step: int | None = None) -> dict:
    from jsonextract.config.core import to_dict

    if Path(base_model).expanduser().exists():  # record local bases absolutely: jobs may run from another cwd
        base_model = str(Path(base_model).expanduser().resolve())
    manifest = {
        "base_model": base_model,
        "prompt_version": PROMPT_VERSION,
        "prompt": to_dict(prompt),
        "schema": schema,
        "schema_hash": schema_hash(schema) if schema is not None else None,
        "config": config,
        "metrics": metrics or {},
        "step": step,
    }
    Path(adapter_dir, MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def read_manifest(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{adapter_dir} is not an adapter directory: {MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("prompt_version") != PROMPT_VERSION:
        raise ModelLoadError(
            f"adapter {adapter_dir} was trained with prompt version {manifest.get('prompt_version')!r}, but this code "
            f"builds prompt version {PROMPT_VERSION!r}: the model would see different text than it learned. "
            f"Retrain the adapter, or use the project version that wrote it.")
    return manifest


def attach_adapter(base, adapter: str, merge: bool, cache: MergedCache | None):
    """The adapter over `base`, merged into it where that is sound (and then written to `cache`)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter)
    targets = set(model.peft_config["default"].target_modules or [])
    tied = getattr(base.config, "tie_word_embeddings", False) and bool(targets & {"lm_head", "embed_tokens"})
    # Never merge into weights that something else shares: merging an lm_head LoRA into a tied lm_head rewrites
    # the input embedding too (measured: intent right on 0 of 64 records, 63 of 64 unmerged).
    if merge and not tied:
        model = model.merge_and_unload()  # plain weights: no LoRA branch cost per token
        if cache:
            cache.save(model)
    return model


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
    import dataclasses

    manifest = None
    prompt = PromptConfig()
    schema = None
    tok_source = model_cfg.name
    if adapter:
        if not Path(adapter).is_dir():
            raise ModelLoadError(f"adapter directory not found: {adapter}")
        manifest = read_manifest(adapter)
        # Run the adapter on the base it was trained on: LoRA weights trained over an NF4 base learned to
        # compensate that base's quantisation error, so the quantisation mode comes from the manifest.
        trained = manifest.get("config", {}).get("model", {})
        model_cfg = dataclasses.replace(model_cfg, name=manifest["base_model"],
                                        quantization=trained.get("quantization", model_cfg.quantization))
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
