"""Settings of the Serve application (the `args:` of an application in configs/serve/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config import ConfigError, DecodingConfig, ModelConfig


@dataclass(frozen=True)
class ServeConfig:
    adapter: str = ""  # adapter directory from the training job ("" = base model + `schema`)
    schema: str = ""  # default JSON Schema file when there is no adapter (requests may bring their own)
    model: ModelConfig = field(default_factory=ModelConfig)  # base model (the adapter's manifest names its own)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)  # generation settings and default budget
    max_batch_size: int = 16  # @serve.batch: most requests decoded together
    batch_wait_timeout_s: float = 0.01  # @serve.batch: how long a batch waits to fill
    max_new_tokens_limit: int = 512  # largest max_new_tokens a request may ask for
    long_text: Literal["reject", "truncate"] = "reject"  # over-context text: 413, or cut and flag input_truncated
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the replica runs the model

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0:
            raise ConfigError("max_batch_size must be > 0")
