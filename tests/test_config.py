"""Config loading: strict validation naming the key, overrides, and every shipped experiment file."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from fm_pretrain.config import ConfigError, from_dict, load_config
from fm_pretrain.model import DecoderLM
from fm_pretrain.training.ds_config import build_ds_config
from tests.helpers.paths import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"model": {"fm": {"topk": 4}}}, "model.fm.topk"),
        ({"trian": {}}, "trian"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"train": {"steps": 1.5}}, "train.steps"),
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"model": {"tie_embeddings": "yes"}}, "model.tie_embeddings"),
        ({"model": {"layer_pattern": ["fm", "rnn"]}}, "model.layer_pattern[1]"),
        ({"model": {"fm": {"top_k": 0}}}, "model.fm.top_k"),
        ({"model": {"fm": {"top_k": 65, "n_memories": 64}}}, "model.fm.top_k"),
        ({"model": {"fm": {"backend": "cuda"}}}, "model.fm.backend"),
        ({"train": {"precision": "fp16"}}, "train.precision"),
        ({"optim": {"min_lr": 1.0, "lr": 0.1}}, "optim.min_lr"),
        (
            {"model": {"layer_pattern": ["attention"], "d_model": 100, "attention": {"n_heads": 3}}},
            "model.attention.n_heads",
        ),  # fmt: skip
        ({"downstream": {"every": -1}}, "downstream"),
        ({"downstream": {"enabled": True}}, "downstream.enabled"),  # no data.tokenizer
        (
            {"downstream": {"enabled": True}, "data": {"tokenizer": "t.model"}, "parallel": {"tensor_parallel": 2}},
            "downstream.enabled",
        ),  # fmt: skip
        ({"train": {"eval_every": 10}}, "train.val_every"),  # renamed keys name their new name
        ({"train": {"eval_batches": 2}}, "train.val_batches"),
        ({"eval": {"enabled": True}}, "downstream"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict(raw)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\n  nlayers: 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: unknown key 'model.nlayers'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"model": {"d_model": 64}}))
    cfg = load_config(path, ["model.fm.top_k=4", "model.layer_pattern=[fm, attention]", "optim.lr=1e-3"])
    assert cfg.model.fm.top_k == 4 and cfg.model.layer_pattern == ["fm", "attention"] and cfg.optim.lr == 1e-3
    assert cfg.model.d_model == 64
    with pytest.raises(ConfigError, match="model.fm.n_memory"):
        load_config(path, ["model.fm.n_memory=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["model.fm.top_k"])


EXPECTED_PARAMS = {  # (low, high) in millions, with a 32K vocabulary
    "demo_tiny.yaml": (0.1, 5),
    "tiny_fm.yaml": (0.1, 5),  # the comparison study's e2e test (tests/e2e/test_study.py)
    "tiny_attention.yaml": (0.1, 5),
    "tiny_mamba2.yaml": (0.1, 5),
    "fm_125m.yaml": (100, 150),
    "transformer_125m.yaml": (100, 150),
    "mamba2_125m.yaml": (100, 150),
    "fm_1b.yaml": (850, 1250),
    "transformer_1b.yaml": (850, 1250),
    "mamba2_1b.yaml": (850, 1250),
    # the memory family (docs/memory_family.md), matched to fm_125m / fm_1b
    "gla_tiny.yaml": (0.1, 5),
    "gdn_tiny.yaml": (0.1, 5),
    "mom_tiny.yaml": (0.1, 5),
    "fm_mc_tiny.yaml": (0.1, 5),
    "gla_125m.yaml": (100, 150),
    "gdn_125m.yaml": (100, 150),
    "mom_125m.yaml": (100, 150),
    "fm_mc_125m.yaml": (100, 150),
    "gla_1b.yaml": (850, 1250),
    "gdn_1b.yaml": (850, 1250),
    "mom_1b.yaml": (850, 1250),
    "fm_mc_1b.yaml": (850, 1250),
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_build(path: Path):
    cfg = load_config(path)
    build_ds_config(cfg, dp_size=8)  # the DeepSpeed file exists and agrees with the YAML
    with torch.device("meta"):
        model = DecoderLM(cfg.model)
    n = model.num_params() / 1e6
    low, high = EXPECTED_PARAMS[path.name]
    assert low <= n <= high, f"{path.name}: {n:.1f}M parameters, expected {low}-{high}M"


def test_the_1b_comparison_differs_only_in_the_mixer():
    raw = {k: yaml.safe_load((REPO / "configs" / f"{k}_1b.yaml").read_text()) for k in ("fm", "transformer", "mamba2")}
    for r in raw.values():
        r["model"].pop("layer_pattern")
        r["train"].pop("run_dir")
    assert raw["fm"] == raw["transformer"] == raw["mamba2"]


MIXER_SECTIONS = ("layer_pattern", "fm", "attention", "mamba2", "gla", "gated_delta", "mom", "memory_caching")


@pytest.mark.parametrize("size", ["125m", "1b"])
def test_the_memory_family_configs_differ_from_fm_only_in_the_mixer(size):
    """gla, gdn, mom and fm_mc at each size share everything with fm_<size> but the token mixer's sections (fm_mc:
    FM's own section too), so their runs compare with FM's in one MLflow experiment."""
    fm = yaml.safe_load((REPO / "configs" / f"fm_{size}.yaml").read_text())
    for name in ("gla", "gdn", "mom", "fm_mc"):
        raw = yaml.safe_load((REPO / "configs" / f"{name}_{size}.yaml").read_text())
        assert raw["train"].pop("run_dir") == f"runs/{name}_{size}"
        for r in (raw, fm):
            for key in MIXER_SECTIONS:
                r["model"].pop(key, None)
        fm["train"].pop("run_dir", None)
        assert raw == fm, name
    assert (
        yaml.safe_load((REPO / "configs" / f"fm_mc_{size}.yaml").read_text())["model"]["fm"]
        == yaml.safe_load((REPO / "configs" / f"fm_{size}.yaml").read_text())["model"]["fm"]
    )


@pytest.mark.parametrize(
    "raw,key",
    [
        ({"model": {"mom": {"top_k": 5, "n_memories": 4}}}, "model.mom.top_k"),
        ({"model": {"mom": {"inner": "lstm"}}}, "model.mom.inner"),
        ({"model": {"gla": {"d_key": 0}}}, "model.gla.d_key"),
        ({"model": {"memory_caching": {"mixers": ["attention"]}}}, r"model.memory_caching.mixers\[0\]"),
        ({"model": {"memory_caching": {"aggregation": "max"}}}, "model.memory_caching.aggregation"),
        (
            {"model": {"memory_caching": {"mixers": ["fm"], "segment_size": 100}, "fm": {"chunk_size": 64}}},
            "model.memory_caching.segment_size",
        ),
        ({"model": {"memory_caching": {"segmentation": "log", "state_mode": "independent"}}}, "state_mode"),
        (
            {"model": {"layer_pattern": ["mom"], "mom": {"n_heads": 3}}, "parallel": {"tensor_parallel": 2}},
            "model.mom.n_heads",
        ),  # fmt: skip
    ],
)
def test_memory_family_options_are_validated(raw, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(raw)


def test_ds_config_clash_is_an_error(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 3}')
    cfg = from_dict({"train": {"ds_config": str(ds), "grad_accum": 2}})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_ds_config(cfg, dp_size=1)
    ds.write_text('{"zero_optimization": {"stage": 1},\n  "bf16": }')
    with pytest.raises(ConfigError, match=f"{ds}:2: not valid JSON"):
        build_ds_config(cfg, dp_size=1)


def test_downstream_eval_schedule_and_zero3_refusal(tmp_path):
    from fm_pretrain.training.components import DownstreamEval
    from fm_pretrain.training.preflight import preflight

    raw = {"downstream": {"enabled": True, "every": 3}, "data": {"tokenizer": "t.model", "path": str(tmp_path)}}
    cfg = from_dict(raw)
    sched = DownstreamEval(cfg.downstream, last_step=10, tokenizer=None, run_dir=tmp_path)
    assert [s for s in range(1, 11) if sched.due(s)] == [3, 6, 9, 10]
    cfg.downstream.every = 0
    assert [s for s in range(1, 11) if sched.due(s)] == [10]
    cpu = torch.device("cpu")
    cfg.train.ds_config = "ds_configs/zero2.json"
    preflight(cfg, 1, cpu)
    cfg.train.ds_config = "ds_configs/zero3.json"
    with pytest.raises(ConfigError, match="downstream.enabled: .*ZeRO-3"):
        preflight(cfg, 1, cpu)
    cfg.downstream.enabled = False
    assert not sched.due(10)
    preflight(cfg, 1, cpu)


def test_preflight_checks_the_machine_naming_the_key(tmp_path, monkeypatch):
    """What the config alone cannot decide fails before any process group exists, each error naming its key."""
    from fm_pretrain.training.preflight import preflight

    cpu = torch.device("cpu")
    base = {"data": {"path": str(tmp_path), "tokenizer": "t.model"}}
    cases = [
        ({"parallel": {"tensor_parallel": 2}, "model": {"fm": {"n_heads": 2}}}, 3, "parallel.tensor_parallel"),
        ({"downstream": {"enabled": True, "tasks": "hellaswag,mmlu"}}, 1, "downstream.tasks"),
        ({"model": {"fm": {"backend": "triton"}}}, 1, "model.fm.backend"),
        (
            {"model": {"layer_pattern": ["gated_delta"], "gated_delta": {"backend": "fla"}}},
            1,
            "model.gated_delta.backend",
        ),
        ({"train": {"ds_config": "ds_configs/zero9.json"}}, 1, "train.ds_config"),
        ({"data": {"path": "", "tokenizer": ""}}, 1, "data.path"),
    ]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else Triton runs on CPU tensors in its interpreter
    monkeypatch.delenv("FM_PRETRAIN_KERNELS", raising=False)
    for extra, world, key in cases:
        raw = {**base, **extra}
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}"):
            preflight(from_dict(raw), world, cpu)
    plan = preflight(from_dict({**base, "train": {"micro_batch_size": 2, "grad_accum": 3}}), 4, cpu)
    assert (plan.dp, plan.tp, plan.global_batch, plan.zero_stage) == (4, 1, 24, 1)


def test_one_due_rule_for_every_periodic_action(tmp_path):
    from fm_pretrain.checkpoint import CheckpointLayout
    from fm_pretrain.training.components import Checkpointer, due

    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]  # every 4th step and the last
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]
    cfg = from_dict({"train": {"steps": 10, "save_every": 4, "run_dir": str(tmp_path)}})
    ckpt = Checkpointer(cfg.train, CheckpointLayout(dp=1, zero_stage=1), {}, None)
    assert [s for s in range(1, 11) if ckpt.due(s)] == [4, 8, 10]
    cfg.train.save_every = 0  # no checkpoints at all (a stop signal still saves: the trainer's own check)
    assert not any(ckpt.due(s) for s in range(1, 11))
    with pytest.raises(ConfigError, match="train.save_every"):
        from_dict({"train": {"save_every": -1}})
