"""Cut the committed fixtures (data/eval) from a full benchmark tree: the first N items of every file, same format.

    python -m fm_pretrain.eval.fixtures SRC_DIR DST_DIR [--items 30] [--fewshot-items 10]

SRC_DIR is laid out like shared/data/eval. Eval splits keep their first `--items` items, few-shot-only material
(train splits, XWinograd's train rows) its first `--fewshot-items`. Line-based files keep their lines verbatim;
JSON is re-serialised the way the source is written (JSQuAD: one line; JEMHopQA: tab-indented); NIILC keeps the
XML text of its first questions. Licence files are copied unchanged. Deterministic: the same source gives the
same bytes, which tests/test_eval_data.py checks against ../shared when it is present.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

LICENCES = [
    "en/mgsm/LICENSE.txt",
    "en/xwinograd/LICENSE.txt",
    "ja/JGLUE_LICENSE.txt",
    "ja/jemhopqa/LICENSE.txt",
    "ja/mgsm/LICENSE.txt",
    "ja/niilc/LICENSE.txt",
    "ja/xwinograd/LICENSE.txt",
]
FIRST_LINES = [  # (file, few-shot only?)
    ("en/arc_challenge/validation.jsonl", False),
    ("en/arc_easy/validation.jsonl", False),
    ("en/boolq/validation.jsonl", False),
    ("en/hellaswag/validation.jsonl", False),
    ("en/lambada_openai/test.jsonl", False),
    ("en/mgsm/mgsm_en.tsv", False),
    ("en/openbookqa/validation.jsonl", False),
    ("en/piqa/validation.jsonl", False),
    ("en/winogrande/validation.jsonl", False),
    ("ja/jcommonsenseqa/train.jsonl", True),
    ("ja/jcommonsenseqa/valid.jsonl", False),
    ("ja/jnli/valid.jsonl", False),
    ("ja/mgsm/mgsm_ja.tsv", False),
]
XWINOGRAD = ["en/xwinograd/xwinograd_en.tsv", "ja/xwinograd/xwinograd_jp.tsv"]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _xwinograd(lines: list[str], n: int, n_train: int) -> str:
    """The first n eval rows and the first n_train train rows (column 2 names a train subset), in file order."""
    kept, n_eval, n_tr = [], 0, 0
    for line in lines:
        is_train = "train" in line.split("\t")[1]
        if is_train and n_tr < n_train:
            n_tr += 1
        elif not is_train and n_eval < n:
            n_eval += 1
        else:
            continue
        kept.append(line)
    return "".join(kept)


def _squad(doc: dict, n: int) -> dict:
    """The first n questions, with their articles and paragraphs (empty ones dropped)."""
    data, left = [], n
    for article in doc["data"]:
        paragraphs = []
        for par in article["paragraphs"]:
            if left <= 0:
                break
            paragraphs.append({**par, "qas": par["qas"][:left]})
            left -= len(paragraphs[-1]["qas"])
        if paragraphs:
            data.append({**article, "paragraphs": paragraphs})
        if left <= 0:
            break
    return {**doc, "data": data}


def _niilc(text: str, n: int) -> str:
    """The XML text up to the end of the n-th <question>, then the closing </questions>."""
    ends = [m.end() for m in re.finditer(r"</question>\n", text)]
    cut = ends[min(n, len(ends)) - 1]
    return text[:cut] + "</questions>\n"


def make_fixtures(src: Path, dst: Path, items: int = 30, fewshot_items: int = 10) -> list[Path]:
    """Write the fixture tree under dst; returns the files written."""
    written = []
    for rel, fewshot_only in FIRST_LINES:
        _write(dst / rel, "".join(_lines(src / rel)[: fewshot_items if fewshot_only else items]))
        written.append(dst / rel)
    for rel in XWINOGRAD:
        _write(dst / rel, _xwinograd(_lines(src / rel), items, fewshot_items))
        written.append(dst / rel)
    squad = _squad(json.loads((src / "ja/jsquad/valid.json").read_text(encoding="utf-8")), items)
    _write(dst / "ja/jsquad/valid.json", json.dumps(squad, ensure_ascii=False) + "\n")
    for rel, n in (("ja/jemhopqa/dev.json", items), ("ja/jemhopqa/train.json", fewshot_items)):
        rows = json.loads((src / rel).read_text(encoding="utf-8"))[:n]
        _write(dst / rel, json.dumps(rows, ensure_ascii=False, indent="\t"))
    _write(dst / "ja/niilc/dev.xml", _niilc((src / "ja/niilc/dev.xml").read_text(encoding="utf-8"), items))
    written += [dst / "ja/jsquad/valid.json", dst / "ja/jemhopqa/dev.json", dst / "ja/jemhopqa/train.json"]
    written.append(dst / "ja/niilc/dev.xml")
    for rel in LICENCES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
        written.append(dst / rel)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--items", type=int, default=30)
    p.add_argument("--fewshot-items", type=int, default=10)
    args = p.parse_args(argv)
    for path in make_fixtures(args.src, args.dst, args.items, args.fewshot_items):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
