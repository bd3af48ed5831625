"""lm-evaluation-harness on our checkpoints, without an export: the model class `fm_pretrain`, and our local tasks.

    python -m fm_pretrain.eval.lm_eval_model --model fm_pretrain --model_args checkpoint=RUN_DIR \\
        --tasks fm_en,fm_jsquad --num_fewshot 0 --batch_size 8

takes lm-evaluation-harness's own command line (this module registers the model class, adds our task directory
`fm_pretrain/eval/lm_eval_tasks` as `--include_path`, then runs lm-eval's CLI); `fm-lm-eval` is the same command.
In Python: `import fm_pretrain.eval.lm_eval_model` registers the class, then
`lm_eval.simple_evaluate(model="fm_pretrain", model_args="checkpoint=RUN_DIR", tasks=[...],
task_manager=lm_eval.tasks.TaskManager(include_path=TASKS_DIR))`.

`--model_args` keys: `checkpoint` (a step_N, checkpoints or run directory; required), `tokenizer` (default: the
run's `data.tokenizer`, sha256 checked), `device`, `dtype` (`float32` | `bfloat16`), `batch_size`, `max_length`
(default: the model's `max_seq_len`), `prefill_chunk` (chunked prefill for generation).

The requests go through our scoring paths: log-likelihoods through `fm_pretrain.eval.scoring.loglikelihoods`
(right-padded batches of one forward each, longest first), generation through `fm_pretrain.inference.generate_text`
(left-padded batches with per-layer recurrent state and KV caches, greedy unless the task samples). Tokens are ours:
`[bos] + sentencepiece ids`, which is what the exported transformers tokenizer produces too, so this class and
`--model hf --model_args pretrained=EXPORT_DIR,trust_remote_code=True` score the same sequences
(tests/export/test_harness_parity.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@register_model("fm_pretrain")
class FMPretrainLM(TemplateLM):
    """An fm-pretrain checkpoint for lm-evaluation-harness (loglikelihood, loglikelihood_rolling, generate_until)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        prefill_chunk: int | None = None,
        model: torch.nn.Module | None = None,
        tok: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from fm_pretrain.checkpoint import load_model
        from fm_pretrain.eval.cli import load_tokenizer

        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's CLI says cuda by default
        if model is None:
            if checkpoint is None:
                raise ValueError("--model_args needs checkpoint=RUN_DIR (a step_N, checkpoints or run directory)")
            model, cfg, meta = load_model(Path(checkpoint), device)
            tok = load_tokenizer(cfg, meta, Path(tokenizer) if tokenizer else None)
        elif tok is None:
            raise ValueError("an in-memory model needs its tokenizer (tok=)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval()
        self.tok = tok
        self._device = torch.device(device)
        bs = str(batch_size)
        self.batch_size = 8 if bs.startswith("auto") else int(bs)  # no automatic batch size search
        self.max_length = int(max_length) if max_length else int(self.model.cfg.max_seq_len)
        self.prefill_chunk = int(prefill_chunk) if prefill_chunk else None

    @classmethod
    def from_model(cls, model: torch.nn.Module, tok: Any, **kwargs: Any) -> FMPretrainLM:
        """For an in-memory DecoderLM (tensor_parallel = 1) and our tokenizer."""
        device = str(next(model.parameters()).device)
        return cls(model=model, tok=tok, device=device, **kwargs)

    # --- tokens ---
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """[bos] + ids (bos unless add_special_tokens is False), as the exported transformers tokenizer encodes."""
        ids = self.tok.encode(string)
        return ids if add_special_tokens is False else [self.tok.bos_id, *ids]

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    # --- requests ---
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        from fm_pretrain.eval.scoring import Encoded, loglikelihoods

        seqs = []
        for _, ctx, cont in requests:
            ids = [*ctx, *cont][-self.max_length :]
            seqs.append(Encoded(ids, len(cont), len(ctx) + len(cont) - len(ids), False))
        out = loglikelihoods(self.model, seqs, self.batch_size, self.tok.pad_id, progress=not disable_tqdm)
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string scored whole, in disjoint windows of max_length tokens (the first conditioned on bos)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok.encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            ):  # fmt: skip
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations through our batched, cached generation; each cut at
        the first of the task's `until` strings."""
        from fm_pretrain.inference import SamplingParams, generate_text

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for indices in tqdm(groups.values(), desc="generate_until", disable=disable_tqdm):
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            sampling = SamplingParams(temperature=temperature, top_k=kwargs.pop("top_k", None),
                                      top_p=kwargs.pop("top_p", None))  # fmt: skip
            room = max(1, self.max_length - max_new)
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            gens = generate_text(
                self.model, self.tok, prompts, max_new, sampling=sampling, stop_strings=until,
                batch_size=self.batch_size, prefill_chunk=self.prefill_chunk, seed=kwargs.pop("seed", 1234),
            )  # fmt: skip
            for i, g in zip(indices, gens, strict=True):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    """lm-evaluation-harness's CLI with the `fm_pretrain` model class registered and our task directory included."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
