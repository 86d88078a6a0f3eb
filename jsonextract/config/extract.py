"""Configuration of the batch extraction job (`jsonextract extract`, rayjobs/extract.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jsonextract.config.core import ConfigError, DecodingConfig, ModelConfig


@dataclass(frozen=True)
class PoolConfig:
    num_actors: int = 2  # model replicas (one model copy each)
    cpus_per_actor: float = 0.5  # fractional on CPU: whole-CPU actors on a 2-CPU node starve the read tasks
    gpus_per_actor: float = 0.0  # GPUs per replica on a GPU cluster
    batch_rows: int = 64  # most rows handed to an actor per call (fewer where that evens out the last round)
    max_batch_tokens: int = 4096  # rows x padded prompt length per generate() call (long texts -> smaller batches)
    # Ray Data's default (4) queues batches on whichever replica is ready first: with batches that take a minute, a
    # second replica still loading its model then idles while the first works through the queue.
    batches_in_flight: int = 1  # batches handed to one replica before it returns one (>1 prefetches, risks idle replicas)

    def __post_init__(self) -> None:
        if self.num_actors <= 0 or self.batch_rows <= 0 or self.batches_in_flight <= 0:
            raise ConfigError("pool.num_actors, pool.batch_rows and pool.batches_in_flight must be > 0")


@dataclass(frozen=True)
class ExtractConfig:
    input: str = ""  # file, folder, glob or URI (s3://..., any pyarrow filesystem)
    output: str = ""  # output folder (local or URI); re-running into it resumes
    adapter: str = ""  # adapter directory from the training job ("" = the base model alone)
    schema: str = ""  # JSON Schema file (default: the adapter's schema)
    input_format: Literal["auto", "jsonl", "parquet", "csv", "text"] = "auto"  # auto = by file extension
    output_format: Literal["parquet", "jsonl"] = "parquet"  # format of the result files
    text_column: str = "text"  # column/key holding the document text
    id_column: str = "id"  # column/key holding the record id (missing ids get "<file>:<row>")
    target_column: str = "target"  # gold object column; when present the job scores itself
    context_column: str = "context"  # optional column/key: what the text answers (a JSON object or a string), shown to the model beside the text; any other type is an error row
    passthrough_columns: tuple[str, ...] = ()  # input columns copied to the output unchanged
    long_text: Literal["chunk", "truncate", "error"] = "chunk"  # texts over the context: split+merge, cut, or error row
    table_fields: int = 20  # with gold targets: fields in the printed per-field table; 0 = the headline metrics on one line
    resume: bool = True  # skip ids already written to `output`; false = start over (its result files are deleted first)
    limit: int = 0  # only the first N input rows (0 = all)
    model: ModelConfig = field(default_factory=ModelConfig)  # base model (ignored when the adapter names one)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)  # generation settings
    pool: PoolConfig = field(default_factory=PoolConfig)  # actor pool
    fail_actor_once: str = ""  # TEST ONLY: marker-file path; an actor dies once (process exit) if it is absent
