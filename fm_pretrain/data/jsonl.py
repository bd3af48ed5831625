"""Streaming JSONL reader that validates every line and reports problems as `file:line`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

from fm_pretrain.data import DataError


def iter_jsonl(
    path: str | os.PathLike,
    text_field: str = "text",
    on_bad_line: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield `(line_no, text)` for each document of a JSONL file, one line at a time.

    A line that is not JSON, not an object, lacks `text_field` or whose field is not a string raises
    DataError("{path}:{line_no}: ...") -- or, if `on_bad_line` is given, is passed to it as
    (line_no, reason) and skipped. Blank lines are ignored (they are not documents). Line numbers are
    1-based. Empty texts are yielded: rejecting them is the caller's policy.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    # Binary mode so that invalid UTF-8 is reported on its own line, like any other bad line.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            text, reason = _parse_line(raw, text_field)
            if reason is None:
                yield line_no, text
            elif on_bad_line is None:
                raise DataError(f"{path}:{line_no}: {reason}")
            else:
                on_bad_line(line_no, reason)


def _parse_line(raw: bytes, text_field: str) -> tuple[str, str | None]:
    """Return (text, None) for a good line, or ("", reason) for a bad one."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return "", f"not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return "", f"not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return "", f"expected a JSON object, got {type(obj).__name__}"
    if text_field not in obj:
        return "", f"missing field {text_field!r} (keys: {sorted(obj)[:10]})"
    text = obj[text_field]
    if not isinstance(text, str):
        return "", f"field {text_field!r} is {type(text).__name__}, expected a string"
    return text, None
