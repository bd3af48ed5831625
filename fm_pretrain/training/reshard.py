"""Resharding: load a checkpoint written at one (tensor-parallel size, data-parallel size, ZeRO stage) at another.

The layout-free form is DeepSpeed's universal checkpoint: `step_N/universal/zero/<param name>/{fp32, exp_avg,
exp_avg_sq, step}.pt` hold full, unsharded (TP = 1) tensors keyed by parameter name, plus the common optimizer
state and the model-states file (LR scheduler, client state). `to_universal` makes it from a step_N directory,
offline (no ranks needed); `load_resharded` loads it into an engine of any layout.

Data parallelism and ZeRO are DeepSpeed's part: `ds_to_universal` merges the ZeRO partitions of each parameter.
Tensor parallelism is ours, because DeepSpeed's pattern language cannot say how a fused projection (Mamba-2's
z | x | B | C | dt) or a padded vocabulary is split, and our layers record it exactly (`parallel.sharding.TPSplit`):

- TP = T -> universal: every TP rank's files are converted on their own (as a TP = 1 checkpoint) by
  `ds_to_universal`; the T results are merged parameter by parameter with `unshard_tensor`, following the
  split table that the TP model saved in its checkpoint (`universal_checkpoint_info`, `parallel.sharding`).
  Weights and both Adam moments are merged the same way; unsplit parameters (norms) must agree on all ranks.
- universal -> TP = K: rank 0 cuts the full tensors with `shard_tensor`, following the loading model's own
  splits, into one directory per TP rank (`universal_tp<K>/rank<r>/`, the same format holding that rank's
  shards); each rank loads its own with DeepSpeed's `load_universal`, which takes a tensor that already has
  the local shape as it is and partitions it over the data-parallel group (ZeRO 1-3).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fm_pretrain.parallel.sharding import TPSplit, shard_tensor, split_table, splits_from_info, unshard_tensor
from fm_pretrain.training.checkpoint import TMP_SUFFIX, Layout, read_meta

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
STATES = ("fp32", "exp_avg", "exp_avg_sq")  # per-parameter tensors of a universal checkpoint; `step` is a scalar
MP_RANK_RE = re.compile(r"mp_rank_(\d+)")


def to_universal(tag_dir: Path, out_dir: Path | None = None) -> Path:
    """Convert a DeepSpeed checkpoint directory (ZeRO 1-3, any DP and TP size) to the universal form (full
    tensors, as at TP = 1); returns its path.

    Written to a temporary directory and renamed when complete, so an interrupted conversion leaves nothing
    that looks usable.
    """
    tag_dir = Path(tag_dir)
    out_dir = Path(out_dir) if out_dir is not None else tag_dir / UNIVERSAL_DIR
    if not any(tag_dir.glob("*optim_states.pt")):
        raise ValueError(
            f"{tag_dir}: no ZeRO optimizer shards (*optim_states.pt); resharding needs a checkpoint written with "
            "ZeRO stage >= 1 (ds_configs/zero1.json ... zero3.json)"
        )
    tp = int(read_meta(tag_dir)["layout"].get("tp", 1))
    tmp = out_dir.with_name(out_dir.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    if tp == 1:
        _ds_to_universal(tag_dir, tmp)
    else:
        _merge_tp_ranks(tag_dir, tmp, tp)
    _add_zero3_entries(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def _ds_to_universal(tag_dir: Path, out_dir: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out_dir),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    ds_to_universal.main(args)


def _merge_tp_ranks(tag_dir: Path, out_dir: Path, tp: int) -> None:
    """The universal form of a TP = `tp` checkpoint: each TP rank's files through `ds_to_universal` on their own,
    then every parameter's shards merged with the split table the checkpoint carries."""
    states_file = tag_dir / "mp_rank_00_model_states.pt"
    if not states_file.is_file():  # ZeRO-3 names it per data-parallel rank
        states_file = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    info = torch.load(states_file, weights_only=False, map_location="cpu").get("universal_checkpoint_info")
    saved_tp, splits = splits_from_info(info, str(states_file))
    if saved_tp != tp:
        raise ValueError(f"{states_file}: split table for TP={saved_tp}, but meta.json says tp={tp}")
    work = out_dir.with_name(out_dir.name + ".ranks")
    if work.exists():
        shutil.rmtree(work)
    parts, shapes = [], []
    for r in range(tp):
        stage = work / f"input{r}"  # TP rank r's files, named as those of a TP = 1 checkpoint
        shapes.append(_stage_tp_rank(tag_dir, r, stage))
        parts.append(work / f"rank{r}")
        _ds_to_universal(stage, parts[-1])
    names = {p.name for p in (parts[0] / "zero").iterdir() if p.is_dir()}
    for r, part in enumerate(parts[1:], 1):
        other = {p.name for p in (part / "zero").iterdir() if p.is_dir()}
        if other != names:
            raise ValueError(f"{tag_dir}: TP rank {r} holds other parameters than rank 0: {sorted(other ^ names)[:5]}")
    # A sharded parameter missing from the split table fails merge_shards' equality check, naming it.
    for name in sorted(names):
        dirs = [part / "zero" / name for part in parts]
        for state in (s for s in STATES if (dirs[0] / f"{s}.pt").is_file()):  # an alias (tied weight): fp32 only
            blobs = [torch.load(d / f"{state}.pt", weights_only=False) for d in dirs]
            # ZeRO 1/2 save {"param": tensor, ...}; ZeRO-3 a bare flat tensor, shaped here from param_shapes
            shards = [b["param"] if isinstance(b, dict) else b for b in blobs]
            shards = [t.view(shp[name]) if name in shp else t for t, shp in zip(shards, shapes, strict=True)]
            merged = merge_shards(shards, splits.get(name), f"{tag_dir}: {name} ({state})")
            extra = blobs[0] if isinstance(blobs[0], dict) else {}
            torch.save({**extra, "param": merged}, dirs[0] / f"{state}.pt")
    # Rank 0's universal form, now holding full tensors, is the result (optimizer and model-states files are
    # the same on every TP rank apart from the shapes DeepSpeed does not read when it loads a universal form).
    os.rename(parts[0], out_dir)
    shutil.rmtree(work)


