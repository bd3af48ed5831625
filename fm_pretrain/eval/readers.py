"""Readers for the benchmark source formats (JSON Lines, TSV, JSON, XML), each yielding `Record`s.

Every record carries `where` (file and line, or file and key path) so that any problem found later, by the
reader or by a task's item builder, names the exact place in the input.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EvalDataError(ValueError):
    """A malformed benchmark file; the message names the file and the line or key at fault."""


@dataclass(frozen=True)
class Record:
    where: str  # "path:line" or "path:key.path", for error messages
    data: Any  # a dict (JSON, XML) or a list of column strings (TSV)

    def get(self, key: str, kind: type | tuple[type, ...] = str) -> Any:
        """The value of `key`, checked to be of `kind`; a missing key or a wrong type names the record."""
        if not isinstance(self.data, dict):
            raise EvalDataError(f"{self.where}: expected an object, got {type(self.data).__name__}")
        if key not in self.data:
            raise EvalDataError(f"{self.where}: missing key '{key}' (has {sorted(self.data)})")
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise EvalDataError(f"{self.where}: key '{key}' should be {_kind_name(kind)}, got {value!r}")
        return value

    def col(self, i: int) -> str:
        return self.data[i]

    def json_col(self, i: int, what: str) -> Any:
        """Column i parsed as JSON (XWinograd's token and span columns)."""
        try:
            return json.loads(self.data[i])
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{self.where}: column {i + 1} ({what}) is not valid JSON: {e}") from None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _open(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    return path


def read_jsonl(path: Path) -> Iterator[Record]:
    """One record per non-blank line; each line must be a JSON object."""
    with _open(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield Record(f"{path}:{lineno}", obj)


def read_tsv(path: Path, n_cols: int) -> Iterator[Record]:
    """Headerless tab-separated rows of exactly `n_cols` columns (MGSM: 2, XWinograd: 7)."""
    with _open(path).open(encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) != n_cols:
                raise EvalDataError(f"{path}:{lineno}: expected {n_cols} tab-separated columns, got {len(cols)}")
            yield Record(f"{path}:{lineno}", cols)


def read_json(path: Path) -> Any:
    """A whole JSON document (JSQuAD's SQuAD-style object, JEMHopQA's array)."""
    try:
        return json.loads(_open(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def read_json_array(path: Path) -> Iterator[Record]:
    """Records of a top-level JSON array, located as path:[i]."""
    doc = read_json(path)
    if not isinstance(doc, list):
        raise EvalDataError(f"{path}: expected a JSON array at the top level, got {type(doc).__name__}")
    for i, obj in enumerate(doc):
        yield Record(f"{path}:[{i}]", obj)


def read_squad(path: Path) -> Iterator[Record]:
    """One record per question of a SQuAD-v1.1-style file, with the paragraph's title and context merged in."""
    doc = read_json(path)
    root = Record(str(path), doc)
    for a, article in enumerate(root.get("data", list)):
        art = Record(f"{path}:data[{a}]", article)
        title = art.get("title")
        for p, paragraph in enumerate(art.get("paragraphs", list)):
            par = Record(f"{art.where}.paragraphs[{p}]", paragraph)
            context = par.get("context")
            for q, qa in enumerate(par.get("qas", list)):
                where = f"{par.where}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise EvalDataError(f"{where}: expected an object, got {type(qa).__name__}")
                yield Record(where, {**qa, "title": title, "context": context})


def read_niilc_xml(path: Path) -> Iterator[Record]:
    """NIILC's `<questions><question id=...><text/><answers><answer/>...</answers>...` as {id, text, answers}."""
    try:
        root = ET.parse(_open(path)).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise EvalDataError(f"{path}:{line}: XML parse error at column {col}: {e}") from None
    if root.tag != "questions":
        raise EvalDataError(f"{path}: root element is <{root.tag}>, expected <questions>")
    for i, q in enumerate(root.findall("question")):
        qid = q.get("id")
        where = f"{path}:question[{i}] id={qid}"
        if not qid:
            raise EvalDataError(f"{where}: <question> without an id attribute")
        text = q.find("text")
        if text is None or not (text.text or "").strip():
            raise EvalDataError(f"{where}: missing or empty <text>")
        answers = q.find("answers")
        if answers is None:
            raise EvalDataError(f"{where}: missing <answers>")
        golds = [(a.text or "").strip() for a in answers.findall("answer")]
        yield Record(where, {"id": qid, "text": text.text.strip(), "answers": [g for g in golds if g]})
