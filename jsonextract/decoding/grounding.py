"""Where each extracted value comes from, and how sure the decoder was of it.

Grounding: every string leaf of an output (list elements included) is looked up in the source text: exactly
first, then ignoring case, whitespace and punctuation, then by a bounded fuzzy match (rapidfuzz's partial-ratio
alignment); when a value occurs more than once, an occurrence of whole words wins over a piece of a word, then
the occurrence nearest the previous field's span. Offsets
are Python `str` indices into the original text (`text[start:end]` is the matched text). Enum and const values,
numbers and booleans are labels chosen from the schema, not spans of the text: they are marked "label".

Snapping (the `snap` policy, for schemas whose free-text values are spans of the text): a value the model did not
copy as whole words (found only by the fuzzy match, not at all, or inside a word) is replaced by the span of the text most like it, whole
words only; a value with no span close enough is dropped, as under `drop_ungrounded`. A small model copies names
and titles with letters changed ("Ovenn" for "Owen"); the value it meant is almost always the nearest span.

Paths are the flattened paths the metrics use (`slots.artist`), with list elements indexed (`slots.x[0]`).
"""
from __future__ import annotations

import copy
import json
import math
import re
import unicodedata
from typing import Any, Iterator

from rapidfuzz import fuzz, process

from jsonextract.data.schema import validation_error

FUZZY_MIN_SCORE = 85.0  # rapidfuzz partial_ratio (0-100) a fuzzy match needs
FUZZY_MIN_CHARS = 4  # shorter values match too many places by chance: exact or normalised only
# rapidfuzz ratio (0-100) between a value and the span that replaces it under `snap`: the best on both SNIPS and
# Restaurant-8k dev of 50-80 (docs/experiments.md, "Snapping values to the text")
SNAP_MIN_SCORE = 60.0
_WORD = re.compile(r"\S+")
_EDGE_PUNCT = re.compile(r"\W*(.*?)\W*$", re.S)  # match() anchors the start; $ is endpos


def leaves(obj: Any, schema: dict | None, root: dict | None = None, prefix: str = "") -> Iterator[tuple]:
    """(path, value, is_label, parent, key) for every leaf of `obj`, in output order."""
    root = root if root is not None else schema
    node = _resolve(schema, root)
    if isinstance(obj, dict):
        props = node.get("properties", {}) if isinstance(node, dict) else {}
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (dict, list)):
                yield from leaves(v, props.get(k), root, path)
            else:
                yield path, v, _is_label(v, props.get(k), root), obj, k
    elif isinstance(obj, list):
        items = node.get("items") if isinstance(node, dict) else None
        for i, v in enumerate(obj):
            path = f"{prefix}[{i}]"
            if isinstance(v, (dict, list)):
                yield from leaves(v, items, root, path)
            else:
                yield path, v, _is_label(v, items, root), obj, i


