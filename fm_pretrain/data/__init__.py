"""Data pipeline: sentencepiece tokenizer, JSONL reading, packed token shards (see docs/data.md).

Submodules are imported on demand so that `import fm_pretrain.data` stays cheap (no torch/datasets).
"""


class DataError(ValueError):
    """A problem with input or packed data; the message names the file (and line) at fault."""


# The label value the loss ignores (torch cross_entropy's default ignore_index): the packed reader puts it where the
# next token starts another document, and the model's loss skips it. Defined once, here, with the batch format.
IGNORE_INDEX = -100
