"""English/Japanese downstream evaluation of fm-pretrain checkpoints (docs/evaluation.md).

Library use: `evaluate_model(model, tokenizer, "en,jcommonsenseqa", num_fewshot=2)`; command line:
`python -m fm_pretrain.eval --checkpoint RUN_DIR/checkpoints/step_N`. No DeepSpeed needed, except to convert a
ZeRO checkpoint to its full weights once.
"""

from .items import Item, Task, load_task
from .readers import EvalDataError
from .runner import evaluate_model
from .tasks import DEFAULT_DATA_DIR, GROUPS, TASKS, resolve_tasks

__all__ = [
    "DEFAULT_DATA_DIR",
    "GROUPS",
    "TASKS",
    "EvalDataError",
    "Item",
    "Task",
    "evaluate_model",
    "load_task",
    "resolve_tasks",
]
