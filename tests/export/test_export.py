"""`python -m fm_pretrain.export`: checkpoints of every layout and mixer round-trip through transformers.

Each export is loaded through its own generated code (as `trust_remote_code=True` loads it) and must give the
checkpoint's fp32 logits (to 1e-6) and, with left-padded prompts of different lengths, the same greedy tokens as our
generation (`DecoderLM.generate`, i.e. fm_pretrain.inference). One export is loaded in a fresh interpreter that
cannot import fm_pretrain or fm_kernels, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fm_pretrain.checkpoint import load_model
from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.export import __main__ as export_cli
from fm_pretrain.export import export_checkpoint
from fm_pretrain.export.convert import fixture_texts, load_exported, probe_ids
from fm_pretrain.export.tokenizer import verify
from fm_pretrain.inference import left_pad
from tests.export.conftest import LAYOUTS, MIXERS
from tests.helpers.paths import REPO

MIXER_MODULES = {
    "fm": "fm_pretrain__model__layers__fm.py",
    "attention": "fm_pretrain__model__layers__attention.py",
    "mamba2": "fm_pretrain__model__layers__mamba2.py",
    "gla": "fm_pretrain__model__layers__gla.py",
    "gated_delta": "fm_pretrain__model__layers__gated_delta.py",
    "mom": "fm_pretrain__model__layers__mom.py",
}
USES = {"mom": ("gated_delta",)}  # MoM's gated-delta inner rule takes its gates from the Gated DeltaNet module


def prompts(tok: Tokenizer) -> list[list[int]]:
    """Three prompts of different lengths (bos first), longer than the chunk sizes, for left-padded generation."""
    texts = ["Question: Which gas do plants absorb?\nAnswer:", "質問：日本の首都はどこですか？\n回答：",
             "The city councilmen refused the demonstrators a permit because they feared violence. " * 2]  # fmt: skip
    return [[tok.bos_id, *tok.encode(t)] for t in texts]


def assert_round_trip(run_dir: Path, export_dir: Path, new_tokens: int = 10, varied: bool = True) -> None:
    """Logits on real text and greedy generation of a left-padded batch: the export equals the checkpoint (and, if
    `varied`, the rows generate different tokens, so the comparison is not vacuous)."""
    model, cfg, _ = load_model(run_dir)
    hf = load_exported(export_dir, torch.float32)
    assert type(hf).__module__.startswith("transformers_modules."), "not the export's own code"
    tok = Tokenizer(export_dir / "tokenizer.model")
    ids = probe_ids(tok, 2, 61)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    input_ids, start = left_pad(prompts(tok), tok.pad_id)
    mask = (torch.arange(input_ids.shape[1])[None, :] >= start[:, None]).long()
    ours = model.generate(input_ids, new_tokens, start=start)[:, input_ids.shape[1] :]
    theirs = hf.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)  # fmt: skip
    theirs = theirs[:, input_ids.shape[1] :]
    assert theirs.tolist() == ours.tolist()
    assert not varied or len({tuple(r) for r in ours.tolist()}) > 1, "every row generated the same tokens"
    saved = json.loads((export_dir / "config.json").read_text())
    want = {**cfg.model.__dict__}
    assert saved["fm_model"]["layer_pattern"] == cfg.model.layer_pattern
    assert saved["fm_model"]["fm"] == {**want["fm"].__dict__, "backend": "auto"}
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_fm.FMPretrainForCausalLM"
    used = set(cfg.model.layer_pattern) | {dep for kind in cfg.model.layer_pattern for dep in USES.get(kind, ())}
    for kind, module in MIXER_MODULES.items():  # the export carries the mixers it uses, and only those
        assert (export_dir / module).is_file() == (kind in used), module
    caching = export_dir / "fm_pretrain__model__memory_caching.py"
    assert caching.is_file() == bool(cfg.model.memory_caching.mixers)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_of_each_checkpoint_layout_round_trips(train_layout, exported, layout):
    run_dir = train_layout(layout)
    export_dir = exported(run_dir)
    assert_round_trip(run_dir, export_dir, varied=False)  # 3 training steps: the rows may well agree
    info = json.loads((export_dir / "fm_pretrain_export.json").read_text())
    assert (
        info["layout"]
        == {"zero1": {"dp": 2, "zero_stage": 1, "tp": 1}, "zero3_tp2": {"dp": 1, "zero_stage": 3, "tp": 2}}[layout]
    )


@pytest.mark.parametrize("name", list(MIXERS))
def test_export_of_each_mixer_round_trips(mixer_run, tmp_path, name):
    run_dir = mixer_run(name)
    export_dir = export_checkpoint(run_dir, tmp_path / "hf", check=False)
    assert_round_trip(run_dir, export_dir)


@pytest.mark.parametrize("name", ["memory_caching", "mom"])
def test_beam_search_with_the_recurrent_cache_equals_beam_search_without_it(mixer_run, tmp_path, name):
    """Beam search reorders the cache between steps (`FMCacheLayer.reorder_cache`), Memory Caching's cached segment
    states (a NamedTuple of tensors) and MoM's per-memory states included: with the cache it must choose what it
    chooses when every step recomputes the whole prefix (use_cache=False)."""
    export_dir = export_checkpoint(mixer_run(name), tmp_path / "hf", check=False)
    hf = load_exported(export_dir, torch.float32)
    tok = Tokenizer(export_dir / "tokenizer.model")
    input_ids, start = left_pad(prompts(tok)[:2], tok.pad_id)
    mask = (torch.arange(input_ids.shape[1])[None, :] >= start[:, None]).long()
    runs = [
        hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, num_beams=3,
                    do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id, use_cache=use_cache)
        for use_cache in (True, False)
    ]  # fmt: skip
    assert runs[0].tolist() == runs[1].tolist()


def test_weights_are_sharded_when_large(mixer_run, tmp_path):
    export_dir = export_checkpoint(mixer_run("hybrid"), tmp_path / "hf", max_shard_size="100KB", check=False)
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((export_dir / s).is_file() for s in shards)
    assert not (export_dir / "model.safetensors").exists()
    assert_round_trip(mixer_run("hybrid"), export_dir, new_tokens=4)


def test_auto_classes_resolve_to_this_package_without_remote_code(mixer_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = mixer_run("hybrid")
    export_dir = export_checkpoint(run_dir, tmp_path / "hf", check=False)
    hf = AutoModelForCausalLM.from_pretrained(export_dir)  # registered by `import fm_pretrain.export`
    assert type(hf).__module__ == "fm_pretrain.export.modeling_fm"
    model, _, _ = load_model(run_dir)
    ids = probe_ids(Tokenizer(export_dir / "tokenizer.model"), 2, 40)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, rtol=0, atol=1e-6)


NUMERICS_ENV = ("OMP_", "MKL_", "KMP_", "ATEN_CPU_CAPABILITY", "DNNL_", "ONEDNN_", "TORCH_")
FRESH = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # site-packages, without running its .pth files: no editable fm_pretrain install
assert importlib.util.find_spec("fm_pretrain") is None and importlib.util.find_spec("fm_kernels") is None, sys.path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
export, io = sys.argv[2], json.loads(open(sys.argv[3]).read())
torch.set_num_threads(int(sys.argv[4]))  # the parent's: the same split of each sum, so the same bits
torch.set_float32_matmul_precision(sys.argv[5])  # the parent's (a library may have lowered it there)
tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
enc = tok(io["texts"], return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(input_ids=torch.tensor(io["ids"])).logits
    gen = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None)
torch.save({"logits": logits, "ids": [tok.encode(t) for t in io["texts"]], "input_ids": enc["input_ids"],
            "generated": gen[:, enc["input_ids"].shape[1]:], "module": type(model).__module__,
            "backends": sorted({m.backend for m in model.modules() if hasattr(m, "backend") and m.backend})},
           io["out"])
"""


