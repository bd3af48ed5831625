"""What the GPU check imports, and whether the GPU image plus the carried wheels (.whl/) provide it.

    python scripts/gpu_check/wheel_imports.py walk               # static: third-party imports the check can reach
    python scripts/gpu_check/wheel_imports.py wheels [--dir .whl] # the wheel set against wheels.txt and the image
    python scripts/gpu_check/wheel_imports.py verify             # where it runs: import what the check needs
    python scripts/gpu_check/wheel_imports.py classify DIR       # the modules a check run imported (trace/)

- `walk` parses (ast) every first-party module reachable from the check's entry points (ENTRY_POINTS, the
  test files holding `gpu`-marked tests), following first-party imports at any depth, and lists each
  third-party top-level import with where it is and whether it runs at import time ("module"), only when a
  function runs ("lazy"), or inside a `try` that tolerates its absence ("optional").
- `wheels` checks .whl/ against wheels.txt (one wheel per line, exact versions), the size limit of what the
  device tool carries, and that every Requires-Dist of every carried wheel (markers evaluated for CPython
  3.12 on x86-64 Linux) is itself carried or installed on the GPU image (image_packages.txt, from the device
  tool's KINDS.md), with the version where the image's is known.
- `verify` imports every third-party module the check needs and reports versions and unmet requirements; an
  optional one (fla on CPU) that fails to import is reported, not failed.
- `classify` reads the per-process import records of trace/sitecustomize.py and says for every third-party
  distribution imported whether the image has it, it is carried, or neither; one on neither is a problem
  when this repository's code imported it (a third-party package's own optional imports are not).

Standard library only, except `packaging` (present on the CPU machines and on the GPU image) for markers
and version specifiers.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WHEELS_TXT = HERE / "wheels.txt"
IMAGE_TXT = HERE / "image_packages.txt"
MAX_CARRY_BYTES = 64 * 2**20  # the device tool's limit on what travels (tree + carried paths)
REPO_ALLOWANCE = 4 * 2**20  # left for the checkout itself (about 1.3 MB tracked today)

# Where the check's processes start (check.py runs these; the gpu-marked test files are added by gpu_test_files).
ENTRY_POINTS = [
    "fm_pretrain/train.py",
    "data_prep/train_tokenizer.py",
    "data_prep/pack.py",
    "bench/kernels.py",
    "bench/fm_sparse.py",
    "bench/decode.py",  # when present
    "scripts/gpu_check/check.py",
    "scripts/gpu_check/stage_tasks.py",
    "scripts/gpu_check/wheel_imports.py",
    "tests/conftest.py",
]
# First-party top-level packages and where they live.
FIRST_PARTY = {
    "fm_pretrain": REPO / "fm_pretrain",
    "fm_kernels": REPO / "kernels" / "fm_kernels",
    "data_prep": REPO / "data_prep",
    "tests": REPO / "tests",
}
LOCAL_SCRIPTS = {"check", "stage_tasks", "wheel_imports", "sitecustomize"}  # scripts/gpu_check/ itself

# Third-party imports the check's code contains but never executes, so neither the image nor the wheels need
# to provide them. Only lazy or optional imports may be listed here; the import trace of every check run
# (trace/sitecustomize.py, `classify`) shows whether any of them was imported after all.
NOT_NEEDED = {
    "mlflow": "tracking.enabled=false in every training stage; MLflow is imported only inside the tracker's MLflow run",
    "datasets": "readers.py imports it only for Hugging Face dataset inputs; the check packs a JSONL file",
    "zstandard": "readers.py imports it only for .zst inputs",
    "pyarrow": "readers.py imports it only for .parquet inputs (the image has pyarrow anyway)",
}

# Import name -> distribution, where they differ (the rest: importlib.metadata, then the name itself).
IMPORT_TO_DIST = {
    "yaml": "pyyaml",
    "megatron": "megatron-core",
    "fla": "fla-core",
    "cpuinfo": "py-cpuinfo",
    "pydantic_core": "pydantic-core",
    "typing_extensions": "typing-extensions",
    "google": "protobuf",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "pynvml": "nvidia-ml-py",
    "dateutil": "python-dateutil",
    "_yaml": "pyyaml",
    "attr": "attrs",
}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------------
# The static walk


@dataclass
class Found:
    module: str  # top-level import name
    where: str  # file:line
    how: str  # module | lazy | optional


def gpu_test_files() -> list[Path]:
    return sorted(p for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8"))


def module_file(name: str) -> Path | None:
    """The file of a first-party module (package __init__.py or module.py), None if it does not exist."""
    top, _, rest = name.partition(".")
    root = FIRST_PARTY.get(top)
    if root is None:
        return None
    path = root.joinpath(*rest.split(".")) if rest else root
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str | None:
    for top, root in FIRST_PARTY.items():
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        parts = [top, *rel.with_suffix("").parts]
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return None


def _tolerates_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = []
        if handler.type is None:
            return True
        for t in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
            names.append(t.id if isinstance(t, ast.Name) else getattr(t, "attr", ""))
        if {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names):
            return True
    return False


def imports_of(path: Path) -> list[tuple[str, int, str, list[str]]]:
    """(absolute module, line, how, imported names) for every import statement in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me = module_name(path) or ""
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[str, int, str, list[str]]] = []

    def visit(node: ast.AST, in_function: bool, in_try: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            tolerant = in_try or (isinstance(child, ast.Try) and _tolerates_import_error(child))
            how = "optional" if in_try else "lazy" if in_function else "module"
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, how, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".") if package else []
                    parts = parts[: len(parts) - (child.level - 1)] if child.level > 1 else parts
                    base = ".".join([*parts, base] if base else parts)
                out.append((base, child.lineno, how, [a.name for a in child.names]))
            if isinstance(child, ast.Try) and tolerant and not in_try:
                for part in child.body:  # the guarded body is optional, the handlers are not
                    visit(ast.Module(body=[part], type_ignores=[]), func, True)
                for part in [*child.handlers, *child.orelse, *child.finalbody]:
                    visit(part, func, in_try)
                continue
            visit(child, func, in_try)

    visit(tree, False, False)
    return out


