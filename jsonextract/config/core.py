"""Typed configuration: YAML files -> frozen dataclasses, with `key.sub=value` overrides.

Rules (nanoGPT/litgpt style): every setting is declared once, in a dataclass below, with its type, default and a
one-line comment. An unknown key or a value of the wrong type is an error that names the key and the file.
Configs are plain frozen data, so they pickle to Ray workers unchanged.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml

from jsonextract.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A bad config file or override; the message names the key and where it came from."""


# ---------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    name: str = "artifacts/base/smollm2-135m-instruct"  # HF hub id or local path of the base model (the default, SmolLM2-135M-Instruct, is built offline on first use)
    quantization: Literal["none", "nf4"] = "none"  # nf4 = QLoRA: bitsandbytes 4-bit NF4 base weights
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype (bf16 on GPU, fp32 on CPU)
    max_length: int = 512  # context length used for prompts + answers (tokens)
    trust_remote_code: bool = False  # passed to from_pretrained for models with custom code
    inference_weights: Literal["dequantized", "nf4"] = "dequantized"  # inference over an NF4 base (batch, serve, predict): expand it once to `dtype` and merge a single adapter into it (same values, no 4-bit unpacking per step, 4x the weight memory), or keep it 4-bit; training ignores it
    inference_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # dtype of the decoder's matrix products at inference (batch, serve, predict), its weights cast after any dequantising and merging in `dtype`; a dtype narrower than `dtype` leaves the residual stream, norms and softmax in `dtype` (attention's products and KV cache follow it under inference_attention=auto): auto = bfloat16 on a CPU where a quick probe at load measures bf16 matrix products at least 1.5x as fast as fp32 (AMX; Zen 5's AVX512-BF16), else `dtype`
    inference_attention: Literal["auto", "packed", "sdpa"] = "auto"  # attention at inference (batch, serve, predict): packed = torch's SDPA with the query heads that share a key/value head packed together (same outputs as sdpa, no copy of the cache per head; measured faster on CPUs); auto = packed, and on a CPU whose matrix products run in bf16 (inference_dtype) attention's two products too, over a bf16 key/value cache, softmax in fp32; sdpa = transformers' own
    merged_cache: str = "~/.cache/jsonextract/merged"  # folder where the batch job and predict keep each adapter's merged weights after its first load (later loads skip quantising the base and importing peft: about half the start-up); "" = merge in memory on every load

    def __post_init__(self) -> None:
        if self.max_length < 16:
            raise ConfigError(f"model.max_length must be >= 16, got {self.max_length}")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA branch
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # module names that get adapters

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be > 0, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class PromptConfig:
    include_schema: bool = False  # write the JSON Schema into the prompt (needed for per-request schemas)
    instruction: str = "Extract the information in the text as JSON."  # task instruction shown to the model


# What grounding does with each value (jsonextract/decoding/grounding.py); declared here, the lowest layer that
# names it, so the config, the Serve request model and `predict --grounding` read one list.
GroundingPolicy = Literal["off", "annotate", "drop_ungrounded", "snap"]


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 128  # generation budget; hitting it before the JSON closes is a `truncated` error
    constrained: bool = True  # grammar-masked decoding (xgrammar) so outputs follow the schema
    max_string_length: int = 64  # maxLength added to schema strings that have none (unbounded strings never stop)
    max_array_items: int = 8  # maxItems added to schema arrays that have none
    grounding: GroundingPolicy = "annotate"  # locate each value in the text; drop_ungrounded also removes free-text values not found there; snap (for schemas whose values are spans of the text) replaces a value not copied from the text by the nearest span of whole words, and removes it where none is close
    engine: Literal["loop", "generate"] = "loop"  # loop: this project's decoding loop (jump-forward, prefix cache); generate: transformers' generate(), one pass per token (for models whose cache the loop does not handle)
    jump_forward: bool = True  # feed the tokens the grammar forces (keys, quotes, braces) in one forward pass and keep those the model agrees with: the same output in fewer passes
    prefix_cache: bool = True  # compute the prompt start all rows share (chat template, instruction, schema) once and reuse it
    batch_size: int = 16  # prompts per generate() call where the caller batches by count (dev decoder, batch actor, predict); Serve batches by max_batch_size