def test_export_loads_in_a_fresh_process_without_fm_pretrain(mixer_run, tmp_path):
    run_dir = mixer_run("hybrid")
    export_dir = export_checkpoint(run_dir, tmp_path / "hf", check=False)
    model, _, _ = load_model(run_dir)
    tok = Tokenizer(export_dir / "tokenizer.model")
    ids = probe_ids(tok, 2, 40)
    texts = ["Question: Which gas do plants absorb?\nAnswer:", "質問：日本の首都はどこですか？\n回答："]
    io = {"texts": texts, "ids": ids.tolist(), "out": str(tmp_path / "out.pt")}
    (tmp_path / "io.json").write_text(json.dumps(io))
    # The comparison is exact up to 1e-5, so the child must do the same arithmetic as this process: same thread
    # count, fp32 matmul precision and CPU-dispatch settings. This random model (init_std 0.2, sparse top-k) turns
    # last-bit differences into large ones: CI on another machine once saw 3.5e-4 before these were passed on.
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HOME": str(tmp_path)} | {k: v for k, v in os.environ.items() if k.startswith(NUMERICS_ENV)}  # fmt: skip
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", FRESH, site, str(export_dir), str(tmp_path / "io.json"),
         str(torch.get_num_threads()), torch.get_float32_matmul_precision()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["module"].startswith("transformers_modules.") and got["backends"] == ["torch"]
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids).logits, rtol=0, atol=1e-5)
    assert got["ids"] == [[tok.bos_id, *tok.encode(t)] for t in texts]  # transformers tokenizer == sentencepiece
    input_ids, start = left_pad(got["ids"], tok.pad_id)
    assert got["input_ids"].tolist() == input_ids.tolist()  # left padding with our pad id
    ours = model.generate(input_ids, 8, start=start)[:, input_ids.shape[1] :]
    assert got["generated"].tolist() == ours.tolist()


