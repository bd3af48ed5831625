"""Resharding: load a checkpoint written at one (data-parallel size, ZeRO stage) at another.

The layout-free form is DeepSpeed's universal checkpoint: `step_N/universal/zero/<param name>/{fp32, exp_avg,
exp_avg_sq, step}.pt` hold full, unsharded tensors keyed by parameter name, plus the common optimizer state and
the model-states file (LR scheduler, client state). `to_universal` makes it from a step_N directory with
DeepSpeed's `ds_to_universal` (offline, no ranks needed); `load_resharded` loads it into an engine of any layout
with `load_universal`.

Tensor parallelism: `ds_to_universal` merges tensor-parallel shards into full tensors, and `load_universal` slices
them again per TP rank, following the `universal_checkpoint_info` saved in the checkpoint (which parameters are
split along which dim, which are replicated; DeepSpeed's PARAMETER_WITH_ROW_PARALLELISM_PATTERNS etc.). The TP
model must provide that dict; see docs/operations.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from fm_pretrain.training.checkpoint import TMP_SUFFIX, Layout

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"


def to_universal(tag_dir: Path, out_dir: Path | None = None) -> Path:
    """Convert a DeepSpeed checkpoint directory (ZeRO 1-3, any DP size) to the universal form; returns its path.

    Written to a temporary directory and renamed when complete, so an interrupted conversion leaves nothing
    that looks usable.
    """
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = Path(tag_dir)
    out_dir = Path(out_dir) if out_dir is not None else tag_dir / UNIVERSAL_DIR
    if not any(tag_dir.glob("*optim_states.pt")):
        raise ValueError(
            f"{tag_dir}: no ZeRO optimizer shards (*optim_states.pt); resharding needs a checkpoint written with "
            "ZeRO stage >= 1 (ds_configs/zero1.json ... zero3.json)"
        )
    tmp = out_dir.with_name(out_dir.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    ds_to_universal.main(args)
    _add_zero3_entries(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def _add_zero3_entries(universal: Path) -> None:
    """Make a universal checkpoint from ZeRO 1/2 loadable under ZeRO-3 as well (DeepSpeed 0.19.8 writes
    stage-specific names): ZeRO-3 looks for a `zero_pp_rank_0_*` model-states file and for the optimizer step
    under `optimizer_state_dict` in zero/optimizer_state.pt."""
    for f in universal.glob("mp_rank_*_model_states.pt"):
        z3_name = universal / f"zero_pp_rank_0_{f.name}"
        if not z3_name.exists():
            shutil.copyfile(f, z3_name)
    optim_path = universal / "zero" / "optimizer_state.pt"
    sd = torch.load(optim_path, weights_only=False)
    if "optimizer_state_dict" not in sd:
        any_step = next((universal / "zero").glob("*/step.pt"), None)
        step = torch.load(any_step, weights_only=False) if any_step else None
        # ZeRO-3 copies param_groups[0] into every group: give it only the learning rate (same in every group
        # under our schedules), so each group keeps its own weight decay.
        lr = sd["param_groups"][0]["lr"]
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": [{"lr": lr}]}
        torch.save(sd, optim_path)


def load_resharded(engine, tag_dir: Path, saved: Layout, current: Layout) -> None:
    """Load `tag_dir` (written at layout `saved`) into `engine` (layout `current`) via the universal form."""
    if saved.tp != current.tp:
        raise NotImplementedError(
            f"{tag_dir}: tensor-parallel size {saved.tp} -> {current.tp} needs the model's universal checkpoint "
            "info (see docs/operations.md, 'Resharding')"
        )
    if current.zero_stage == 0:
        raise ValueError(
            f"{tag_dir}: resharding a checkpoint (layout {saved}) into a ZeRO-0 run is not supported; use "
            "ZeRO >= 1 (train.ds_config=ds_configs/zero1.json) for the resumed run"
        )
    universal = tag_dir / UNIVERSAL_DIR
    if dist.get_rank() == 0 and not (universal / "zero" / "optimizer_state.pt").is_file():
        log.info("converting %s to DeepSpeed's universal form (once)", tag_dir)
        to_universal(tag_dir)
    dist.barrier()
    cfg = engine._config  # the universal switch is read only at load time
    previous, cfg.load_universal_checkpoint = cfg.load_universal_checkpoint, True
    try:
        load_path, _ = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL_DIR)
    finally:
        cfg.load_universal_checkpoint = previous
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")
    # DeepSpeed's ZeRO-3 universal load hands one `step` tensor object to every parameter group; Adam increments
    # it in place once per group, so later groups would see a wrong bias correction. Give each group its own.
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
