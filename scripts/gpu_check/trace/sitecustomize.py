"""Import tracer of the GPU check (scripts/gpu_check/check.py puts this folder first on PYTHONPATH).

With FM_GPU_CHECK_TRACE=DIR set, every Python process of a check run (the trainer's launcher and ranks, pytest,
the benchmarks, the data tools) writes, at exit, DIR/<pid>.json: the top-level names of the modules it imported
from files, and for each the module whose code imported it first (its "importer"). `wheel_imports.py
classify DIR` maps them to distributions and says whether the GPU image or the carried wheels provide each.
Without the variable this module does nothing but hand over to the interpreter's own sitecustomize, which it
shadows.
"""

import atexit
import contextlib
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


class _FirstImporter:
    """A meta-path finder that finds nothing: it notes who asks first for each top-level module."""

    def __init__(self) -> None:
        self.importers: dict[str, str] = {}

    def find_spec(self, name, path=None, target=None):
        if "." not in name and name not in self.importers:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                frame = frame.f_back
            if frame is not None:
                g = frame.f_globals
                who = g.get("__name__", "?")
                self.importers[name] = g.get("__file__", who) if who == "__main__" else who
        return None


def _dump(out_dir: str, finder: _FirstImporter) -> None:
    try:
        names = set()
        for name, module in list(sys.modules.items()):
            top = name.split(".", 1)[0]
            if getattr(module, "__file__", None) or getattr(module, "__path__", None):
                names.add(top)
        record = {
            "pid": os.getpid(),
            "argv": sys.argv[:6],
            "modules": sorted(names),
            "importers": {n: finder.importers[n] for n in sorted(names) if n in finder.importers},
        }
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump(record, f)
    except Exception:  # a tracer must never change how a process ends
        pass


def _chain() -> None:
    """Run the next sitecustomize.py on sys.path (e.g. the distribution's own), as Python would have."""
    import importlib.util

    for entry in sys.path:
        if not entry or os.path.abspath(entry) == _HERE:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_fm_gpu_check_chained_sitecustomize", candidate)
            if spec and spec.loader:
                with contextlib.suppress(Exception):
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if os.environ.get("FM_GPU_CHECK_TRACE"):
    _finder = _FirstImporter()
    sys.meta_path.insert(0, _finder)
    atexit.register(_dump, os.environ["FM_GPU_CHECK_TRACE"], _finder)
_chain()
