"""Loading a base model (Hugging Face id or local path, optionally 4-bit NF4) and its tokenizer, and attaching a
fresh LoRA for training. Inference loading (adapters, merged cache, dtype, attention) is models/inference.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonextract.config.core import LoraSettings, ModelConfig
from jsonextract.errors import UserError
from jsonextract.lazy import lazy
from jsonextract.logs import quiet_libraries
from jsonextract.models import base

# Every process that loads a model comes through here (Ray workers and replicas included, which do not run the
# command line's set-up): the libraries' messages that need no action are silenced before they load.
quiet_libraries()

peft = lazy("peft")
torch = lazy("torch")
transformers = lazy("transformers")


class ModelLoadError(UserError):
    """A model or adapter that cannot be loaded; the message names the path and the fix."""


def torch_dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_name(name: str) -> None:
    """Fail early on a missing local model; build the embedded default base on first use."""
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
                             f"`jsonextract prepare-base`; the tiny test model: `jsonextract prepare-tiny`)")


def load_tokenizer(name: str):
    tok = transformers.AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"  # batched generation needs left padding (transformers 5)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, device: str = "cpu"):
    """Base causal LM, optionally quantised to 4-bit NF4, in train mode (see keep_4bit_layout)."""
    check_model_name(cfg.name)
    dtype = torch_dtype(cfg.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.quantization == "nf4":
        # quant_storage must equal the compute dtype: FSDP flattens/shards all parameters of a unit together and
        # refuses mixed dtypes, so the packed 4-bit bytes are stored in a tensor of the compute dtype.
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.name, **kwargs)
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
    unpacking per forward pass (bench/extract.py measures the difference)."""
    model = load_base(cfg, device)
    if cfg.quantization == "nf4" and cfg.inference_weights == "dequantized":
        model = model.dequantize()
    return model.eval()


def keeps_4bit(cfg: ModelConfig) -> bool:
    """Inference over the NF4 base in 4-bit (model.inference_weights=nf4): nothing to merge into or cast."""
    return cfg.quantization == "nf4" and cfg.inference_weights == "nf4"


def resolve_device(choice: str) -> str:
    """`auto` | `cpu` | `cuda` -> the device to load onto: `auto` is a CUDA GPU when there is one."""
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


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
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none")
    return peft.get_peft_model(model, pcfg)

