"""Our sentencepiece tokenizer as a Hugging Face `tokenizers` pipeline (tokenizer.json), so a transformers user
needs neither sentencepiece nor this package to tokenize exactly as training did.

What our models (data_prep/train_tokenizer.py) use, and how each maps onto `tokenizers`:

- `identity` normalisation, spaces kept (`remove_extra_whitespaces: false`): the normaliser only turns `" "` into
  `"▁"`;
- the dummy prefix `▁` before every text (`add_dummy_prefix`), whether it starts with spaces or `\\n` or not: the
  normaliser `Prepend("▁")`;
- user-defined symbols (`\\n`, `<reserved_k>`), always one piece wherever they occur: split out first by the
  pre-tokeniser;
- words, a run of `▁` plus what follows up to the next `▁` (`allow_whitespace_only_pieces`): the pre-tokeniser
  `Split(r"▁+[^▁]*|[^▁]+", "isolated")`;
- unigram (scores) or BPE (merges ordered by the merged piece's score): `Unigram` or `BPE`, with `byte_fallback`;
- control symbols `<pad>`, `<s>`, `</s>`: special added tokens; `<s>` prepended by the post-processor (as every
  training document starts);
- decoding (`▁` -> space, bytes fused, the dummy prefix's space dropped): `Replace`, `ByteFallback`, `Fuse`,
  `Strip(left=1)`.

The one known difference: a text that contains a control symbol's spelling literally (`"<s>"`) gets that special
token from transformers (as every transformers tokenizer does), where sentencepiece spells it out in pieces.

`verify(...)` encodes texts with both and returns the first texts that differ; the exporter runs it on the eval
fixtures and refuses an export whose tokenizer disagrees (`--skip-tokenizer-check` to override).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"
WORD_PATTERN = f"{SPACE}+[^{SPACE}]*|[^{SPACE}]+"


def read_proto(model_path: str | Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto


def _check_supported(proto: Any, path: str) -> None:
    t, n = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if t.model_type not in (UNIGRAM, BPE):
        problems.append(f"model_type {t.model_type} (only unigram and BPE convert)")
    if n.precompiled_charsmap or n.name not in ("identity", ""):
        problems.append(f"normalization '{n.name}' (only 'identity' converts exactly)")
    if n.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces: true")
    if t.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix: true")
    if problems:
        raise ValueError(f"{path}: cannot convert this sentencepiece model exactly: {'; '.join(problems)}")


def _bpe_merges(pieces: list[tuple[str, float]], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every (left, right) split of every mergeable piece into two mergeable pieces, ordered by the merged piece's
    score (sentencepiece's BPE merges the adjacent pair whose concatenation scores highest), then by the ids of
    the parts."""
    rank = {p: i for i, (p, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces:
        if piece not in mergeable:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in mergeable and right in mergeable:
                merges.append((-score, rank[piece], rank[left], rank[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def build_tokenizer_json(model_path: str | Path) -> dict[str, Any]:
    """tokenizer.json (as a dict) equivalent to the sentencepiece model at `model_path`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE as BPEModel
    from tokenizers.models import Unigram

    proto = read_proto(model_path)
    _check_supported(proto, str(model_path))
    t = proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    if t.model_type == UNIGRAM:
        # Byte and control pieces are reachable only by id (byte fallback, special tokens): keep their ids, but
        # give them no chance against the text (a literal "<0x41>" in a text is not that byte).
        vocab = [(p, sc if ty in (NORMAL, USER_DEFINED) else -1e9) for (p, sc), ty in zip(pieces, types)]
        model = Unigram(vocab, unk_id=t.unk_id, byte_fallback=t.byte_fallback)
    else:
        mergeable = {p for (p, _), ty in zip(pieces, types) if ty in (NORMAL, USER_DEFINED)}
        model = BPEModel(
            vocab={p: i for i, (p, _) in enumerate(pieces)},
            merges=_bpe_merges(pieces, mergeable),
            unk_token=t.unk_piece,
            fuse_unk=True,
            byte_fallback=t.byte_fallback,
        )
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", SPACE)]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    user = sorted((p for (p, _), ty in zip(pieces, types) if ty == USER_DEFINED), key=len, reverse=True)
    splits = [pre_tokenizers.Split(Regex("|".join(re.escape(p) for p in user)), behavior="isolated")] if user else []
    splits.append(pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    added = [(i, p) for i, ((p, _), ty) in enumerate(zip(pieces, types)) if ty == CONTROL]
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for _, p in added])
    if t.bos_id >= 0:
        bos = pieces[t.bos_id][0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, t.bos_id)]
        )
    out = json.loads(tok.to_str())
    # Added tokens keep their sentencepiece ids (add_tokens appends new ids only for pieces not in the vocab).
    ids = {p: i for i, p in added}
    for entry in out["added_tokens"]:
        if ids.get(entry["content"]) != entry["id"]:
            raise AssertionError(
                f"added token {entry['content']!r} got id {entry['id']}, not {ids.get(entry['content'])}"
            )
    return out


def special_tokens(model_path: str | Path) -> dict[str, str | None]:
    """{bos_token, eos_token, pad_token, unk_token}: the pieces at the ids training used (None if unset)."""
    proto = read_proto(model_path)
    t = proto.trainer_spec

    def piece(i: int) -> str | None:
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    return {"bos_token": piece(t.bos_id), "eos_token": piece(t.eos_id), "pad_token": piece(t.pad_id),
            "unk_token": piece(t.unk_id)}  # fmt: skip


def write_hf_tokenizer(model_path: str | Path, out_dir: str | Path, model_max_length: int) -> dict[str, str | None]:
    """tokenizer.json and tokenizer_config.json in out_dir (plus the sentencepiece model itself, for reference);
    returns the special tokens."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(json.dumps(build_tokenizer_json(model_path), ensure_ascii=False, indent=1))
    specials = special_tokens(model_path)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in specials.items() if v is not None},
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n")
    (out_dir / "tokenizer.model").write_bytes(Path(model_path).read_bytes())
    return specials


def verify(model_path: str | Path, hf_tokenizer: Any, texts: Iterable[str], limit: int = 3) -> list[dict[str, Any]]:
    """Texts whose ids differ between sentencepiece (`model_path`) and `hf_tokenizer` (a transformers tokenizer or a
    `tokenizers.Tokenizer`), at most `limit` of them, each {text, sentencepiece, hf}; [] when all agree. The HF side
    is encoded without special tokens (sentencepiece adds none)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    bad = []
    for text in texts:
        want = sp.encode(text, out_type=int)
        if hasattr(hf_tokenizer, "encode_batch"):  # tokenizers.Tokenizer
            got = hf_tokenizer.encode(text, add_special_tokens=False).ids
        else:
            got = hf_tokenizer.encode(text, add_special_tokens=False)
        if got != want:
            bad.append({"text": text, "sentencepiece": want, "hf": got})
            if len(bad) >= limit:
                break
    return bad