def walk(entry_points: list[str] | None = None) -> list[Found]:
    """Every third-party import reachable from the entry points through first-party imports (any depth)."""
    files = [REPO / e for e in (entry_points or ENTRY_POINTS)] + gpu_test_files()
    todo = [f for f in files if f.is_file()]
    seen: set[Path] = set()
    found: dict[tuple[str, str], Found] = {}
    rank = {"module": 0, "lazy": 1, "optional": 2}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        name = module_name(path)
        if name:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            parts = name.split(".")
            todo += [f for i in range(1, len(parts)) if (f := module_file(".".join(parts[:i])))]
        for mod, line, how, names in imports_of(path):
            top = mod.split(".")[0]
            if not top or top == "__future__" or top in sys.stdlib_module_names or top in LOCAL_SCRIPTS:
                continue
            if top in FIRST_PARTY:
                todo += [f for f in [module_file(mod)] if f]
                todo += [f for n in names if (f := module_file(f"{mod}.{n}"))]  # from pkg import submodule
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            key = (top, how)
            if key not in found or rank[how] < rank[found[key].how]:
                found[key] = Found(top, where, how)
    return sorted(found.values(), key=lambda f: (f.module, rank[f.how]))


# ---------------------------------------------------------------------------------------------------------
# Distributions: the image's, the carried wheels'


def read_list(path: Path) -> dict[str, str | None]:
    """name[==version] per line (comments after #) -> {normalized name: version or None}."""
    out: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec = line.split()[0]
        name, _, version = spec.partition("==")
        out[normalize(name)] = version or None
    return out


def wheel_plan() -> list[dict]:
    """wheels.txt rows: {name, version, how: download|build, reason}."""
    rows = []
    for raw in WHEELS_TXT.read_text().splitlines():
        line, _, reason = raw.partition("#")
        if not line.strip():
            continue
        fields = line.split()
        name, _, version = fields[0].partition("==")
        rows.append({"name": normalize(name), "version": version, "how": fields[1] if len(fields) > 1 else "download"})
        rows[-1]["reason"] = reason.strip()
    return rows


def distribution_of(top: str) -> str:
    if top in IMPORT_TO_DIST:
        return IMPORT_TO_DIST[top]
    try:
        from importlib.metadata import packages_distributions

        dists = packages_distributions().get(top)
    except Exception:
        dists = None
    return normalize(dists[0]) if dists else normalize(top)


