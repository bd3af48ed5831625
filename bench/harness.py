"""Our evaluation harness vs lm-evaluation-harness: the 17 tasks' fixtures, one model, one run each.

    python bench/harness.py [--checkpoint RUN_DIR] [--batch-size 8] [--num-fewshot 0] [--device cpu] [--repeat 1]

Without --checkpoint, a tiny hybrid (FM sparse + attention + Mamba-2, d_model 64, 3 layers, the demo tokenizer,
random weights from seed 0) is written in a temporary directory. The checkpoint is exported once
(`fm_pretrain.export`), then each harness scores all 17 tasks (data/eval fixtures, 0-shot by default) in its own
subprocess, one after the other:

- `ours`: `fm_pretrain.eval.evaluate_model` on the checkpoint's DecoderLM;
- `lm-eval hf`: lm-evaluation-harness's `HFLM` on the export (`--model hf`, its own code), our task YAMLs;
- `lm-eval fm_pretrain`: lm-evaluation-harness driving our registered class on the checkpoint (`--model fm_pretrain`).

With --repeat R the three run in turn R times (ours, lm-eval hf, lm-eval fm_pretrain, ours, ...) and the table
shows the fastest of each (all runs are in --out). Per harness: scoring (the harness call alone) in CPU time of the
process (all threads: what to compare on a shared machine, where wall time depends on the other jobs) and wall
time, model loading, and the process's wall time. lm-evaluation-harness's task index is built over our YAMLs
only (`include_defaults=False`; indexing its own 10k+ tasks adds ~7 s to its CLI). Then every task's metrics
side by side, with any difference named. Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HARNESSES = ("ours", "lm-eval hf", "lm-eval fm_pretrain")


def make_checkpoint(root: Path) -> Path:
    """The demo's tokenizer and a tiny random hybrid, written in the on-disk form of a ZeRO-0 save."""
    import torch

    from fm_pretrain.checkpoint.format import CheckpointLayout, step_tag, write_latest, write_meta
    from fm_pretrain.config import from_dict, to_dict
    from fm_pretrain.data.tokenizer import Tokenizer
    from fm_pretrain.demo import prepare_data
    from fm_pretrain.model import DecoderLM

    prepare_data(root / "data")
    tok = Tokenizer(root / "data" / "tokenizer.model")
    model = {
        "vocab_size": tok.vocab_size, "d_model": 64, "n_layers": 3, "layer_pattern": ["fm", "attention", "mamba2"],
        "tie_embeddings": True, "max_seq_len": 2048,
        "fm": {"n_heads": 2, "n_memories": 8, "d_mem": 16, "top_k": 2, "chunk_size": 16},
        "attention": {"n_heads": 4, "n_kv_heads": 2},
        "mamba2": {"d_state": 16, "head_dim": 32, "n_groups": 2, "chunk_size": 16},
    }  # fmt: skip
    cfg = from_dict({"model": model, "data": {"tokenizer": str(root / "data" / "tokenizer.model")}})
    torch.manual_seed(0)
    step_dir = root / "run" / "checkpoints" / step_tag(1)
    step_dir.mkdir(parents=True)
    torch.save({"module": DecoderLM(cfg.model).state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    write_meta(
        step_dir, 1, 0, CheckpointLayout(dp=1, zero_stage=0), {"config": to_dict(cfg), "tokenizer_sha256": tok.sha256}
    )
    write_latest(root / "run" / "checkpoints", step_tag(1))
    return root / "run"


def run_one(harness: str, checkpoint: str, export: str, batch_size: int, num_fewshot: int, device: str) -> dict:
    """One harness on all tasks (inside its own process); {load_s, score_s, metrics: {task: {metric: value}}}."""
    t0 = time.perf_counter()
    if harness == "ours":
        from fm_pretrain.checkpoint import load_model
        from fm_pretrain.eval import evaluate_model
        from fm_pretrain.eval.cli import load_tokenizer

        model, cfg, meta = load_model(Path(checkpoint), device)
        tok = load_tokenizer(cfg, meta, None)
        t1, c1 = time.perf_counter(), time.process_time()
        res = evaluate_model(model, tok, "all", num_fewshot=num_fewshot, batch_size=batch_size, progress=False)
        t2, c2 = time.perf_counter(), time.process_time()
        metrics = {name: r["metrics"] for name, r in res["tasks"].items()}
    else:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from fm_pretrain.eval.lm_eval_model import TASKS_DIR

        tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        if harness == "lm-eval hf":
            from lm_eval.models.huggingface import HFLM
            from transformers import AutoModelForCausalLM, AutoTokenizer

            hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype="float32")
            tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
            lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size, device=device)
        else:
            from lm_eval.api.registry import get_model

            lm = get_model("fm_pretrain").create_from_arg_string(
                f"checkpoint={checkpoint},device={device}", {"batch_size": batch_size}
            )
        t1, c1 = time.perf_counter(), time.process_time()
        res = lm_eval.simple_evaluate(model=lm, tasks=["fm_all"], num_fewshot=num_fewshot, task_manager=tasks,
                                      bootstrap_iters=0, batch_size=batch_size)  # fmt: skip
        t2, c2 = time.perf_counter(), time.process_time()
        metrics = {
            name.removeprefix("fm_"): {k.split(",")[0]: v for k, v in r.items() if "," in k and "stderr" not in k}
            for name, r in res["results"].items()
            if name != "fm_all"
        }
    return {"load_s": t1 - t0, "score_s": t2 - t1, "score_cpu_s": c2 - c1, "metrics": metrics}


