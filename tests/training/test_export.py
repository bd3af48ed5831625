"""`load_model` on checkpoints written by `save_checkpoint` from a real DeepSpeed engine (one process, gloo): the
model rebuilt at tensor_parallel = 1 from meta.json's config computes the same logits as the engine's model.

ZeRO-1 saves the fp32 weights shaped; ZeRO-3 keeps only flat partitions and saves a tied weight under one name,
so its full weights come from the universal form, shaped from the saved `param_shapes`, with the alias restored.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fm_pretrain.checkpoint import CheckpointLayout, load_model, read_meta, save_checkpoint
from fm_pretrain.config import from_dict, to_dict
from fm_pretrain.model import DecoderLM
from fm_pretrain.parallel.state import DeepSpeedMPU, destroy_model_parallel, initialize_model_parallel

pytestmark = pytest.mark.slow

# A tiny hybrid of all three mixers with tied embeddings (the alias ZeRO-3 does not save twice).
MODEL = {
    "vocab_size": 96,
    "d_model": 32,
    "n_layers": 3,
    "layer_pattern": ["fm", "attention", "mamba2"],
    "tie_embeddings": True,
    "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 8, "top_k": 2, "chunk_size": 8},
    "attention": {"n_heads": 4, "n_kv_heads": 2},
    "mamba2": {"d_state": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 8},
}


@pytest.fixture
def one_rank():
    """The default process group and megatron-core's groups for one rank; torn down afterwards."""
    import deepspeed  # noqa: F401 (its accelerator is chosen before the first engine)

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    initialize_model_parallel(1)
    try:
        yield
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_load_model_reproduces_the_engine_models_logits(one_rank, tmp_path, monkeypatch, zero_stage):
    import deepspeed

    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = from_dict({"model": MODEL, "train": {"seed": 3}})
    torch.manual_seed(3)
    model = DecoderLM(cfg.model, cfg.parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=DeepSpeedMPU())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MODEL["vocab_size"], (2, 16), generator=g)
    for _ in range(2):  # trained weights and Adam state, not the initial ones
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
    engine.eval()
    with torch.no_grad():
        want = engine(input_ids=ids).logits.clone()

    layout = CheckpointLayout(dp=1, zero_stage=zero_stage, tp=1)
    step_dir = save_checkpoint(engine, tmp_path / "checkpoints", 2, 4, layout, {"config": to_dict(cfg)}, keep_last=1)
    assert read_meta(step_dir)["layout"] == layout.as_dict()

    loaded, loaded_cfg, meta = load_model(tmp_path)  # a run directory: follows checkpoints/latest
    assert meta["step"] == 2 and loaded_cfg.model.layer_pattern == MODEL["layer_pattern"]
    assert loaded.lm_head.weight is loaded.embed.weight  # still tied after loading
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
