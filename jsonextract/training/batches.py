"""Training data: check the records, tokenise them once, and deal them out as micro-batches.

Tokenising a training file with a chat template costs seconds of a core that every worker would otherwise spend
again on every run: one process per node tokenises and writes a Parquet file (pyarrow) under `data.cache_dir`,
keyed by the file's content, the tokenizer, the prompt and the length limit; the other workers of that node, and
later runs, read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonextract.config.train import TrainConfig
from jsonextract.data.io import read_bytes, sibling
from jsonextract.data.prompt import PROMPT_VERSION, PromptBuilder
from jsonextract.data.records import Example, read_jsonl
from jsonextract.data.schema import canonical_json
from jsonextract.errors import UserError
from jsonextract.lazy import lazy

pa = lazy("pyarrow")
pq = lazy("pyarrow.parquet")

TOKENS = "tokens.parquet"  # in a cache entry, beside counts.json


def schema_path(cfg: TrainConfig) -> str:
    return cfg.data.schema_file or sibling(cfg.data.train_file, "schema.json")


def check_records(path: str, skip_bad: bool, limit: int = 0) -> tuple[list, int]:
    """(good records, number skipped). A bad record raises with file and line unless skip_bad."""
    good, skipped = [], 0
    for rec in read_jsonl(path, need_target=True):
        if rec.ok:
            good.append(rec)
            if limit and len(good) >= limit:
                break
        elif skip_bad:
            skipped += 1
        else:
            raise UserError(f"bad training record: {rec.error} (set data.skip_bad_records=true to skip such lines)")
    if not good:
        raise UserError(f"{path}: no usable records")
    return good, skipped


def tokenize(records: list, prompt: PromptBuilder, tokenizer: Any, max_length: int) -> tuple[list[Example], int]:
    """Examples with answer-only labels; records longer than max_length are dropped and counted (never silently)."""
    out, too_long = [], 0
    for r in records:
        ex = prompt.encode_example(tokenizer, r.text, r.target, max_length, r.context)
        if ex is None:
            too_long += 1
        else:
            out.append(ex)
    return out, too_long


@dataclass(frozen=True)
class TokenizedFile:
    examples: list[Example]
    skipped: int  # malformed lines skipped (data.skip_bad_records)
    too_long: int  # records longer than model.max_length, dropped
    built: bool = False  # this process tokenised the file (no cache, or it wrote the cache entry)


def cache_key(path: str, prompt: PromptBuilder, tokenizer: Any, max_length: int, skip_bad: bool, limit: int) -> str:
    """Everything the tokens depend on: file bytes, tokenizer (vocabulary, merges, chat template), prompt version,
    instruction and schema, length limit and record selection."""
    h = hashlib.sha256()
    h.update(read_bytes(path, "data file"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_id = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    for part in (tok_id, str(getattr(tokenizer, "chat_template", "")), PROMPT_VERSION,
                 canonical_json({"prompt": vars(prompt.cfg), "schema": prompt.schema}),
                 f"{max_length}:{skip_bad}:{limit}", TOKENS):  # the file format too: older entries are not read
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:24]


def load_tokenized(path: str, prompt: PromptBuilder, tokenizer: Any, max_length: int, skip_bad: bool, limit: int,
                   cache_dir: str, builder: bool) -> TokenizedFile:
    """The tokenised file, from the cache when there. `builder` is the one process per node that may write the
    cache; callers let it go first (a barrier) so the others find the cache written."""
    if not cache_dir:
        records, skipped = check_records(path, skip_bad, limit)
        examples, too_long = tokenize(records, prompt, tokenizer, max_length)
        return TokenizedFile(examples, skipped, too_long, built=True)

    entry = Path(cache_dir) / cache_key(path, prompt, tokenizer, max_length, skip_bad, limit)
    built = not (entry / "counts.json").is_file()
    if built:
        if not builder:
            raise RuntimeError(f"tokenised-data cache {entry} was not written by this node's first worker")
        records, skipped = check_records(path, skip_bad, limit)
        examples, too_long = tokenize(records, prompt, tokenizer, max_length)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}),
                       str(tmp / TOKENS))
        (tmp / "counts.json").write_text(json.dumps({"skipped": skipped, "too_long": too_long, "source": path}))
        try:
            tmp.rename(entry)  # atomic: a reader sees the whole entry or none
        except OSError:  # another node or run wrote it first (shared file system): theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    counts = json.loads((entry / "counts.json").read_text())
    table = pq.read_table(str(entry / TOKENS)).to_pydict()
    examples = [Example(ids, labels) for ids, labels in zip(table["input_ids"], table["labels"])]
    return TokenizedFile(examples, counts["skipped"], counts["too_long"], built)


def micro_batches(examples: list[Example], step: int, cfg: TrainConfig, rank: int, world: int) -> list[list[Example]]:
    """The micro-batches rank `rank` trains on at optimizer step `step` (0-based).

    The order is a deterministic function of (seed, epoch), so a resumed run continues at exactly the data
    position it stopped at: no state beyond the step count is needed.
    """
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum * world
    per_epoch = max(len(examples) // per_step, 1)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order([len(e) for e in examples], per_step, cfg.data.length_group_steps,
                        cfg.optim.seed * 100003 + epoch)
    chunk = [examples[i % len(examples)] for i in order[k * per_step:(k + 1) * per_step]]
    mine = chunk[rank::world]
    # Group similar lengths into the same micro-batch: less padding, same examples per step.
    mine.sort(key=len)
    b = cfg.optim.batch_size
    return [mine[i:i + b] for i in range(0, len(mine), b)]


def epoch_order(lengths: list[int], per_step: int, group_steps: int, seed: int) -> list[int]:
    """One epoch's example order: a shuffle, then (group_steps > 1) each run of `group_steps` steps' examples
    sorted by length, cut into steps, and those steps shuffled among themselves. A step then holds examples of
    about one length, so padding to its longest wastes little, and which lengths come when stays random."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_steps <= 1:
        return order
    out: list[int] = []
    size = per_step * group_steps
    for start in range(0, len(order), size):
        group = sorted(order[start:start + size], key=lambda i: lengths[i])
        steps = [group[j:j + per_step] for j in range(0, len(group), per_step)]
        rng.shuffle(steps)
        out.extend(i for s in steps for i in s)
    return out