def _resolve(node: Any, root: dict | None) -> Any:
    for _ in range(32):  # local $ref chains; bounded, a cycle ends here
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/")):
            return node
        target: Any = root
        for part in node["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        node = target
    return node


def _is_label(value: Any, node: Any, root: dict | None) -> bool:
    if value is None:
        return False
    if isinstance(value, (bool, int, float)):
        return True
    node = _resolve(node, root)
    return isinstance(node, dict) and ("enum" in node or "const" in node)


# ---------------------------------------------------------------------------------------------- spans


class NormalizedText:
    """The text case-folded, with every run of whitespace and punctuation made one space ("in-Green" and
    "in  green" both read "in green"), and the index in the original text of every normalised character."""

    def __init__(self, text: str):
        chars, index = [], []
        for i, ch in enumerate(text):
            if ch.isspace() or unicodedata.category(ch)[0] == "P":
                if chars and chars[-1] != " ":
                    chars.append(" ")
                    index.append(i)
                continue
            for c in ch.casefold():
                chars.append(c)
                index.append(i)
        self.text, self.index = "".join(chars), index

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Original-text (start, end) of the normalised slice [start, end)."""
        return self.index[start], self.index[end - 1] + 1


def normalize(value: str) -> str:
    return NormalizedText(value).text.strip()


def _occurrences(haystack: str, needle: str) -> list[int]:
    out, i = [], haystack.find(needle)
    while i >= 0 and len(out) < 1000:
        out.append(i)
        i = haystack.find(needle, i + 1)
    return out


def _at_word_edges(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] neither starts nor ends inside a word."""
    return not ((0 < start < len(text) and text[start - 1].isalnum() and text[start].isalnum())
                or (0 < end < len(text) and text[end - 1].isalnum() and text[end].isalnum()))


def _nearest(spans: list[tuple[int, int]], text: str, anchor: int) -> tuple[int, int]:
    """The occurrence to report: whole words before a piece of a word ("Au" the name, not the start of
    "August"), then the one nearest `anchor`."""
    return min(spans, key=lambda s: (not _at_word_edges(text, *s), abs(s[0] - anchor)))


def locate(value: str, text: str, norm: NormalizedText, anchor: int) -> dict | None:
    """{"start", "end", "match"} of `value` in `text` (whole words first, then the occurrence nearest
    `anchor`), or None."""
    if not value.strip():
        return None
    hits = _occurrences(text, value)
    if hits:
        start, end = _nearest([(h, h + len(value)) for h in hits], text, anchor)
        return {"start": start, "end": end, "match": "exact"}
    needle = normalize(value)
    if not needle:
        return None
    hits = _occurrences(norm.text, needle)
    if hits:
        start, end = _nearest([norm.span(h, h + len(needle)) for h in hits], text, anchor)
        return {"start": start, "end": end, "match": "normalized"}
    if len(needle) >= FUZZY_MIN_CHARS and norm.text:
        al = fuzz.partial_ratio_alignment(needle, norm.text, score_cutoff=FUZZY_MIN_SCORE)
        if al is not None and al.dest_end > al.dest_start:
            start, end = norm.span(al.dest_start, al.dest_end)
            return {"start": start, "end": end, "match": "fuzzy"}
    return None


def ground(output: Any, text: str, schema: dict | None) -> dict[str, dict | None]:
    """{path: {"start", "end", "match"} | {"match": "label"} | None} for every non-null leaf of `output`."""
    norm = NormalizedText(text)
    out: dict[str, dict | None] = {}
    anchor = 0
    for path, value, is_label, _, _ in leaves(output, schema):
        if value is None:
            continue
        if is_label:
            out[path] = {"match": "label"}
            continue
        span = locate(str(value), text, norm, anchor)
        out[path] = span
        if span is not None:
            anchor = span["end"]
    return out


class WordRuns:
    """The runs of n whole words of a text, punctuation at their edges trimmed: their spans and normalised strings,
    built once per n and shared by every value snapped into the same text (a long text has many)."""

    def __init__(self, text: str):
        self.text = text
        self.words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        self._runs: dict[int, tuple[list[tuple[int, int]], list[str]]] = {}

    def runs(self, n: int) -> tuple[list[tuple[int, int]], list[str]]:
        if n not in self._runs:
            spans, strings = [], []
            for i in range(len(self.words) - n + 1):
                m = _EDGE_PUNCT.match(self.text, self.words[i][0], self.words[i + n - 1][1])
                if m.end(1) > m.start(1):
                    spans.append((m.start(1), m.end(1)))
                    strings.append(normalize(m.group(1)))
            self._runs[n] = spans, strings
        return self._runs[n]


def nearest_span(value: str, text: str | WordRuns) -> tuple[float, int, int] | None:
    """(score, start, end) of the span of `text` most like `value`: runs of whole words, as many as the value has
    words or one more or fewer, punctuation at their edges trimmed, scored by rapidfuzz's ratio of the normalised
    strings; None when the text has no words. Ties go to the fewest words, then the first span."""
    runs = text if isinstance(text, WordRuns) else WordRuns(text)
    needle = normalize(value)
    if not needle:
        return None
    k = len(value.split())
    best: tuple[float, int, int] | None = None
    for n in range(max(1, k - 1), k + 2):
        spans, strings = runs.runs(n)
        if not strings:
            continue
        scores = process.cdist([needle], strings, scorer=fuzz.ratio)[0]
        i = int(scores.argmax())  # the first of the best
        if best is None or scores[i] > best[0]:
            best = (float(scores[i]), *spans[i])
    return best


def snap(output: dict, grounding: dict, text: str, schema: dict | None) -> tuple[dict, dict[str, str]]:
    """(output with each free-text value that is not a span of whole words of the text replaced by its
    `nearest_span` scoring at least SNAP_MIN_SCORE, {path: the value replaced}). Not whole words: `grounding`
    found it only fuzzily, not at all, or inside a word ("u" in "Au"). A replacement the schema would reject (a
    pattern, a length) is not made. The values left unreplaced are for the caller to drop."""
    out = copy.deepcopy(output)
    snapped: dict[str, str] = {}
    runs = WordRuns(text)
    for path, value, is_label, parent, key in leaves(out, schema):
        found = grounding.get(path)
        if is_label or not isinstance(value, str) or (found is not None and _whole_words(found, text)):
            continue
        near = nearest_span(value, runs)
        if near is None or near[0] < SNAP_MIN_SCORE:
            continue
        parent[key] = text[near[1]:near[2]]
        if schema is not None and validation_error(out, schema) is not None:
            parent[key] = value
            continue
        snapped[path] = value
    return out, snapped


def _whole_words(found: dict, text: str) -> bool:
    """Whether a located span is an exact or normalised match that starts and ends at word boundaries."""
    return found.get("match") in ("exact", "normalized") and _at_word_edges(text, found["start"], found["end"])


def spans_of_whole_words(grounding: dict, text: str) -> dict:
    """`grounding` with every free-text value that is not a span of whole words marked not found (None)."""
    return {p: g if g is None or g.get("match") == "label" or _whole_words(g, text) else None
            for p, g in grounding.items()}


def drop_ungrounded(output: dict, grounding: dict, schema: dict | None) -> tuple[dict, list[str], list[str]]:
    """(output without the free-text values that are not in the text, paths dropped, paths kept because the
    schema requires them). A dropped object field is removed (or set to null where only that validates); a
    dropped list element is removed. The result still validates against `schema`."""
    out = copy.deepcopy(output)
    dropped, kept = [], []
    targets = [(path, parent, key) for path, _, is_label, parent, key in leaves(out, schema)
               if not is_label and path in grounding and grounding[path] is None]
    for path, parent, key in reversed(targets):  # from the end: list indices before it stay valid
        value = parent[key]
        attempts = ("remove", "null") if isinstance(parent, dict) else ("remove",)
        for how in attempts:
            if how == "remove":
                parent.pop(key)
            else:
                parent[key] = None
            if schema is None or validation_error(out, schema) is None:
                dropped.append(path)
                break
            if how == "remove":
                if isinstance(parent, dict):
                    parent[key] = value
                else:
                    parent.insert(key, value)
        else:
            parent[key] = value
            kept.append(path)
    return out, sorted(dropped), sorted(kept)


# ---------------------------------------------------------------------------------------------- confidence


def leaf_spans(obj: Any, schema: dict | None) -> tuple[str, dict[str, tuple[int, int]]]:
    """The canonical (compact) JSON of `obj`, and each leaf's character span in it (a string's content, without
    its quotes). The decoder writes exactly this text, so token offsets map onto it."""
    spans: dict[str, tuple[int, int]] = {}
    parts: list[str] = []
    pos = 0

    def emit(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    def walk(v: Any, path: str) -> None:
        if isinstance(v, dict):
            emit("{")
            for i, (k, x) in enumerate(v.items()):
                emit(("," if i else "") + json.dumps(k, ensure_ascii=False) + ":")
                walk(x, f"{path}.{k}" if path else str(k))
            emit("}")
        elif isinstance(v, list):
            emit("[")
            for i, x in enumerate(v):
                if i:
                    emit(",")
                walk(x, f"{path}[{i}]")
            emit("]")
        else:
            s = json.dumps(v, ensure_ascii=False)
            if isinstance(v, str):
                spans[path] = (pos + 1, pos + len(s) - 1)
            elif v is not None:
                spans[path] = (pos, pos + len(s))
            emit(s)

    walk(obj, "")
    return "".join(parts), spans


def value_tokens(raw: str, obj: Any, schema: dict | None, token_ends: list[int]) -> dict[str, list[int]]:
    """{path: indices of the tokens that overlap the leaf's span in `raw` (for an empty string, the token at its
    position)}. Empty when `raw` is not the canonical form."""
    text, spans = leaf_spans(obj, schema)
    if text != raw or not token_ends:
        return {}
    out = {}
    for path, (start, end) in spans.items():
        idx, prev = [], 0
        for i, tok_end in enumerate(token_ends):
            if tok_end > start and prev < max(end, start + 1):
                idx.append(i)
            prev = tok_end
            if prev >= max(end, start + 1):
                break
        if idx:
            out[path] = idx
    return out


def confidence(raw: str, obj: Any, schema: dict | None, token_ends: list[int], logprobs: list[float]) -> dict:
    """{path: probability} per leaf: the geometric mean of the probabilities of the tokens that wrote the value,
    under the constrained (masked, renormalised) distribution. Empty when `raw` is not the canonical form."""
    return {path: round(math.exp(sum(logprobs[i] for i in idx) / len(idx)), 4)
            for path, idx in value_tokens(raw, obj, schema, token_ends).items()}