@dataclass(frozen=True)
class TinyModelConfig:
    vocab_size: int = 2048  # byte-level BPE vocabulary size (multiple of 64)
    hidden_size: int = 256  # model width (multiple of 64: 4-bit CPU kernels need in_features % 64 == 0)
    intermediate_size: int = 768  # MLP width (multiple of 64)
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 4  # key/value heads (GQA when < num_heads)
    max_position_embeddings: int = 512  # longest sequence the model supports
    seed: int = 0  # seed for weights and tokenizer training order

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size"):
            if getattr(self, key) % 64:
                raise ConfigError(f"tiny.{key} must be a multiple of 64, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("tiny.hidden_size must be divisible by tiny.num_heads")


# ---------------------------------------------------------------------------------------------- loading


YAML_TRUE, YAML_FALSE = ("true", "on", "yes"), ("false", "off", "no")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples, nested dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, source=source, prefix=key + ".")
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML reads off/on/no/yes as booleans: `grounding=off` means the option spelled "off"
            words = [a for a in args if str(a).lower() in (YAML_TRUE if value else YAML_FALSE)]
            value = words[0] if len(words) == 1 else value
        if value not in args:
            raise ConfigError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `3e-3` as a string: accept numeric strings
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise bad
        return value
    raise ConfigError(f"{source}: key '{key}' has an unsupported annotation {tp}")


def build(cls: type[T], data: dict, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys under '{prefix or '<top>'}': {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: '{key}' sets a sub-key of a non-section")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file (optional) plus command-line overrides (which win)."""
    data: dict = {}
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    if overrides:
        data = merge(data, parse_overrides(overrides))
        source = "command line" if path is None else f"{source} + command-line overrides"
    return build(cls, data, source=source)


def to_dict(cfg: Any) -> dict:
    """Plain-data view of a config (tuples -> lists), for manifests and logs."""
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its one-line comment} read from the class source, where each setting is declared once."""
    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per setting: `key (type, default ...): comment`, sections flattened to dotted keys."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple):
            default = list(default)
        if typing.get_origin(tp) is Literal:
            kind = " | ".join(str(a) for a in typing.get_args(tp))
        else:
            kind = _type_name(tp)
        lines.append(f"  {prefix + f.name} ({kind}, default {default!r}): {comments.get(f.name, '')}")
    return lines


def help_text(cls: type, usage: str) -> str:
    return "\n".join([usage, "", "Settings (in the --config YAML file, or key=value on the command line; "
                      "command-line values win):", *describe(cls)])


def split_cli(argv: list[str], cls: type | None = None, usage: str = "") -> tuple[Optional[str], list[str]]:
    """Job command lines: `--config FILE` (optional) then `key=value` overrides; `--help` prints every setting
    of `cls` with its type, default and comment, and exits."""
    path = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("command line: --config needs a file path")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            if cls is not None:
                print(help_text(cls, usage))
            raise SystemExit(0)
        else:
            rest.append(a)
    return path, rest


def prompt_budget(model: "ModelConfig", decoding: "DecodingConfig") -> int:
    """The tokens a prompt may take: what the model's context leaves after the answer's budget. Every job that
    decodes (dev evaluation, calibration, the batch replicas, Serve) cuts or refuses prompts by this."""
    return model.max_length - decoding.max_new_tokens


def parse_args(cls: type[T], argv: list[str], usage: str) -> T:
    """A job's config from its command line, `[--config FILE] [key=value ...]`; `--help` prints `usage` and every
    setting of `cls`, and exits."""
    path, overrides = split_cli(argv, cls, usage.strip())
    return load(cls, path, overrides)


__all__ = ["ConfigError", "ModelConfig", "LoraSettings", "PromptConfig", "DecodingConfig", "TinyModelConfig",
           "build", "load", "parse_overrides", "to_dict", "split_cli", "parse_args"]