def _stage_tp_rank(tag_dir: Path, r: int, stage: Path) -> dict[str, torch.Size]:
    """Present TP rank r's files in `stage` as a TP = 1 checkpoint (links; model-states files rewritten with
    TP degree 1) for `ds_to_universal`; returns the shapes of that rank's parameters."""
    stage.mkdir(parents=True)
    shapes: dict[str, torch.Size] = {}
    for f in tag_dir.iterdir():
        m = MP_RANK_RE.search(f.name)
        if not (f.is_file() and m and int(m.group(1)) == r):
            continue
        staged = stage / MP_RANK_RE.sub("mp_rank_00", f.name)
        if not f.name.endswith("model_states.pt"):
            staged.symlink_to(f.resolve())
            continue
        sd = torch.load(f, weights_only=False, map_location="cpu")
        sd["mp_world_size"] = 1
        if "checkpoint_parallel_dimensions" in sd:
            sd["checkpoint_parallel_dimensions"] = {**sd["checkpoint_parallel_dimensions"], "tp_degree": 1}
        # megatron-core layers put `_extra_state: None` entries in the state dict: no tensors to convert
        sd["module"] = {k: v for k, v in sd["module"].items() if torch.is_tensor(v)}
        torch.save(sd, staged)
        for group in sd.get("param_shapes") or []:
            shapes.update(group)
    return shapes


def merge_shards(shards: list[torch.Tensor], split: TPSplit | None, what: str) -> torch.Tensor:
    """The full tensor from the TP ranks' shards (in rank order); an unsplit parameter must be equal on all."""
    if split is not None:
        return unshard_tensor(shards, split)
    for r, s in enumerate(shards[1:], 1):
        if not torch.equal(s, shards[0]):
            raise ValueError(f"{what}: not TP-split, yet TP rank {r} holds other values than rank 0")
    return shards[0]


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


