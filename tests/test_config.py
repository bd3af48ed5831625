"""Config loading: strict validation naming the key, overrides, and every shipped experiment file."""

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
        ({"eval": {"every": -1}}, "eval"),
        ({"eval": {"enabled": True, "tasks": "hellaswag,mmlu"}, "data": {"tokenizer": "t.model"}}, "eval.tasks"),
        ({"eval": {"enabled": True}}, "eval.enabled"),  # no data.tokenizer
        (
            {"eval": {"enabled": True}, "data": {"tokenizer": "t.model"}, "parallel": {"tensor_parallel": 2}},
            "eval.enabled",
        ),  # fmt: skip
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
    "fm_125m.yaml": (100, 150),
    "fm_1b.yaml": (850, 1250),
    "transformer_1b.yaml": (850, 1250),
    "mamba2_1b.yaml": (850, 1250),
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


def test_ds_config_clash_is_an_error(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 3}')
    cfg = from_dict({"train": {"ds_config": str(ds), "grad_accum": 2}})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_ds_config(cfg, dp_size=1)
    ds.write_text('{"zero_optimization": {"stage": 1},\n  "bf16": }')
    with pytest.raises(ConfigError, match=f"{ds}:2: not valid JSON"):
        build_ds_config(cfg, dp_size=1)


def test_downstream_eval_schedule_and_zero3_refusal():
    from fm_pretrain.eval.during_training import check_zero_stage, due

    cfg = from_dict({"eval": {"enabled": True, "every": 3}, "data": {"tokenizer": "t.model"}}).eval
    assert [s for s in range(1, 11) if due(cfg, s, last_step=10)] == [3, 6, 9, 10]
    cfg.every = 0
    assert [s for s in range(1, 11) if due(cfg, s, last_step=10)] == [10]
    check_zero_stage(cfg, 2)
    with pytest.raises(ConfigError, match="eval.enabled: .*ZeRO-3"):
        check_zero_stage(cfg, 3)
    cfg.enabled = False
    assert not due(cfg, 10, last_step=10)
    check_zero_stage(cfg, 3)
