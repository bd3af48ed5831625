"""Resuming a checkpoint at another tensor-parallel size: TP = 2 -> TP = 1 and TP = 1 -> TP = 2, with real ranks.

Three runs of fm_pretrain/train.py (CPU, gloo) of a hybrid sparse-FM + attention (GQA) + Mamba-2 model (2 B/C
groups, so its fused in_proj and conv are split block by block) with tied embeddings, global batch 8 throughout:
1. reference: TP = 2 x DP = 1, ZeRO-2, grad_accum 4, to step 6, a checkpoint every step;
2. its step 3 converted offline (`python -m fm_pretrain.checkpoint universal`), resumed at TP = 1 x DP = 2
   (grad_accum 2);
3. run 2's step 4 (a TP = 1 checkpoint) resumed at TP = 2 x DP = 1 under ZeRO-3; its ZeRO-3 checkpoint converted
   offline again and compared with run 2's weights.

Tolerances: every run computes in fp32, and TP = 1 and TP = 2 differ only in the order of reductions (partial
sums of the row-parallel layers, the vocabulary-parallel softmax, data-parallel averaging). The first loss after
a resume is a forward of the same weights on the same samples: 2e-6 relative, the tolerance at which TP = 2
follows TP = 1 in test_tensor_parallel.py (measured: 3e-8). Later losses follow updates from gradients summed in
another order: 1e-5 relative, the tolerance at which ZeRO 0-3 agree. Dropping the Adam moments in the conversion
moves the second loss after the resume by 5e-4 relative (measured), 50 times the tolerance: the comparison sees
whether the optimizer state was converted, not only the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fm_pretrain.checkpoint import merge_shards
from fm_pretrain.checkpoint.__main__ import main as convert
from fm_pretrain.config import from_dict
from fm_pretrain.launch import launch_local
from fm_pretrain.model import DecoderLM
from fm_pretrain.parallel.sharding import TPSplit, shard_tensor, splits_from_info, unshard_tensor
from tests.helpers.paths import REPO
from tests.helpers.train_runs import TINY_HYBRID

STEPS = 6
SMALL = [
    *TINY_HYBRID,
    "model.fm.aux_loss_weight=0.01",
    f"train.steps={STEPS}",
    "train.val_every=1000",
    "train.save_every=1",
    "train.keep_last=100",
    "tracking.enabled=false",
]


def test_merge_shards_checks_unsplit_parameters_and_drops_padding():
    split = TPSplit(dim=0, segments=(4, 2, 6), full_len=11)  # a fused projection whose last block is padded
    full = torch.randn(11, 3)
    shards = [shard_tensor(full, split, r, 2) for r in range(2)]
    assert torch.equal(merge_shards(shards, split, "w"), full)
    norm = torch.randn(5)
    assert torch.equal(merge_shards([norm, norm.clone()], None, "norm"), norm)
    with pytest.raises(ValueError, match="norm: not TP-split, yet TP rank 1 holds other values"):
        merge_shards([norm, norm + 1e-7], None, "norm")


def train(packed: Path, run_dir: Path, nproc: int, *overrides: str) -> dict[int, float]:
    data = [f"data.path={packed / 'packed'}", f"data.tokenizer={packed / 'tokenizer.model'}"]
    log = run_dir.parent / f"{run_dir.name}.log"
    result = launch_local(REPO / "configs" / "demo_tiny.yaml", [*data, f"train.run_dir={run_dir}", *SMALL, *overrides],
                          nproc=nproc, log_file=log, timeout=300)  # fmt: skip
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{log.read_text()[-4000:]}"
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def check_offline_conversion(step_dir: Path, tmp_path: Path) -> None:
    """The TP = 2 checkpoint, converted by the tool, is a full TP = 1 state: it loads strictly into a TP = 1 model,
    and every weight is the merge of the two ranks' shards as DeepSpeed saved them."""
    assert convert(["universal", str(step_dir)]) == 0
    assert convert(["export", str(step_dir), "--output", str(tmp_path / "w.pt")]) == 0
    exported = torch.load(tmp_path / "w.pt")
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["layout"]["tp"] == 2
    model = DecoderLM(from_dict(meta["config"]).model)  # TP = 1
    model.load_state_dict(exported, strict=True)
    states = [torch.load(step_dir / f"mp_rank_0{r}_model_states.pt", weights_only=False) for r in range(2)]
    tp, splits = splits_from_info(states[0]["universal_checkpoint_info"], "mp_rank_00_model_states.pt")
    assert tp == 2 and "blocks.2.mixer.in_proj.weight" in splits
    assert len(splits["blocks.2.mixer.in_proj.weight"].segments) == 5  # z | x | B | C | dt, each split
    for name, full in exported.items():
        shards = [s["module"][name] for s in states]
        want = unshard_tensor(shards, splits[name]) if name in splits else shards[0]
        assert torch.equal(full, want), name


@pytest.mark.slow
def test_checkpoints_resume_at_another_tensor_parallel_size(packed, tmp_path):
    ref = train(packed, tmp_path / "tp2", 2, "parallel.tensor_parallel=2", "train.grad_accum=4",
                "train.ds_config=ds_configs/zero2.json")  # fmt: skip
    assert sorted(ref) == list(range(1, STEPS + 1))
    step_dir = tmp_path / "tp2" / "checkpoints" / "step_3"
    check_offline_conversion(step_dir, tmp_path)

    # TP 2 -> 1 (and DP 1 -> 2): loads the universal form the tool wrote.
    tp1 = train(packed, tmp_path / "tp1", 2, f"train.resume_from={step_dir}", "train.grad_accum=2",
                "train.ds_config=ds_configs/zero2.json")  # fmt: skip
    assert sorted(tp1) == [4, 5, 6]
    assert tp1[4] == pytest.approx(ref[4], rel=2e-6, abs=0)
    for step in (5, 6):
        assert tp1[step] == pytest.approx(ref[step], rel=1e-5, abs=0), step

    # TP 1 -> 2 (and ZeRO-2 -> ZeRO-3), from a checkpoint the TP = 1 run wrote.
    tp1_step = tmp_path / "tp1" / "checkpoints" / "step_4"
    back = train(packed, tmp_path / "back", 2, f"train.resume_from={tp1_step}", "parallel.tensor_parallel=2",
                 "train.grad_accum=4", "train.ds_config=ds_configs/zero3.json")  # fmt: skip
    assert sorted(back) == [5, 6]
    assert back[5] == pytest.approx(tp1[5], rel=2e-6, abs=0)  # the same weights as the run that saved them
    for step in (5, 6):
        assert back[step] == pytest.approx(ref[step], rel=1e-5, abs=0), step
    assert "cutting" in (tmp_path / "back.log").read_text()  # it went through the per-TP-rank shards

    # A ZeRO-3 TP = 2 checkpoint (flat tensors in DeepSpeed's universal form) converts too: its weights after step 5
    # are the TP = 1 run's after step 5 up to the fp32 rounding of one update (measured 3e-8; weights are ~0.02-4,
    # a misplaced shard is off by O(0.01)).
    for run in ("back", "tp1"):
        step5 = tmp_path / run / "checkpoints" / "step_5"
        assert convert(["export", str(step5), "--output", str(tmp_path / f"{run}.pt")]) == 0
    z3, z2 = torch.load(tmp_path / "back.pt"), torch.load(tmp_path / "tp1.pt")
    assert set(z3) == set(z2) - {"lm_head.weight"}  # ZeRO-3 stores no alias of the tied embedding
    for name, w in z3.items():
        torch.testing.assert_close(w, z2[name], rtol=0, atol=1e-5, msg=name)
