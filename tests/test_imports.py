"""The one-way import rules of docs/architecture.md, checked on the source (ast), and no import cycle.

Every import counts, including those inside functions (a lazy import is still a dependency). A planted
violation in a copy of the tree must be reported, so the check cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from tests.helpers.paths import REPO

PACKAGE_ROOTS = {"fm_pretrain": REPO / "fm_pretrain", "fm_kernels": REPO / "kernels" / "fm_kernels"}
OURS = ("fm_pretrain", "fm_kernels", "data_prep")
TRAINER_SIDE = ("fm_pretrain.train", "fm_pretrain.training", "fm_pretrain.demo", "fm_pretrain.launch")

# (modules the rule covers, the imports they must not make, why)
RULES = [
    (("fm_pretrain.config",), OURS, "config imports nothing of the project"),
    (("fm_kernels",), ("fm_pretrain", "data_prep"), "kernels know nothing of fm_pretrain"),
    (
        ("fm_pretrain.model",),
        (
            "deepspeed",
            "mlflow",
            "fm_pretrain.tracking",
            "fm_pretrain.checkpoint",
            "fm_pretrain.eval",
            "fm_pretrain.compare",
            *TRAINER_SIDE,
        ),
        "model knows nothing of DeepSpeed, MLflow, Slurm or the trainer",
    ),  # fmt: skip
    (
        ("fm_pretrain.data",),
        (
            "deepspeed",
            "mlflow",
            "fm_pretrain.model",
            "fm_pretrain.tracking",
            "fm_pretrain.checkpoint",
            "fm_pretrain.eval",
            *TRAINER_SIDE,
        ),
        "data feeds the model; it knows neither the model nor the trainer",
    ),  # fmt: skip
    (("fm_pretrain.parallel",), ("mlflow", "fm_pretrain.tracking", *TRAINER_SIDE), "parallel is a library"),
    (
        ("fm_pretrain.checkpoint",),
        ("mlflow", "fm_pretrain.tracking", "fm_pretrain.eval", *TRAINER_SIDE),
        "checkpoints serve the trainer, eval and tools alike",
    ),
    (
        ("fm_pretrain.tracking",),
        ("deepspeed", "fm_pretrain.model", "fm_pretrain.checkpoint", *TRAINER_SIDE),
        "tracking is a sink",
    ),
    (("fm_pretrain.eval",), ("fm_pretrain.train", "fm_pretrain.training"), "eval runs without the trainer"),
    (("fm_pretrain.testing",), (*OURS[:1], "deepspeed", "mlflow"), "fault injection is a leaf"),
]


def module_name(path: Path, roots: dict[str, Path]) -> str:
    for name, root in roots.items():
        if path.is_relative_to(root):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """Every module `path` imports (absolute names; `from X import Y` counts X.Y when that is a module)."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return out


def import_graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    files = {module_name(p, roots): p for root in roots.values() for p in root.rglob("*.py")}
    return {m: imports_of(p, m, set(files)) for m, p in files.items()}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for covered, forbidden, why in RULES:
        for module, imported in graph.items():
            if _within(module, covered):
                found += [f"{module} imports {name}: {why}" for name in sorted(imported) if _within(name, forbidden)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), among our own modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_tree_follows_the_import_rules():
    graph = import_graph(PACKAGE_ROOTS)
    assert len(graph) > 80 and "fm_pretrain.model.lm" in graph and "fm_kernels.fm.naive" in graph
    assert violations(graph) == []


def test_no_import_cycle():
    graph = import_graph(PACKAGE_ROOTS)
    assert cycles(graph) == []


def test_a_planted_violation_and_a_planted_cycle_are_reported(tmp_path):
    roots = {name: tmp_path / name for name in PACKAGE_ROOTS}
    for name, root in PACKAGE_ROOTS.items():
        shutil.copytree(root, roots[name], ignore=shutil.ignore_patterns("__pycache__"))
    lm = roots["fm_pretrain"] / "model" / "lm.py"
    lm.write_text(lm.read_text() + "\n\ndef _planted():\n    import deepspeed  # noqa\n")
    config = roots["fm_pretrain"] / "config.py"
    config.write_text(config.read_text() + "\nfrom fm_pretrain.model import DecoderLM  # noqa\n")
    naive = roots["fm_kernels"] / "fm" / "naive.py"
    naive.write_text(naive.read_text() + "\nfrom fm_pretrain.data import IGNORE_INDEX  # noqa\n")
    graph = import_graph(roots)
    found = violations(graph)
    assert (
        "fm_pretrain.model.lm imports deepspeed: model knows nothing of DeepSpeed, MLflow, Slurm or the trainer"
        in found
    )
    assert "fm_pretrain.config imports fm_pretrain.model: config imports nothing of the project" in found
    assert "fm_kernels.fm.naive imports fm_pretrain.data: kernels know nothing of fm_pretrain" in found
    # config -> model -> lm -> config closes a cycle
    assert any("fm_pretrain.config" in comp and "fm_pretrain.model.lm" in comp for comp in cycles(graph))
