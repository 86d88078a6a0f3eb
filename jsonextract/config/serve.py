"""Settings of the Serve application (the `args:` of an application in configs/serve/*.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jsonextract.config.core import ConfigError, DecodingConfig, ModelConfig


@dataclass(frozen=True)
class SchemaLimits:
    """Bounds on a schema that arrives with a request: its grammar is compiled on the server, and its cost grows
    with each of these (an enum of 50,000 values took 19 s to compile)."""
    max_bytes: int = 20_000  # compact JSON size of the schema
    max_depth: int = 32  # nesting of the schema document (each object level is two: properties, then the name)
    max_properties: int = 200  # property names over the whole schema
    max_enum_values: int = 500  # values in any one enum
    max_pattern_length: int = 200  # characters of any one `pattern`


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 1_000_000  # request body size; larger is refused (413) before it is read or parsed
    max_text_chars: int = 20_000  # characters in one text (413)
    max_batch_items: int = 64  # texts in one /extract/batch request (413)
    max_new_tokens: int = 512  # largest max_new_tokens a request may ask for (400)
    grammar_timeout_s: float = 10.0  # a request's schema must compile to a grammar within this, off the event loop (400)
    max_queued_requests: int = 128  # requests waiting for a model replica beyond those it holds; more get 503 + Retry-After
    request_timeout_s: float = 120.0  # a request still unanswered after this gets 503 + Retry-After
    schema: SchemaLimits = field(default_factory=SchemaLimits)  # bounds on a schema sent with a request (400)


@dataclass(frozen=True)
class ServeConfig:
    adapters: str = ""  # adapter registry: folder or URI with one sub-folder per adapter (the name is the folder name)
    adapter: str = ""  # one adapter folder, served under its folder name (with or without `adapters`)
    default_adapter: str = ""  # adapter for requests that name none ("" = the only adapter if there is one, else the base)
    max_adapters_per_replica: int = 4  # adapters kept loaded per replica; the least recently used is dropped
    schema: str = ""  # JSON Schema file for requests to the base model alone (requests may bring their own)
    model: ModelConfig = field(default_factory=ModelConfig)  # base model when there is no adapter (adapters name their own)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)  # generation settings and default budget
    max_batch_size: int = 16  # @serve.batch: most requests decoded together
    batch_wait_timeout_s: float = 0.01  # @serve.batch: how long a batch waits to fill
    long_text: Literal["reject", "truncate"] = "reject"  # over-context text: 413, or cut and flag input_truncated
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the replica runs the model
    cpu_threads: int = 0  # torch threads of a Model replica on CPU (0 = Ray's default: the replica's num_cpus, floored)
    api_keys_file: str = ""  # file with one API key per line; keys also come from $JSONEXTRACT_API_KEYS (comma-separated); none = open
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # request limits

    def __post_init__(self) -> None:
        if self.max_batch_size <= 0 or self.max_adapters_per_replica <= 0:
            raise ConfigError("max_batch_size and max_adapters_per_replica must be > 0")
        if self.cpu_threads < 0:
            raise ConfigError(f"cpu_threads must be >= 0, got {self.cpu_threads}")
