"""Launch `fm_pretrain/train.py` for real (torchrun, gloo ranks) from tests, and read back its metrics."""

import json
from pathlib import Path

from fm_pretrain.launch import launch_local
from tests.helpers.paths import REPO

CONFIG = REPO / "configs" / "demo_tiny.yaml"


def data_overrides(packed: Path) -> list[str]:
    """The demo data built by the `packed` fixture."""
    return [f"data.path={packed / 'packed'}", f"data.tokenizer={packed / 'tokenizer.model'}"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_training(run_dir: Path, overrides: list[str], nproc: int = 2) -> list[dict]:
    """Train to completion in run_dir (log beside it); fail the test with the log's tail if training fails."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    result = launch_local(CONFIG, [*overrides, f"train.run_dir={run_dir}"], nproc=nproc, log_file=log, timeout=600)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{log.read_text()[-4000:]}"
    return read_metrics(run_dir)


# A tiny FM + attention model for the runs that test the machinery around training (faults, Slurm), not the mixers.
# Its layer_pattern value holds a space, which checks the quoting of overrides through sbatch and srun.
TINY_FM_ATTENTION = [
    "data.seq_len=64",
    "model.d_model=64",
    "model.n_layers=2",
    "model.layer_pattern=[fm, attention]",
    "model.fm.n_heads=2",
    "model.fm.n_memories=8",
    "model.fm.d_mem=16",
    "model.fm.top_k=2",
    "model.fm.chunk_size=16",
    "model.attention.n_heads=2",
]

# A tiny hybrid of all three mixers, so one run exercises FM (sparse), attention (GQA) and Mamba-2; head and
# group counts divide by 2 so the same model also runs at tensor_parallel = 2.
TINY_HYBRID = [
    "data.seq_len=64",
    "model.d_model=64",
    "model.n_layers=3",
    "model.layer_pattern=[fm, attention, mamba2]",
    "model.fm.n_heads=2",
    "model.fm.n_memories=8",
    "model.fm.d_mem=16",
    "model.fm.top_k=2",
    "model.fm.chunk_size=16",
    "model.mamba2.d_state=16",
    "model.mamba2.head_dim=32",
    "model.mamba2.n_groups=2",
    "model.mamba2.chunk_size=16",
    "model.attention.n_heads=4",
    "model.attention.n_kv_heads=2",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "train.val_batches=2",
    "optim.warmup_steps=2",
]