def to_tp_ranks(universal: Path, model: nn.Module, tp: int, out_dir: Path) -> Path:
    """Cut a universal checkpoint (full tensors) into one per TP rank for `model` (a TP = `tp` model, whose
    parameters carry their splits): `out_dir/rank<r>/` holds rank r's shards in the universal format."""
    splits = split_table(model)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}  # with the aliases of tied ones
    full_shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in splits:  # ZeRO-3 keeps the unpartitioned shape in ds_shape
            full_shapes[name] = list(getattr(p, "ds_shape", p.shape))
            full_shapes[name][splits[name].dim] = splits[name].full_len
    have = {p.name for p in (universal / "zero").iterdir() if p.is_dir()}
    missing = {n for n, _ in model.named_parameters()} - have
    if missing or have - names:
        raise KeyError(
            f"{universal}: parameters differ from the model's: checkpoint only {sorted(have - names)[:5]}, "
            f"model only {sorted(missing)[:5]}"
        )
    tmp = out_dir.with_name(out_dir.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    for r in range(tp):
        rank_dir = tmp / f"rank{r}"
        (rank_dir / "zero").mkdir(parents=True)
        for f in universal.glob("*model_states.pt"):
            shutil.copyfile(f, rank_dir / f.name)
        shutil.copyfile(universal / "zero" / "optimizer_state.pt", rank_dir / "zero" / "optimizer_state.pt")
        for name in sorted(have):
            src, dst = universal / "zero" / name, rank_dir / "zero" / name
            dst.mkdir()
            for f in src.iterdir():
                if f.stem in STATES and name in splits:
                    blob = torch.load(f, weights_only=False)
                    full = blob["param"] if isinstance(blob, dict) else blob.view(full_shapes[name])  # ZeRO-3: flat
                    shard = shard_tensor(full, splits[name], r, tp)
                    torch.save({**(blob if isinstance(blob, dict) else {}), "param": shard}, dst / f.name)
                else:
                    shutil.copyfile(f, dst / f.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def load_resharded(engine, tag_dir: Path, saved: Layout, current: Layout) -> None:
    """Load `tag_dir` (written at layout `saved`) into `engine` (layout `current`) via the universal form."""
    if current.zero_stage == 0:
        raise ValueError(
            f"{tag_dir}: resharding a checkpoint (layout {saved}) into a ZeRO-0 run is not supported; use "
            "ZeRO >= 1 (train.ds_config=ds_configs/zero1.json) for the resumed run"
        )
    universal = tag_dir / UNIVERSAL_DIR
    load_dir, tag = tag_dir, UNIVERSAL_DIR
    if dist.get_rank() == 0 and not (universal / "zero" / "optimizer_state.pt").is_file():
        log.info("converting %s to DeepSpeed's universal form (once)", tag_dir)
        to_universal(tag_dir)
    if current.tp > 1:
        from fm_pretrain.parallel.state import tp_rank

        load_dir = tag_dir / f"{UNIVERSAL_DIR}_tp{current.tp}"
        tag = f"rank{tp_rank()}"
        if dist.get_rank() == 0 and not load_dir.is_dir():
            log.info("cutting %s into TP=%d shards (once)", universal, current.tp)
            to_tp_ranks(universal, engine.module, current.tp, load_dir)
    dist.barrier()
    cfg = engine._config  # the universal switch is read only at load time
    previous, cfg.load_universal_checkpoint = cfg.load_universal_checkpoint, True
    try:
        load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    finally:
        cfg.load_universal_checkpoint = previous
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {load_dir / tag}")
    # DeepSpeed's ZeRO-3 universal load hands one `step` tensor object to every parameter group; Adam increments
    # it in place once per group, so later groups would see a wrong bias correction. Give each group its own.
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
