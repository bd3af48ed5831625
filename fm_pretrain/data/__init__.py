"""Data pipeline: sentencepiece tokenizer, JSONL reading, packed token shards (see docs/data.md).

Submodules are imported on demand so that `import fm_pretrain.data` stays cheap (no torch/datasets).
"""


class DataError(ValueError):
    """A problem with input or packed data; the message names the file (and line) at fault."""