def differences(a: dict, b: dict) -> list[str]:
    out = []
    for task in sorted(a):
        for metric, value in a[task].items():
            if metric.endswith("_stderr") or value is None:
                continue
            other = b.get(task, {}).get(metric)
            if other is None or abs(value - other) > 1e-6 * max(1.0, abs(value)):
                out.append(f"{task} {metric}: {value:.6g} vs {other}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: a tiny random hybrid (see above)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the three harnesses, in turn (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the raw results (JSON)")
    p.add_argument("--run", choices=HARNESSES, help=argparse.SUPPRESS)  # internal: one harness in this process
    p.add_argument("--export", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        res = run_one(args.run, str(args.checkpoint), args.export, args.batch_size, args.num_fewshot, args.device)
        print("RESULT " + json.dumps(res))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="bench_harness_") as tmp:
        os.environ.update(env)
        checkpoint = args.checkpoint or make_checkpoint(Path(tmp))
        from fm_pretrain.export import export_checkpoint

        export = export_checkpoint(checkpoint, Path(tmp) / "export", check=True)
        runs: dict[str, list[dict]] = {h: [] for h in HARNESSES}
        for _ in range(args.repeat):
            for harness in HARNESSES:
                cmd = [sys.executable, __file__, "--run", harness, "--checkpoint", str(checkpoint)]
                cmd += ["--export", str(export), "--batch-size", str(args.batch_size)]
                cmd += ["--num-fewshot", str(args.num_fewshot), "--device", args.device]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                wall = time.perf_counter() - t0
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{harness} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
                runs[harness].append({"wall_s": wall, **json.loads(line[len("RESULT ") :])})
        results = {h: min(r, key=lambda x: x["score_cpu_s"]) for h, r in runs.items()}

    import torch

    print(f"date {dt.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), batch size {args.batch_size}, "
          f"{args.num_fewshot}-shot, device {args.device}\n")  # fmt: skip
    print(
        "| harness | scoring 17 tasks, CPU (s) | scoring, wall (s) | load (s) | process wall (s) | CPU s, every run |"
    )
    print("|---|---|---|---|---|---|")
    for h, r in results.items():
        every = ", ".join(f"{x['score_cpu_s']:.1f}" for x in runs[h])
        print(
            f"| {h} | {r['score_cpu_s']:.1f} | {r['score_s']:.1f} | {r['load_s']:.1f} | {r['wall_s']:.1f} | {every} |"
        )
    print(f"\nload average (1, 5, 15 min) after the runs: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    ours = results["ours"]["metrics"]
    for h in HARNESSES[1:]:
        diff = differences(ours, results[h]["metrics"])
        print(
            f"\nmetrics, ours vs {h}: " + ("all equal" if not diff else f"{len(diff)} differ:\n  " + "\n  ".join(diff))
        )
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
