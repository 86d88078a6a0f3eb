"""Reading records and turning them into training examples.

A record is `{"id": str, "text": str, "target": object?}`. Reading never crashes on a bad line: each line comes
back as a Record whose `error` says what is wrong and where (file and line), so a job can refuse the file with a
clear message or count the line as skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


@dataclass(frozen=True)
class Record:
    id: str
    text: str | None
    target: Any = None
    source: str = ""  # "file:line" the record came from
    error: str | None = None  # why the record is unusable (None when it is fine)

    @property
    def ok(self) -> bool:
        return self.error is None


def check_record(obj: Any, source: str, fallback_id: str, need_target: bool = False) -> Record:
    """Validate one parsed record; never raises."""
    if not isinstance(obj, dict):
        return Record(fallback_id, None, None, source, f"{source}: record is {type(obj).__name__}, not an object")
    rid = obj.get("id")
    rid = str(rid) if rid is not None and str(rid) != "" else fallback_id
    text = obj.get("text")
    if text is None:
        return Record(rid, None, None, source, f"{source}: missing 'text'")
    if not isinstance(text, str):
        return Record(rid, None, None, source, f"{source}: 'text' is {type(text).__name__}, not a string")
    if not text.strip():
        return Record(rid, text, None, source, f"{source}: 'text' is empty")
    target = obj.get("target")
    if need_target and target is None:
        return Record(rid, text, None, source, f"{source}: missing 'target'")
    if target is not None and not isinstance(target, dict):
        return Record(rid, text, None, source, f"{source}: 'target' is {type(target).__name__}, not an object")
    return Record(rid, text, target, source)


def read_jsonl(path: str | Path, need_target: bool = False) -> Iterator[Record]:
    """Yield one Record per non-blank line; malformed lines come back with `error` set (file and line named)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            source = f"{path}:{lineno}"
            fallback = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Record(fallback, None, None, source, f"{source}: not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(fallback, None, None, source, f"{source}: not valid JSON ({e.msg}, column {e.colno})")
                continue
            yield check_record(obj, source, fallback, need_target)


def spread(items: list, n: int) -> list:
    """`n` items evenly spaced over `items` (all of them if n <= 0 or n >= len). Not the first n: data files are
    often grouped by class (SNIPS dev/test are sorted by intent, so the first 100 records are all AddToPlaylist)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


@dataclass(frozen=True)
class Example:
    """One tokenised training example: answer-only labels (-100 on prompt tokens)."""
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pad_batch(examples: list[Example], pad_id: int, multiple_of: int = 8) -> dict[str, "Any"]:
    """Right-pad a list of examples into tensors (training uses right padding; generation uses left)."""
    import torch

    n = max(len(e) for e in examples)
    n = -(-n // multiple_of) * multiple_of
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