@dataclass
class Wheel:
    file: str
    name: str
    version: str
    size: int
    requires: list[str]


def read_wheels(directory: Path) -> list[Wheel]:
    wheels = []
    for path in sorted(directory.glob("*.whl")):
        with zipfile.ZipFile(path) as z:
            meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = z.read(meta_name).decode("utf-8", "replace")
        fields = {}
        requires = []
        for line in meta.split("\n\n", 1)[0].splitlines():
            key, _, value = line.partition(": ")
            if key == "Requires-Dist":
                requires.append(value.strip())
            elif key in ("Name", "Version"):
                fields[key] = value.strip()
        wheels.append(Wheel(path.name, normalize(fields["Name"]), fields["Version"], path.stat().st_size, requires))
    return wheels


TARGET_ENV = {  # the GPU image's interpreter, for evaluating Requires-Dist markers
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def check_wheels(directory: Path) -> dict:
    """The carried wheel set against wheels.txt, the size limit and the image (module docstring)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    plan = {row["name"]: row["version"] for row in wheel_plan()}
    image = read_list(IMAGE_TXT)
    wheels = read_wheels(directory)
    problems: list[str] = []
    notes: list[str] = []
    carried = {}
    for w in wheels:
        if w.name in carried:
            problems.append(f"two wheels of {w.name}: {carried[w.name].file}, {w.file} (pip refuses the set)")
        carried[w.name] = w
    for name, version in plan.items():
        if name not in carried:
            problems.append(f"{name}=={version} (wheels.txt) is missing from {directory}")
        elif carried[name].version != version:
            problems.append(f"{name}: wheels.txt pins {version}, {directory} holds {carried[name].version}")
    for name in carried:
        if name not in plan:
            problems.append(f"{carried[name].file} is not in wheels.txt (carried for nothing)")
    total = sum(w.size for w in wheels)
    if total > MAX_CARRY_BYTES - REPO_ALLOWANCE:
        problems.append(f"{total / 2**20:.1f} MiB of wheels: over the 64 MiB the device tool carries, with the repo")
    for w in wheels:
        for text in w.requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
                continue  # an extra, or another platform
            dep = normalize(req.name)
            if dep in carried:
                if req.specifier and Version(carried[dep].version) not in req.specifier:
                    problems.append(f"{w.name} needs {req}, carried {dep}=={carried[dep].version}")
            elif dep in image:
                known = image[dep]
                if known and req.specifier and Version(known) not in req.specifier:
                    problems.append(f"{w.name} needs {req}, the image has {dep}=={known}")
                elif req.specifier and not known:
                    notes.append(f"{w.name} needs {req}: the image has {dep}, version not recorded")
            else:
                problems.append(f"{w.name} needs {req}: neither carried nor on the image")
    return {
        "wheels": [asdict(w) | {"requires": None} for w in wheels],
        "total_bytes": total,
        "problems": problems,
        "unverified_versions": notes,
    }


def coverage(found: list[Found], covered: set[str]) -> tuple[list[str], list[str]]:
    """(problems, excused): imports that run but neither the image nor the wheels provide; NOT_NEEDED ones."""
    problems, excused = [], []
    for f in found:
        dist = distribution_of(f.module)
        if dist in covered:
            continue
        if f.module in NOT_NEEDED and f.how != "module":
            excused.append(f"{f.module} ({f.how}, {f.where}): {NOT_NEEDED[f.module]}")
        elif f.how == "optional":
            excused.append(f"{f.module} ({f.how}, {f.where}): guarded by try/except ImportError")
        else:
            problems.append(f"{f.module} -> {dist} ({f.how} import at {f.where}): not on the image, not in wheels.txt")
    return problems, excused


# ---------------------------------------------------------------------------------------------------------
# Where the check runs


def verify() -> dict:
    """Import every third-party module the check needs (module-level and lazy imports, not NOT_NEEDED); versions;
    carried wheels' requirements against what is installed."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    found = [f for f in walk() if f.module not in NOT_NEEDED]
    optional = {f.module for f in found} - {f.module for f in found if f.how != "optional"}
    result: dict = {"imported": {}, "failed": {}, "optional_missing": {}, "unmet": []}
    for top in sorted({f.module for f in found}):
        try:
            importlib.import_module(top)
        except Exception as e:  # report every failure, not just the first
            where = "optional_missing" if top in optional else "failed"
            result[where][top] = f"{type(e).__name__}: {e}"[:300]
            continue
        dist = distribution_of(top)
        try:
            result["imported"][top] = f"{dist} {version(dist)}"
        except PackageNotFoundError:
            result["imported"][top] = dist
    from packaging.requirements import Requirement

    for row in wheel_plan():
        try:
            from importlib.metadata import requires

            reqs = requires(row["name"]) or []
        except PackageNotFoundError:
            result["unmet"].append(f"{row['name']}: not installed")
            continue
        for text in reqs:
            req = Requirement(text)
            env = {**TARGET_ENV, "python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            try:
                have = version(req.name)
            except PackageNotFoundError:
                result["unmet"].append(f"{row['name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                result["unmet"].append(f"{row['name']} needs {req}, installed {have}")
    return result


def first_party_importer(importer: str) -> bool:
    """Is this importer (a module name, or a script's path for __main__) this repository's code?"""
    if importer.endswith(".py"):
        path = Path(importer)
        return not path.is_absolute() or REPO in path.resolve().parents
    return importer.split(".")[0] in FIRST_PARTY or importer.split(".")[0] in LOCAL_SCRIPTS


def classify(trace_dir: Path) -> dict:
    """Third-party distributions imported by the processes of a check run: on the image, carried, or neither.

    One on neither is a `problem` when this repository's code imported it directly; when a third-party package
    did (an optional import of a package that is installed where the trace was taken, such as DeepSpeed's
    autotuner trying mlflow), it is `transitive`: the GPU image's packages decide on their own.
    """
    modules: set[str] = set()
    importers: dict[str, str] = {}
    processes = 0
    for path in sorted(trace_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        processes += 1
        modules |= set(record.get("modules", []))
        for name, who in record.get("importers", {}).items():
            if first_party_importer(who) or name not in importers:
                importers[name] = who  # a first-party importer anywhere wins
    image, carried = read_list(IMAGE_TXT), {row["name"] for row in wheel_plan()}
    dists: dict[str, str] = {}
    problems, transitive = [], []
    for top in sorted(modules):
        if top in sys.stdlib_module_names or top in FIRST_PARTY or top in LOCAL_SCRIPTS or top.startswith("_"):
            continue
        dist = distribution_of(top)
        where = "image" if dist in image else "carried" if dist in carried else "neither"
        dists[dist] = where
        if where == "neither":
            who = importers.get(top, "?")
            entry = f"{top} ({dist}), first imported by {who}"
            (problems if who == "?" or first_party_importer(who) else transitive).append(entry)
    return {
        "processes": processes,
        "distributions": dists,
        "problems": problems,
        "transitive": transitive,
        # NOT_NEEDED says this repository's code never runs these imports in a check: true if none has a
        # first-party importer (other packages may still import them, optionally, where they are installed)
        "not_needed_but_imported": sorted(
            m for m in NOT_NEEDED if m in modules and first_party_importer(importers.get(m, "?"))
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("walk")
    w = sub.add_parser("wheels")
    w.add_argument("--dir", type=Path, default=REPO / ".whl")
    sub.add_parser("verify")
    c = sub.add_parser("classify")
    c.add_argument("trace_dir", type=Path)
    args = ap.parse_args(argv)

    if args.what == "walk":
        found = walk()
        covered = set(read_list(IMAGE_TXT)) | {row["name"] for row in wheel_plan()}
        problems, excused = coverage(found, covered)
        for f in found:
            print(f"{f.module:20s} {distribution_of(f.module):22s} {f.how:9s} {f.where}")
        print(json.dumps({"problems": problems, "excused": excused}, indent=1))
        return 1 if problems else 0
    if args.what == "wheels":
        report = check_wheels(args.dir)
        print(json.dumps(report, indent=1))
        return 1 if report["problems"] else 0
    if args.what == "verify":
        report = verify()
        print(json.dumps(report))
        return 1 if report["failed"] else 0
    report = classify(args.trace_dir)
    print(json.dumps(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
