"""The task registry: names, groups (`en`, `ja`, `all`) and the default data directory."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from . import tasks_en, tasks_ja
from .items import Task

# The committed fixtures (small real subsets of every task); --data-dir points at a full copy instead.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "eval"
TASKS: dict[str, Task] = {t.name: t for t in [*tasks_en.TASKS, *tasks_ja.TASKS]}
GROUPS = {"all": list(TASKS), **{lang: [n for n, t in TASKS.items() if t.lang == lang] for lang in ("en", "ja")}}


def resolve_tasks(spec: str | Iterable[str]) -> list[Task]:
    """Tasks named by a comma list (or an iterable) of task names and groups, in order, without repeats."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [s.strip() for s in spec]
    out: list[str] = []
    for name in filter(None, names):
        if name in GROUPS:
            out += [n for n in GROUPS[name] if n not in out]
        elif name in TASKS:
            if name not in out:
                out.append(name)
        else:
            raise ValueError(f"unknown task '{name}'; choose from {sorted(TASKS)} or the groups {sorted(GROUPS)}")
    if not out:
        raise ValueError("no tasks selected")
    return [TASKS[n] for n in out]
