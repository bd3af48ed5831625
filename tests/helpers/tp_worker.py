"""Worker for tests/test_tensor_parallel.py, run under torchrun: a tensor-parallel DecoderLM (megatron-core
TP over gloo, DeepSpeed over the data-parallel group) does one forward/backward per case; rank 0 saves the
loss and the full gradients (gathered from the TP shards) for the test to compare with a TP = 1 model.

    torchrun --nproc_per_node 4 tests/helpers/tp_worker.py --tp 2 --out DIR
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch.distributed as dist

from fm_pretrain.config import ParallelConfig, from_dict
from fm_pretrain.model import DecoderLM
from fm_pretrain.parallel.state import DeepSpeedMPU, gather_full, initialize_model_parallel

SEED = 7
# Every mixer: FM dense with GQA attention and Mamba-2 with two B/C groups; an odd vocabulary (padded at TP = 2).
HYBRID = {
    "vocab_size": 61,
    "d_model": 32,
    "n_layers": 3,
    "layer_pattern": ["fm", "attention", "mamba2"],
    "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": None, "chunk_size": 4},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 4},
}
# Sparse FM with the balancing loss, one rate per head, the output gate and tied embeddings.
FM_SPARSE = {
    "vocab_size": 64,
    "d_model": 32,
    "n_layers": 2,
    "layer_pattern": ["fm"],
    "tie_embeddings": True,
    "fm": {"n_heads": 4, "n_memories": 8, "d_mem": 8, "top_k": 3, "chunk_size": 4, "rate_per_row": False,
           "output_gate": True, "aux_loss_weight": 0.01},
}  # fmt: skip
# The memory family (docs/memory_family.md): GLA (short convs, low-rank gate), Gated DeltaNet, MoM (gated-delta
# inner rule with its per-memory convs, shared memory, balancing loss; replicated router) and sparse FM with
# Memory Caching (SSC), GLA, Mamba-2 and MoM with Memory Caching.
MEMORY_FAMILY = {
    "vocab_size": 64,
    "d_model": 32,
    "n_layers": 5,
    "layer_pattern": ["gla", "gated_delta", "mom", "fm", "mamba2"],
    "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": 3, "chunk_size": 4},
    "gla": {"n_heads": 2, "d_key": 8, "d_value": 8, "chunk_size": 4, "short_conv": True},
    "gated_delta": {"n_heads": 2, "d_key": 8, "d_value": 8, "chunk_size": 4},
    "mom": {"n_memories": 4, "top_k": 2, "inner": "gated_delta", "n_heads": 2, "d_key": 8, "d_value": 8,
            "chunk_size": 4},
    "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 4},
    "memory_caching": {"mixers": ["fm", "gla", "mamba2", "mom"], "aggregation": "ssc", "segment_size": 4,
                       "top_k_segments": 1},
}  # fmt: skip
CASES = {"hybrid_dense": HYBRID, "fm_sparse": FM_SPARSE, "memory_family": MEMORY_FAMILY}


def model_config(name: str):
    return from_dict({"model": CASES[name]}).model


def make_batch(name: str, n_seq: int = 4, seq_len: int = 12) -> dict[str, torch.Tensor]:
    """The global batch: two packed documents per row, some ignored labels."""
    g = torch.Generator().manual_seed(11)
    vocab = CASES[name]["vocab_size"]
    ids = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    labels = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    labels[:, 4] = -100
    labels[0, 7:9] = -100
    doc_ids = (torch.arange(seq_len) >= 5).long().expand(n_seq, seq_len).clone()
    return {"input_ids": ids, "doc_ids": doc_ids, "labels": labels}


def dp_slice(batch: dict[str, torch.Tensor], dp_rank: int, dp: int) -> dict[str, torch.Tensor]:
    n = next(iter(batch.values())).shape[0] // dp
    return {k: v[dp_rank * n : (dp_rank + 1) * n] for k, v in batch.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    layout = initialize_model_parallel(args.tp)
    results = {}
    for name in CASES:
        batch = make_batch(name)
        for ckpt in (False, True):
            torch.manual_seed(SEED)
            parallel = ParallelConfig(tensor_parallel=args.tp, activation_checkpointing=ckpt)
            model = DecoderLM(model_config(name), parallel)
            full_init = gather_full(model)
            ds_config = {"train_micro_batch_size_per_gpu": batch["input_ids"].shape[0] // layout.dp,
                         "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}  # fmt: skip
            never_stepped = torch.optim.SGD(model.parameters(), lr=0.0)  # DeepSpeed's backward wants an optimizer
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=never_stepped, config=ds_config, mpu=DeepSpeedMPU()
            )
            out = engine(**dp_slice(batch, layout.dp_rank, layout.dp))
            engine.backward(out.loss)  # DeepSpeed averages the gradients over the data-parallel group
            grads = gather_full(model, {n: p.grad for n, p in model.named_parameters()})
            losses = torch.stack([out.loss.detach(), out.lm_loss.detach()])
            dist.all_reduce(losses, group=engine.mpu.get_data_parallel_group())
            result = {"loss": losses / layout.dp, "grads": grads, "init": full_init, "num_params": model.num_params()}
            if not ckpt:
                model.eval()
                result["generated"] = model.generate(batch["input_ids"][:2, :5], max_new_tokens=4)
            results[f"{name}/ckpt={ckpt}"] = result
    if layout.rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"layout": layout.__dict__, "results": results}, args.out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
