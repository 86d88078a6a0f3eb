"""Reading records and turning them into training examples.

A record is `{"id": str, "text": str, "target": object?, "context": object or str?}`: the context is what the
text answers (e.g. the slot a dialogue system just asked for); the prompt shows it next to the text. Reading never crashes on a bad line: each line comes
back as a Record whose `error` says what is wrong and where (file and line), so a job can refuse the file with a
clear message or count the line as skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from jsonextract.data.io import is_uri, read_bytes
from jsonextract.errors import UserError
from jsonextract.lazy import lazy

torch = lazy("torch")


@dataclass(frozen=True)
class Record:
    id: str
    text: str | None
    target: Any = None
    source: str = ""  # "file:line" the record came from
    error: str | None = None  # why the record is unusable (None when it is fine)
    raw: Any = field(default=None, repr=False, compare=False)  # the parsed input object (pass-through columns)
    context: dict | str | None = None  # what the text answers, shown to the model beside it (prompt.context_text)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Columns:
    """Which keys of an input record hold the text, the id and the gold target."""
    text: str = "text"
    id: str = "id"
    target: str = "target"
    context: str = "context"


def json_value(v: Any, default: Any = None) -> Any:
    """A value stored either as JSON text (a Parquet/JSONL result column) or already parsed; `default` for None."""
    if v is None:
        return default
    return json.loads(v) if isinstance(v, str) else v


def check_record(obj: Any, source: str, fallback_id: str, need_target: bool = False,
                 cols: Columns = Columns()) -> Record:
    """Validate one parsed record (a JSON object, or a Parquet/CSV row); never raises. A target given as a JSON
    string (CSV) is parsed. A record whose text is usable but whose target is not keeps its text (`text` is not
    None), so a job that needs no target can still use it."""
    if not isinstance(obj, dict):
        return Record(fallback_id, None, None, source, f"{source}: record is {type(obj).__name__}, not an object")
    rid = obj.get(cols.id)
    rid = str(rid) if rid is not None and str(rid) != "" else fallback_id
    text = obj.get(cols.text)
    if text is None or (isinstance(text, float) and text != text):  # NaN: a null in CSV/Parquet
        return Record(rid, None, None, source, f"{source}: missing '{cols.text}'")
    if not isinstance(text, str):
        return Record(rid, None, None, source, f"{source}: '{cols.text}' is {type(text).__name__}, not a string")
    if not text.strip():
        return Record(rid, None, None, source, f"{source}: '{cols.text}' is empty")
    target = obj.get(cols.target)
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except json.JSONDecodeError:
            return Record(rid, text, None, source, f"{source}: '{cols.target}' is a string that is not JSON", obj)
    if need_target and target is None:
        return Record(rid, text, None, source, f"{source}: missing '{cols.target}'", obj)
    if target is not None and not isinstance(target, dict):
        return Record(rid, text, None, source, f"{source}: '{cols.target}' is {type(target).__name__}, not an object",
                      obj)
    context, problem = parse_context(obj.get(cols.context))
    if problem:
        return Record(rid, None, None, source, f"{source}: '{cols.context}' {problem}", obj)
    return Record(rid, text, target, source, raw=obj, context=context)


def parse_context(value: Any) -> tuple[dict | str | None, str | None]:
    """(context, None) or (None, what is wrong). A context is a JSON object or a string; a string that holds a
    JSON object (a CSV cell, a Parquet string column) is that object, so the model sees one rendering of it.
    Null, NaN (a missing CSV/Parquet cell) and an empty string are no context."""
    if value is None or (isinstance(value, float) and value != value):
        return None, None
    if isinstance(value, str):
        if value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                return value, None
            return (parsed, None) if isinstance(parsed, dict) else (value, None)
        return (value if value.strip() else None), None
    if isinstance(value, dict):
        return value, None
    return None, f"is {type(value).__name__}, not an object or string"


def parse_jsonl(lines: Iterable[bytes], path: str, need_target: bool = False,
                cols: Columns = Columns()) -> Iterator[Record]:
    """One Record per non-blank line of a JSONL file; a malformed line comes back with `error` set, naming the
    file and line. The only JSONL record parser: training data, evaluation gold and the batch job use it."""
    name = PurePosixPath(path).name
    for lineno, raw in enumerate(lines, 1):
        source, fallback = f"{path}:{lineno}", f"{name}:{lineno}"
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
        yield check_record(obj, source, fallback, need_target, cols)


def read_jsonl(path: str | Path, need_target: bool = False) -> Iterator[Record]:
    """Records of a JSONL file, local or a URI (see parse_jsonl)."""
    if is_uri(path):
        yield from parse_jsonl(read_bytes(path, "data file").splitlines(), str(path), need_target)
        return
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    with open(path, "rb") as f:
        yield from parse_jsonl(f, str(path), need_target)


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
