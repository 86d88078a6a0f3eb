"""How the app refuses: a caller's error carried back from a model replica, messages cleaned of internals, 503s
that say when to retry."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi import HTTPException


class RequestError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


INTERNALS = re.compile(r"(\S*/)+\S+\.(cc|cpp|h|hpp|py)(:\d+)?:?|\[\d\d:\d\d:\d\d\]|Check failed: \(.*?\) is false:")


def public(message: str) -> str:
    """An error message without source paths, log timestamps or assertion text (xgrammar's C++ errors carry all
    three), at most 500 characters."""
    return re.sub(r"\s+", " ", INTERNALS.sub("", message)).strip()[:500]

def check_unicode(value: Any, what: str) -> None:
    """400 for a lone surrogate (JSON allows "\\udc50"; the tokenizer and the grammar compiler cannot take it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(400, f"{what} is not valid Unicode (it holds a lone surrogate code point)") from None

def unavailable(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": "1"})
