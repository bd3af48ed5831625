"""`export_checkpoint`: a checkpoint (any ZeRO stage, any TP size) -> a transformers directory; `check_export`:
reload that directory through its own (exported) code and compare it with the checkpoint.

An export directory holds:

- `config.json`: `FMPretrainConfig` (our model section, token ids, `dtype`, `auto_map` to the modeling files);
- `model.safetensors`, or `model-0000k-of-0000n.safetensors` and `model.safetensors.index.json` when larger than
  `max_shard_size`: the weights, keyed `model.<our parameter name>`;
- `generation_config.json`: bos / eos / pad ids, greedy by default;
- `tokenizer.json`, `tokenizer_config.json`: the tokenizer (tokenizer.py); `tokenizer.model`: the sentencepiece
  model it came from;
- `configuration_fm.py`, `modeling_fm.py`, `fm_pretrain__*.py`, `fm_kernels__*.py`: the modeling code, generated
  from our sources (bundle.py);
- `fm_pretrain_export.json`: provenance (checkpoint path, step, layout, tokenizer sha256, versions, date);
- `README.md`: how to load it.

The directory is written under `DIR.tmp` and renamed when complete.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from fm_pretrain.checkpoint import load_model, resolve_step_dir
from fm_pretrain.checkpoint.format import read_meta
from fm_pretrain.config import to_dict

from .bundle import write_bundle
from .configuration_fm import FMPretrainConfig
from .tokenizer import verify, write_hf_tokenizer

log = logging.getLogger(__name__)

# Mixers an export supports (with or without Memory Caching): each is exported by bundle.py with the model code and
# tested for equal logits and equal greedy generation (tests/export). A new mixer is added here once its generation
# cache follows fm_pretrain/model/cache.py and a round-trip test covers it.
EXPORTABLE_MIXERS = ("fm", "attention", "mamba2", "gla", "gated_delta", "mom")
EXPORT_INFO = "fm_pretrain_export.json"
FORMAT = "fm-pretrain-hf-export/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_ATOL = {"float32": 1e-5, "bfloat16": 2e-2}
AUTO_MAP = {
    "AutoConfig": "configuration_fm.FMPretrainConfig",
    "AutoModel": "modeling_fm.FMPretrainForCausalLM",
    "AutoModelForCausalLM": "modeling_fm.FMPretrainForCausalLM",
}
REPO = Path(__file__).resolve().parents[2]


class ExportError(RuntimeError):
    """The checkpoint cannot be exported; the message says why."""


class CheckFailed(RuntimeError):
    """The export does not reproduce the checkpoint; the message names the largest difference."""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def fixture_texts(data_dir: Path | None = None) -> list[str]:
    """Every prompt, prompt + continuation and answer of the 17 tasks' fixtures, and the bundled corpus lines: what
    the tokenizer check encodes both ways."""
    from fm_pretrain.eval.items import load_task
    from fm_pretrain.eval.tasks import DEFAULT_DATA_DIR, TASKS

    texts: list[str] = []
    for task in TASKS.values():
        for item in load_task(task, Path(data_dir or DEFAULT_DATA_DIR)).items:
            texts += list(item.contexts) + [c + x for c, x in zip(item.contexts, item.continuations)]
            texts += list(item.answers)
    for path in sorted((REPO / "data" / "tiny").glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts


def _model_card(info: dict[str, Any]) -> str:
    return f"""# fm-pretrain export (step {info["step"]}, {info["model_type"]})

