"""Streaming JSONL reader that validates every line and reports problems as `file:line` (see readers.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from fm_pretrain.data.readers import Source, iter_documents


def iter_jsonl(
    path: str | os.PathLike,
    text_field: str = "text",
    on_bad_line: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield `(line_no, text)` for each document of a JSONL file (plain, .gz or .zst), one line at a time.

    A line that is not UTF-8, not JSON, not an object, lacks `text_field` or whose field is not a string
    raises DataError("{path}:{line_no}: ...") -- or, if `on_bad_line` is given, is passed to it as
    (line_no, reason) and skipped. Blank lines are ignored (they are not documents). Line numbers are
    1-based. Empty texts are yielded: rejecting them is the caller's policy.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    name = path.lower()
    compression = "gz" if name.endswith(".gz") else "zst" if name.endswith(".zst") else ""
    bad = None if on_bad_line is None else (lambda line, _kind, reason: on_bad_line(line, reason))
    yield from iter_documents(Source(path, "jsonl", compression), text_field, bad)  # type: ignore[arg-type]