def test_transformers_tokenizer_equals_sentencepiece(packed, tmp_path, mixer_run):
    """The exported tokenizer (BPE, the demo's) and a unigram one encode every fixture text like sentencepiece."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    from fm_pretrain.data.tokenizer import train_tokenizer
    from fm_pretrain.export.tokenizer import write_hf_tokenizer

    texts = [*fixture_texts(), "\nstarts with a newline", "  two leading spaces", " ", "", "x<0x41>y 数字123456"]
    export_dir = export_checkpoint(mixer_run("fm_dense"), tmp_path / "hf", check=False)
    hf_tok = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    assert verify(packed / "tokenizer.model", hf_tok, texts, limit=1) == []
    sp = Tokenizer(packed / "tokenizer.model")
    assert hf_tok("日本語 text")["input_ids"] == [sp.bos_id, *sp.encode("日本語 text")]
    for text in texts[::50]:
        assert hf_tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    corpus = [REPO / "data/tiny/tiny_en.jsonl", REPO / "data/tiny/tiny_ja.jsonl"]
    unigram = train_tokenizer(
        corpus, tmp_path / "uni" / "tok", vocab_size=1200, model_type="unigram", reserved_tokens=2
    )
    write_hf_tokenizer(unigram.path, tmp_path / "uni", model_max_length=128)
    assert verify(unigram.path, HFTokenizer.from_file(str(tmp_path / "uni" / "tokenizer.json")), texts, limit=1) == []


def test_cli_exports_bf16_and_checks(capsys, mixer_run, tmp_path):
    out = tmp_path / "hf"
    assert export_cli.main(["--checkpoint", str(mixer_run("mamba2")), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "check passed" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_exported(out).dtype == torch.bfloat16


def test_export_runs_our_triton_kernels_where_fm_kernels_is_installed(mixer_run, tmp_path, monkeypatch):
    """fm_kernels is importable here: the exported FM layers take its Triton kernels (in Triton's interpreter on
    CPU; FM_PRETRAIN_KERNELS=triton asks for them, as `auto` does on a GPU) through the export's guarded imports."""
    run_dir = mixer_run("fm_sparse")
    export_dir = export_checkpoint(run_dir, tmp_path / "hf", check=False)
    model, _, _ = load_model(run_dir)
    ids = probe_ids(Tokenizer(export_dir / "tokenizer.model"), 1, 24)
    with torch.no_grad():
        want = model(ids).logits
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FM_PRETRAIN_KERNELS", "triton")
        hf = load_exported(export_dir, torch.float32)
        got = hf(input_ids=ids).logits
        out = hf.generate(ids[:, :10], attention_mask=torch.ones_like(ids[:, :10]), max_new_tokens=3, do_sample=False)
    assert {b.mixer.backend for b in hf.model.blocks} == {"triton"}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert out[0, 10:].tolist() == model.generate(ids[:, :10], 3)[0, 10:].tolist()
    assert {"fm_kernels.fm.sparse_triton", "fm_kernels.fm.step_triton"} <= set(sys.modules)