Exported by `python -m fm_pretrain.export` from `{info["checkpoint"]}` on {info["exported_at"]}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(DIR)
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
out = model.generate(**tok(["Question: ..."], return_tensors="pt"), max_new_tokens=32, do_sample=False)
```

The modeling code (`modeling_fm.py` and the `fm_pretrain__*` / `fm_kernels__*` files) is fm-pretrain's own source,
copied at export time. It needs torch and transformers only; where the `fm_kernels` package is installed, the FM and
Mamba-2 layers use its Triton kernels on a GPU. See docs/export.md in fm-pretrain.
"""


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    check: bool = True,
    check_tokenizer: bool = True,
    data_dir: str | Path | None = None,
) -> Path:
    """Export `checkpoint` (a step_N directory, or a run / checkpoints directory whose `latest` is followed) to `out`.
    Returns `out`. With `check`, the written directory is reloaded through its own code and compared with the
    checkpoint (`check_export`)."""
    from transformers import GenerationConfig

    from fm_pretrain.eval.cli import load_tokenizer

    from .modeling_fm import FMPretrainForCausalLM

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    step_dir = resolve_step_dir(Path(checkpoint))
    meta = read_meta(step_dir)
    if "config" not in meta:
        raise ExportError(f"{step_dir}/meta.json has no 'config' entry; cannot rebuild the model")
    model_section = meta["config"].get("model", {})
    unsupported = sorted(set(model_section.get("layer_pattern", [])) - set(EXPORTABLE_MIXERS))
    if unsupported:
        raise ExportError(f"mixer(s) {unsupported} have no export support yet (exportable: {list(EXPORTABLE_MIXERS)})")
    model, cfg, meta = load_model(step_dir, "cpu")
    tok = load_tokenizer(cfg, meta, Path(tokenizer) if tokenizer else None)

    model_dict = to_dict(cfg)["model"]
    model_dict["fm"]["backend"] = "auto"  # an export chooses its kernels where it runs
    config = FMPretrainConfig.from_model_config(
        model_dict, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["FMPretrainForCausalLM"]
    with torch.device("meta"):
        hf = FMPretrainForCausalLM(config)
    hf.model = model
    hf.tie_weights()
    hf = hf.to(DTYPES[dtype])
    hf.config.dtype = DTYPES[dtype]
    hf.generation_config = GenerationConfig(
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, do_sample=False
    )

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    hf.save_pretrained(tmp, max_shard_size=max_shard_size)
    write_hf_tokenizer(tok.path, tmp, model_max_length=cfg.model.max_seq_len)
    if check_tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        bad = verify(tok.path, HFTokenizer.from_file(str(tmp / "tokenizer.json")), fixture_texts(data_dir))
        if bad:
            b = bad[0]
            raise ExportError(
                f"the converted tokenizer disagrees with {tok.path} on {b['text'][:80]!r}: sentencepiece "
                f"{b['sentencepiece'][:12]}..., tokenizer.json {b['hf'][:12]}... "
                "(--skip-tokenizer-check to export anyway)"
            )
    files = write_bundle(tmp, model)
    import transformers

    info = {
        "format": FORMAT,
        "checkpoint": str(step_dir.resolve()),
        "step": meta.get("step"),
        "layout": meta.get("layout"),
        "model_type": cfg.model.model_type,
        "tokenizer_sha256": tok.sha256,
        "dtype": dtype,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fm_pretrain_commit": _git_commit(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "modeling_files": files,
    }
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    (tmp / "README.md").write_text(_model_card(info))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported %s (step %s) to %s", step_dir, meta.get("step"), out)
    if check:
        check_export(out, step_dir, model=model.to(DTYPES[dtype]))
    return out


def load_exported(export_dir: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """The export's model through the export's own code (its modeling_fm.py, as trust_remote_code loads it), even
    when this package's classes are registered with the Auto classes."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    cls = get_class_from_dynamic_module("modeling_fm.FMPretrainForCausalLM", str(export_dir))
    kwargs = {} if dtype is None else {"dtype": dtype}
    return cls.from_pretrained(str(export_dir), **kwargs).to(device).eval()


def probe_ids(tok: Any, n_rows: int, length: int) -> torch.Tensor:
    """(n_rows, length) token ids of real EN/JA text (bos first), for comparing logits."""
    text = "\n".join(fixture_texts()[::7])
    ids = tok.encode(text)
    rows = []
    for r in range(n_rows):
        window = ids[r * length : r * length + length - 1]
        rows.append([tok.bos_id, *window] + [tok.eos_id] * (length - 1 - len(window)))
    return torch.tensor(rows, dtype=torch.long)


def _largest_difference(got: torch.Tensor, want: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    diff = (got.float() - want.float()).abs()
    flat = int(diff.argmax())
    b, t, v = (int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return {"max_abs_diff": float(diff.max()), "row": b, "position": t, "input_id": int(ids[b, t]), "vocab_id": v,
            "export": float(got[b, t, v]), "checkpoint": float(want[b, t, v])}  # fmt: skip


def check_export(
    export_dir: str | Path,
    checkpoint: str | Path | None = None,
    *,
    atol: float | None = None,
    device: str = "cpu",
    new_tokens: int = 8,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Reload the export through its own code and compare with the checkpoint (default: the one recorded in
    fm_pretrain_export.json): logits on real text, greedy generation for `new_tokens` tokens, and the tokenizer on
    the eval fixtures. Returns the report; raises CheckFailed naming the largest difference."""
    from transformers import AutoTokenizer

    from fm_pretrain.data.tokenizer import Tokenizer
    from fm_pretrain.inference import generate_tokens

    export_dir = Path(export_dir)
    info_path = export_dir / EXPORT_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} is missing: {export_dir} is not an fm-pretrain export")
    info = json.loads(info_path.read_text())
    dtype_name = info.get("dtype", "float32")
    dtype = DTYPES[dtype_name]
    atol = DEFAULT_ATOL[dtype_name] if atol is None else atol
    step_dir = resolve_step_dir(Path(checkpoint or info["checkpoint"]))
    if model is None:
        model, _, _ = load_model(step_dir, device)
        model = model.to(dtype)
    model = model.to(device).eval()
    exported = load_exported(export_dir, dtype, device)
    tok = Tokenizer(export_dir / "tokenizer.model")
    length = min(model.cfg.max_seq_len, 3 * max(model.cfg.fm.chunk_size, model.cfg.mamba2.chunk_size) + 5)
    ids = probe_ids(tok, 2, length).to(device)
    with torch.no_grad():
        want = model(ids).logits
        got = exported(input_ids=ids).logits
    report: dict[str, Any] = {"export": str(export_dir), "checkpoint": str(step_dir), "atol": atol,
                              "logits": _largest_difference(got, want, ids)}  # fmt: skip
    worst = report["logits"]
    if not worst["max_abs_diff"] <= atol:  # also fails on NaN
        raise CheckFailed(
            f"logits differ by up to {worst['max_abs_diff']:.3g} (atol {atol:g}) at row {worst['row']}, position "
            f"{worst['position']} (input id {worst['input_id']}), vocabulary id {worst['vocab_id']}: export "
            f"{worst['export']:.6g}, checkpoint {worst['checkpoint']:.6g}"
        )
    prompt = ids[:1, : min(12, length)]
    with torch.no_grad():
        ours = generate_tokens(model, prompt, new_tokens).tokens[0].tolist()
        theirs = exported.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id,
        )[0, prompt.shape[1] :].tolist()  # fmt: skip
    report["greedy"] = {"checkpoint": ours, "export": theirs}
    if ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise CheckFailed(f"greedy generation differs at new token {first}: export {theirs}, checkpoint {ours}")
    hf_tok = AutoTokenizer.from_pretrained(str(export_dir))
    specials = {"bos": (hf_tok.bos_token_id, tok.bos_id), "eos": (hf_tok.eos_token_id, tok.eos_id),
                "pad": (hf_tok.pad_token_id, tok.pad_id)}  # fmt: skip
    wrong = {k: v for k, v in specials.items() if v[0] != v[1]}
    if wrong:
        raise CheckFailed(f"tokenizer special ids differ (transformers, sentencepiece): {wrong}")
    bad = verify(export_dir / "tokenizer.model", hf_tok, fixture_texts())
    report["tokenizer_mismatches"] = len(bad)
    if bad:
        b = bad[0]
        raise CheckFailed(
            f"tokenizer differs on {b['text'][:80]!r}: {b['hf'][:12]} vs sentencepiece {b['sentencepiece'][:12]}"
        )
    return report
