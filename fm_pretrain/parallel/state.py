"""Process groups: megatron-core's `parallel_state` (TP x DP, TP innermost) and the adapter DeepSpeed needs.

With world size W and tensor-parallel size T, ranks {0..T-1}, {T..2T-1}, ... form the TP groups (one node's
fast links) and ranks with the same TP rank form the W / T data-parallel groups. The data sampler and
ZeRO both work over the data-parallel group; every TP rank of a group sees the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._megatron import parallel_state, tensor_parallel
from .sharding import EXTRA_STATE, shard_state_dict, tp_split_of, unshard_tensor


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int


def initialize_model_parallel(tp: int, timeout_s: float = 1800.0) -> ParallelLayout:
    """Create the TP and DP groups on the already initialised default process group; a collective on them
    that waits longer than `timeout_s` (a dead rank) raises instead of hanging."""
    # tp against the world size is the preflight's to check (training/preflight.py); megatron-core refuses too.
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError("megatron-core parallel_state is already initialised with another TP size")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            distributed_timeout_minutes=timeout_s / 60,  # becomes timedelta(minutes=...): a float is fine
            create_gloo_process_groups=False,  # gloo side groups serve megatron's own optimizer; not used here
        )
    return current_layout()


def current_layout() -> ParallelLayout:
    return ParallelLayout(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def data_parallel_group():
    """The process group of the ranks that hold the same TP shard (ZeRO, the sampler and metric sums use it)."""
    return parallel_state.get_data_parallel_group()


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def require_tp(tp: int) -> None:
    """Raise unless parallel_state is initialised with this TP size (a TP model needs its groups)."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            f"parallel.tensor_parallel={tp}: call fm_pretrain.parallel.state.initialize_model_parallel first"
        )
    have = parallel_state.get_tensor_model_parallel_world_size()
    if have != tp:
        raise RuntimeError(f"parallel.tensor_parallel={tp} but the process groups were made for TP={have}")


class DeepSpeedMPU:
    """What DeepSpeed expects as `mpu=`: its "model parallel" is our tensor parallel (no pipeline stages).

    megatron-core's parallel_state cannot be passed directly: DeepSpeed calls get_model_parallel_rank /
    world_size, which it lacks. Do not add `initialize_sequence_parallel`: DeepSpeed takes its presence as
    "ignore the model-parallel group" and would then count every TP shard of the grad norm once only.
    """

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1


def seed_tensor_parallel_rng(seed: int) -> None:
    """Seed every generator for training. The CPU generator (and CUDA's default one) get the same seed on
    every rank: weights are built in full and sharded, so TP = 1 and TP = 2 start identical. On CUDA,
    megatron's tracker also gets a per-TP-rank stream, which dropout inside TP regions would draw from
    (the model uses no dropout; megatron-core's own modules expect the tracker to exist)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)  # also seeds the default CUDA generator


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load this rank's shards of a full (TP = 1) state dict into a TP model."""
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    missing, unexpected = model.load_state_dict(shard_state_dict(full, model, rank, tp), strict=False)
    missing = [k for k in missing if not k.endswith(EXTRA_STATE)]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


def gather_full(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Full (TP = 1) tensors from every TP rank's shards: the model's parameters by default, or `tensors` (e.g.
    gradients) keyed by parameter name. Collective over the TP group: every TP rank must call it."""
    params = dict(model.named_parameters())
    tensors = {n: p.detach() for n, p in params.items()} if tensors is None else tensors
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    out = {}
    for name, t in tensors.items():
        split = tp_split_of(params[name])
        if split is None or tp == 1:
            out[name] = t
            continue
        shards = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(shards, t.contiguous(), group=group)
        out[name] = unshard_tensor(shards, split)
    return out


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()
