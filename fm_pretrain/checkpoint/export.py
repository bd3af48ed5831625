"""Full fp32 weights out of a checkpoint, and the model rebuilt from them, for evaluation and inference outside
DeepSpeed: one process, no ranks, CPU or one GPU, at tensor_parallel = 1 whatever the checkpoint's layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fm_pretrain.config import ExperimentConfig, ParallelConfig, from_dict
from fm_pretrain.model import DecoderLM

from .format import META_FILE, UNIVERSAL_DIR, read_meta, resolve_step_dir
from .reshard import is_universal, to_universal

log = logging.getLogger(__name__)


def full_weights(universal_dir: Path) -> dict[str, torch.Tensor]:
    """{parameter name: full fp32 tensor} from a universal checkpoint directory."""
    zero = Path(universal_dir) / "zero"
    weights = {}
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()) if zero.is_dir() else []:
        blob = torch.load(param_dir / "fp32.pt", weights_only=False)
        weights[param_dir.name] = blob["param"] if isinstance(blob, dict) else blob
    if not weights:
        raise FileNotFoundError(f"{zero}: no parameter directories; is this a universal checkpoint?")
    return weights


def missing_files(step_dir: Path, meta: dict[str, Any]) -> list[str]:
    """The DeepSpeed files that a checkpoint of meta.json's layout holds and `step_dir` lacks ([] when complete):
    per TP rank t and DP rank d, ZeRO-0: mp_rank_<t>_model_states.pt; ZeRO 1/2: those and
    zero_pp_rank_<d>_mp_rank_<t>_optim_states.pt; ZeRO-3: zero_pp_rank_<d>_mp_rank_<t>_{model,optim}_states.pt."""
    layout = meta.get("layout") or {}
    dp, stage, tp = int(layout.get("dp", 1)), int(layout.get("zero_stage", 1)), int(layout.get("tp", 1))
    want = []
    for t in range(tp):
        if stage < 3:
            want.append(f"mp_rank_{t:02d}_model_states.pt")
        for d in range(dp) if stage > 0 else ():
            want += [f"zero_pp_rank_{d}_mp_rank_{t:02d}_{kind}_states.pt" for kind in ("model", "optim")[stage < 3 :]]
    return [f for f in want if not (Path(step_dir) / f).is_file()]


def load_weights(step_dir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full fp32 weights by parameter name, from the universal form (made once if missing) or, for a ZeRO-0
    checkpoint (which the universal converter cannot read), its module states. A checkpoint missing some of its
    layout's files (a partial copy) raises FileNotFoundError naming them."""
    step_dir = Path(step_dir)
    universal = step_dir / UNIVERSAL_DIR
    if is_universal(universal):
        return full_weights(universal)
    layout = meta.get("layout", {})
    missing = missing_files(step_dir, meta)
    if missing:
        raise FileNotFoundError(
            f"{step_dir}: incomplete checkpoint (layout {layout}): missing {', '.join(missing[:6])}"
            + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        )
    if int(layout.get("zero_stage", 1)) == 0:
        if int(layout.get("tp", 1)) != 1:
            raise ValueError(f"{step_dir}: a ZeRO-0 checkpoint at tensor_parallel > 1 has no full-weight form")
        states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items() if torch.is_tensor(v)}
    log.info("converting %s to its universal form (once)", step_dir)
    return full_weights(to_universal(step_dir))


def with_tied_aliases(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`weights` plus every name of a tied parameter under which it is missing (ZeRO-3 saves a tied weight under
    one name only, e.g. `embed.weight` but not `lm_head.weight`)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = dict(weights)
    for group in names.values():
        have = next((n for n in group if n in weights), None)
        for name in group:
            if have is not None and name not in out:
                out[name] = weights[have]
    return out


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[DecoderLM, ExperimentConfig, dict[str, Any]]:
    """(model in eval mode on `device`, the run's config, meta.json) of a checkpoint: a step_N directory, or the
    one `latest` names in a checkpoints or run directory. The model is rebuilt at tensor_parallel = 1 from the
    config in meta.json and loads the full fp32 weights strictly."""
    step_dir = resolve_step_dir(Path(path))
    meta = read_meta(step_dir)
    if "config" not in meta:
        raise ValueError(f"{step_dir / META_FILE}: no 'config' entry; cannot rebuild the model")
    cfg = from_dict(meta["config"], f"{step_dir / META_FILE} (config)")
    cfg.parallel = ParallelConfig()  # one process, full weights, no recomputation
    model = DecoderLM(cfg.model, cfg.parallel)
    weights = with_tied_aliases(load_weights(step_dir, meta), model)
    expected = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    missing = sorted(k for k in model.state_dict() if k not in weights)
    unexpected = sorted(k for k in weights if k not in expected)
    if missing or unexpected:
        raise KeyError(f"{step_dir}: weights do not match the config's model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")  # fmt: skip
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), cfg, meta
