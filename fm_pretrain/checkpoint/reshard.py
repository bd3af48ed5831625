"""Resharding: load a checkpoint written at one (tensor-parallel size, data-parallel size, ZeRO stage) at another.

The layout-free form is DeepSpeed's universal checkpoint: `step_N/universal/zero/<param name>/{fp32, exp_avg,
exp_avg_sq, step}.pt` hold full, unsharded (TP = 1) tensors keyed by parameter name, plus the common optimizer
state (`zero/optimizer_state.pt`) and the model-states file (LR scheduler, client state). `to_universal` makes it
from a step_N directory, offline (no ranks needed); `load_resharded` loads it into an engine of any layout.

Data parallelism and ZeRO are DeepSpeed's part: `ds_to_universal` merges the ZeRO partitions of each parameter.
DeepSpeed 0.19.8 writes that form differently for ZeRO 1/2 and ZeRO-3 sources, each lacking what the other
stages' loaders read; `_complete` fills in the gaps, so one universal directory loads under ZeRO 1, 2 and 3:

- from ZeRO-3: per-parameter tensors are bare and flat; ZeRO 1/2 read `{"param": tensor}` (shaped here from the
  saved `param_shapes`), a `step.pt` per parameter (the Adam step of the parameter's ZeRO-3 sub-group, from the
  saved optimizer state), `ds_version` in optimizer_state.pt and an `mp_rank_00_model_states.pt`;
- from ZeRO 1/2: ZeRO-3 reads a `zero_pp_rank_0_*` model-states file and its Adam step and hyperparameters under
  `optimizer_state_dict` in optimizer_state.pt.

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
import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fm_pretrain.parallel.sharding import TPSplit, shard_tensor, split_table, splits_from_info, unshard_tensor

from .format import TMP_SUFFIX, UNIVERSAL_DIR, CheckpointLayout, read_meta

log = logging.getLogger(__name__)

STATES = ("fp32", "exp_avg", "exp_avg_sq")  # per-parameter tensors of a universal checkpoint; `step` is a scalar
MP_RANK_RE = re.compile(r"mp_rank_(\d+)")
Z12_STATES = "mp_rank_00_model_states.pt"  # the model-states file ZeRO 1/2 load (TP = 1)
Z3_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # the one ZeRO-3 loads
OPTIM_STATE = "optimizer_state.pt"  # in zero/


def is_universal(path: Path) -> bool:
    """Whether `path` is a complete universal checkpoint of ours (loadable under ZeRO 1, 2 and 3)."""
    path = Path(path)
    return all((path / f).is_file() for f in (f"zero/{OPTIM_STATE}", Z12_STATES, Z3_STATES))


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
    _add_entries_of_other_stages(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def _ds_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """DeepSpeed's conversion of one TP = 1 checkpoint, then per-parameter files as every ZeRO stage reads them."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported (offline use)
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
    with contextlib.suppress(FileNotFoundError):  # DeepSpeed's pointer beside out_dir; we name directories ourselves
        (out_dir.parent / "latest_universal").unlink()
    _complete_zero3_parameters(out_dir)


def _complete_zero3_parameters(universal: Path) -> None:
    """A universal form made from ZeRO-3 as ZeRO 1/2 read it: `{"param": shaped tensor}` files and a `step.pt`
    per parameter. Nothing to do for one made from ZeRO 1/2."""
    optim = torch.load(universal / "zero" / OPTIM_STATE, weights_only=False)
    if int(optim.get("zero_stage", 0)) != 3:
        return
    states = torch.load(universal / Z3_STATES, weights_only=False, map_location="cpu")
    sub_groups = optim["optimizer_state_dict"]["state"]
    # One entry of param_shapes per ZeRO-3 sub-group, in the order of the optimizer's state (as ds_to_universal).
    for i, shapes in enumerate(states["param_shapes"]):
        step = sub_groups[i]["step"]
        for name, shape in shapes.items():
            param_dir = universal / "zero" / name
            for state in STATES:
                blob = torch.load(param_dir / f"{state}.pt", weights_only=False)
                if not isinstance(blob, dict):
                    torch.save({"param": blob.view(shape)}, param_dir / f"{state}.pt")
            torch.save(step.clone() if torch.is_tensor(step) else step, param_dir / "step.pt")


def _add_entries_of_other_stages(universal: Path) -> None:
    """Make the universal form loadable under ZeRO 1, 2 and 3, whichever stage wrote it (DeepSpeed 0.19.8 writes
    stage-specific names and optimizer-state layouts)."""
    z12, z3 = universal / Z12_STATES, universal / Z3_STATES
    if not z12.exists():
        shutil.copyfile(z3, z12)  # ZeRO-3 source; under a universal load only its metadata and client state count
    if not z3.exists():
        shutil.copyfile(z12, z3)
    optim_path = universal / "zero" / OPTIM_STATE
    sd = torch.load(optim_path, weights_only=False)
    if int(sd.get("zero_stage", 0)) == 3:
        # ZeRO 1/2 check the version; ZeRO-3 reads only the step and the hyperparameters of optimizer_state_dict,
        # so rank 0's partitions of the flat tensors, which ds_to_universal copies in, are dropped.
        sd.setdefault("ds_version", torch.load(z3, weights_only=False, map_location="cpu")["ds_version"])
        sd.pop("fp32_flat_groups", None)
        osd = sd["optimizer_state_dict"]
        osd["state"] = {i: {"step": s["step"]} for i, s in osd["state"].items()}
    elif "optimizer_state_dict" not in sd:
        any_step = next((universal / "zero").glob("*/step.pt"), None)
        step = torch.load(any_step, weights_only=False) if any_step else None
        # ZeRO-3 copies param_groups[0] into every group: give it only the learning rate (same in every group
        # under our schedules), so each group keeps its own weight decay.
        lr = sd["param_groups"][0]["lr"]
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": [{"lr": lr}]}
    torch.save(sd, optim_path)


