"""JSON that can be stored and served again.

Python's json module accepts documents that it cannot write back out: a lone UTF-16 surrogate
(`"\\ud800"`) decodes to a string no UTF-8 encoder takes, and a value nested a few hundred levels
deep decodes fine but breaks every recursive walk later. Accepted once, such a document answers
500 forever. Everything that arrives as JSON and may be stored goes through `loads` (or `check`,
for values built from parts), which refuses both with a 400; `repair` makes an upstream's document
servable instead of refusing it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from batlehub.errors import BadRequest

MAX_DEPTH = 64
"""Nesting a stored document may have; real package metadata stays far below it."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def loads(raw: bytes | str, *, what: str = "request body") -> Any:
    """Strict JSON: no NaN or Infinity, no lone surrogates, at most `MAX_DEPTH` levels deep."""
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(f"{what} is not valid JSON") from None
    check(value, what=what)
    return value


def check(value: Any, *, what: str = "document") -> None:
    """Refuse a value that could not be written back as JSON (see the module docstring)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, what)
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise BadRequest(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
            if isinstance(item, dict):
                for key, child in item.items():
                    _check_text(str(key), what)
                    if isinstance(child, str | dict | list):
                        stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item if isinstance(child, str | dict | list))


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None


def may_need_repair(raw: bytes) -> bool:
    """Whether `raw` has surrogate escapes at all (the common document has none: skip `repair`)."""
    return _SURROGATE_ESCAPE.search(raw) is not None


def repair(value: Any) -> Any:
    """`value` with every lone surrogate replaced by U+FFFD (valid pairs are kept)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {repair(k): repair(v) for k, v in value.items()}
    if isinstance(value, list):
        return [repair(v) for v in value]
    return value


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; as a duration or expiry they slip past every "> 0"
    # check (a token that never expires, a block forever) and come back out as invalid JSON.
    raise ValueError(f"{name} is not JSON")
