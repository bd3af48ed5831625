"""Text generation with a real sentencepiece tokenizer: stop strings cut where the free text has them, streaming
hands out exactly the final text, a batch equals its prompts alone; the CLI on a checkpoint prints the same."""

import json

import pytest

from fm_pretrain.data.tokenizer import Tokenizer
from fm_pretrain.generate import main, unescape
from fm_pretrain.inference import SamplingParams, generate_text

from .tiny_models import tiny_config, tiny_lm, write_checkpoint

PROMPTS = ["The first", "質問：日本の首都は？\n回答：", "A much longer prompt, about a cat that sat on a mat, says"]


@pytest.fixture(scope="module")
def tok(packed) -> Tokenizer:
    return Tokenizer(packed / "tokenizer.model")


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm("hybrid", vocab=tok.vocab_size)


def test_stop_strings_streaming_and_batching(tok, model):
    free = generate_text(model, tok, PROMPTS, 12, stop_at_eos=False, batch_size=3)
    alone = [generate_text(model, tok, [p], 12, stop_at_eos=False)[0] for p in PROMPTS]
    assert [f.token_ids for f in free] == [a.token_ids for a in alone]
    assert all(f.finish == "length" and len(f.token_ids) == 12 for f in free)
    assert all(f.text == tok.decode(f.token_ids) for f in free)
    # A stop string taken from the middle of row 0's free text: the text ends right before it.
    text = free[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    streamed = ["", "", ""]

    def collect(i: int, piece: str) -> None:
        streamed[i] += piece

    cut = generate_text(model, tok, PROMPTS, 12, stop_strings=[stop], stop_at_eos=False, stream=collect)
    assert cut[0].text == text[: text.find(stop)] and cut[0].finish == "stop"
    assert cut[0].token_ids == free[0].token_ids[: len(cut[0].token_ids)] and len(cut[0].token_ids) < 12
    assert streamed == [c.text for c in cut]
    for c, f in zip(cut, free, strict=True):
        assert (c.finish == "stop") == (stop in f.text) and f.text.startswith(c.text)


def test_cli_prints_what_the_library_generates(tok, model, tmp_path, capsys):
    cfg = tiny_config("hybrid", tok.vocab_size, tokenizer=tok.path)
    write_checkpoint(model, cfg, tmp_path / "run", step=3, tokenizer_sha256=tok.sha256)
    argv = ["--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "50"]
    argv += ["--seed", "5", "--stop", "\\n"]
    assert main([*argv, "--prompt", PROMPTS[0], "--prompt", unescape(PROMPTS[1].replace("\n", "\\n")), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = generate_text(model, tok, PROMPTS[:2], 8, sampling=SamplingParams(0.8, 50), stop_strings=["\n"], seed=5)
    assert [r["tokens"] for r in rows] == [w.token_ids for w in want]
    assert [r["text"] for r in rows] == [w.text for w in want] and rows[1]["prompt"] == PROMPTS[1]
    # --stream generates one prompt at a time: the same draws as that prompt alone
    assert main([*argv, "--prompt", PROMPTS[0], "--stream"]) == 0
    alone = generate_text(model, tok, PROMPTS[:1], 8, sampling=SamplingParams(0.8, 50), stop_strings=["\n"], seed=5)
    assert capsys.readouterr().out == alone[0].text + "\n"
    assert main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