def _merge_tp_ranks(tag_dir: Path, out_dir: Path, tp: int) -> None:
    """The universal form of a TP = `tp` checkpoint: each TP rank's files through `ds_to_universal` on their own,
    then every parameter's shards merged with the split table the checkpoint carries."""
    states_file = tag_dir / Z12_STATES
    if not states_file.is_file():  # ZeRO-3 names it per data-parallel rank
        states_file = tag_dir / Z3_STATES
    info = torch.load(states_file, weights_only=False, map_location="cpu").get("universal_checkpoint_info")
    saved_tp, splits = splits_from_info(info, str(states_file))
    if saved_tp != tp:
        raise ValueError(f"{states_file}: split table for TP={saved_tp}, but meta.json says tp={tp}")
    work = out_dir.with_name(out_dir.name + ".ranks")
    if work.exists():
        shutil.rmtree(work)
    parts = []
    for r in range(tp):
        stage = work / f"input{r}"  # TP rank r's files, named as those of a TP = 1 checkpoint
        _stage_tp_rank(tag_dir, r, stage)
        parts.append(work / f"rank{r}")
        _ds_to_universal(stage, parts[-1])  # shaped {"param": shard} files, whatever the ZeRO stage
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
            merged = merge_shards([b["param"] for b in blobs], splits.get(name), f"{tag_dir}: {name} ({state})")
            torch.save({**blobs[0], "param": merged}, dirs[0] / f"{state}.pt")
    # Rank 0's universal form, now holding full tensors, is the result (optimizer and model-states files are
    # the same on every TP rank apart from the shapes DeepSpeed does not read when it loads a universal form).
    os.rename(parts[0], out_dir)
    shutil.rmtree(work)


def _stage_tp_rank(tag_dir: Path, r: int, stage: Path) -> None:
    """Present TP rank r's files in `stage` as a TP = 1 checkpoint (links; model-states files rewritten with
    TP degree 1) for `ds_to_universal`."""
    stage.mkdir(parents=True)
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


def merge_shards(shards: list[torch.Tensor], split: TPSplit | None, what: str) -> torch.Tensor:
    """The full tensor from the TP ranks' shards (in rank order); an unsplit parameter must be equal on all."""
    if split is not None:
        return unshard_tensor(shards, split)
    for r, s in enumerate(shards[1:], 1):
        if not torch.equal(s, shards[0]):
            raise ValueError(f"{what}: not TP-split, yet TP rank {r} holds other values than rank 0")
    return shards[0]


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
        shutil.copyfile(universal / "zero" / OPTIM_STATE, rank_dir / "zero" / OPTIM_STATE)
        for name in sorted(have):
            src, dst = universal / "zero" / name, rank_dir / "zero" / name
            dst.mkdir()
            for f in src.iterdir():
                if f.stem in STATES and name in splits:
                    blob = torch.load(f, weights_only=False)
                    full = blob["param"].view(full_shapes[name])
                    shard = shard_tensor(full, splits[name], r, tp)
                    torch.save({**blob, "param": shard}, dst / f.name)
                else:
                    shutil.copyfile(f, dst / f.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def load_resharded(engine, tag_dir: Path, saved: CheckpointLayout, current: CheckpointLayout) -> None:
    """Load `tag_dir` (written at layout `saved`) into `engine` (layout `current`) via the universal form."""
    if current.zero_stage == 0:
        raise ValueError(
            f"{tag_dir}: resharding a checkpoint (layout {saved}) into a ZeRO-0 run is not supported; use "
            "ZeRO >= 1 (train.ds_config=ds_configs/zero1.json) for the resumed run"
        )
    universal = tag_dir / UNIVERSAL_DIR
    load_dir, tag = tag_dir, UNIVERSAL_DIR
    converted = False
    if dist.get_rank() == 0 and not is_universal(universal):  # missing, or made by an older version
        log.info("converting %s to DeepSpeed's universal form (once)", tag_dir)
        to_universal(tag_dir)
        converted = True
    if current.tp > 1:
        from fm_pretrain.parallel.state import tp_rank

        load_dir = tag_dir / f"{UNIVERSAL_DIR}_tp{current.tp}"
        tag = f"rank{tp_rank()}"
        if dist.get_rank() == 0 and (converted or not load_dir.is_dir()):  # cut from this universal form
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