# --- bad input ---
def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = export_cli.main(list(args))
    return code, capsys.readouterr().err


def test_missing_checkpoint_is_named(capsys, tmp_path):
    code, err = run_cli(capsys, "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "hf"))
    assert code == 2 and str(tmp_path / "nope") in err


def test_partial_checkpoint_names_the_missing_files(capsys, mixer_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(mixer_run("attention"), run_dir)
    (run_dir / "checkpoints" / "step_1" / "mp_rank_00_model_states.pt").unlink()
    code, err = run_cli(capsys, "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    assert code == 2 and "incomplete checkpoint" in err and "mp_rank_00_model_states.pt" in err, err
    (run_dir / "checkpoints" / "step_1" / "meta.json").unlink()
    code, err = run_cli(capsys, "--checkpoint", str(run_dir / "checkpoints" / "step_1"), "--out", str(tmp_path / "hf"))
    assert code == 2 and "meta.json" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_partial_zero1_checkpoint_names_the_missing_rank_file(capsys, train_layout, tmp_path):
    step = tmp_path / "step_3"
    shutil.copytree(train_layout("zero1") / "checkpoints" / "step_3", step, ignore=shutil.ignore_patterns("universal"))
    (step / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    code, err = run_cli(capsys, "--checkpoint", str(step), "--out", str(tmp_path / "hf"))
    assert code == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in err, err


def test_unsupported_mixer_is_refused(capsys, mixer_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(mixer_run("attention"), run_dir)
    meta_path = run_dir / "checkpoints" / "step_1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["layer_pattern"] = ["rwkv7", "attention"]  # e.g. a checkpoint of a newer version
    meta_path.write_text(json.dumps(meta))
    code, err = run_cli(capsys, "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    assert code == 2 and "['rwkv7'] have no export support yet" in err, err


def test_existing_output_is_not_overwritten(capsys, mixer_run, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "--checkpoint", str(mixer_run("attention")), "--out", str(tmp_path / "hf"))
    assert code == 2 and "--overwrite" in err and (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_check_fails_with_the_largest_difference(capsys, mixer_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir = mixer_run("fm_sparse")
    export_dir = export_checkpoint(run_dir, tmp_path / "hf", check=False)
    assert run_cli(capsys, "--check", str(export_dir))[0] == 0
    weights = load_file(export_dir / "model.safetensors")
    name = "model.blocks.1.mlp.w_down.weight"
    weights[name] = weights[name] + 0.05
    save_file(weights, export_dir / "model.safetensors", metadata={"format": "pt"})
    code, err = run_cli(capsys, "--check", str(export_dir))
    assert code == 1 and "logits differ by up to" in err and "at row" in err and "vocabulary id" in err, err
