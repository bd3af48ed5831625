"""Compile every Triton kernel for a CUDA GPU on a machine without one, and report its resources.

The interpreter (TRITON_INTERPRET=1, what the CPU tests use) runs kernels as NumPy and accepts programs the
GPU compiler rejects (tl.dot tiles under 16, unsupported casts, shared memory past the chip's limit). This
tool runs the real host wrappers, forward and backward, on CPU tensors, but routes every kernel launch to
Triton's CUDA compiler for the chosen architecture (sm_90 = H100/H200 by default) instead of a launch:
Triton lowers to PTX and the ptxas bundled in its wheel assembles the cubin, so no driver or GPU is needed.
Each compiled kernel is then measured with the bundled cuobjdump (registers, spills) and Triton's metadata
(shared memory), and checked against the architecture's per-block limits.

    python -m fm_kernels.compile_check                 # the production shapes (m in 64..1024, bf16 and fp32)
    python -m fm_kernels.compile_check --quick         # one shape per kernel family (what CI runs)
    PYTHONPATH=/path/to/triton-3.6 python -m fm_kernels.compile_check   # another Triton version

Must run with TRITON_INTERPRET unset: `triton.jit` picks the interpreter when the kernel module is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Per-block limits by compute capability (CUDA programming guide, "Compute capabilities" table).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGISTERS_PER_THREAD = 255


@dataclass
class KernelReport:
    kernel: str
    case: str
    constexprs: dict
    pointer_types: str  # element types of the pointer arguments, e.g. "bf16 fp32 i32"
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int
    spill_bytes: int  # local memory per thread (register spills and local arrays)
    problems: list[str] = field(default_factory=list)


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names a device, a stream and the target; launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path}: this Triton wheel has no bundled cuobjdump (is it a CUDA build?)")
    return str(path)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread) of the cubin's kernel, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {out.stderr.strip()}")
    reg = re.search(r"REG:(\d+)", out.stdout)
    local = re.search(r"LOCAL:(\d+)", out.stdout)
    if reg is None or local is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out.stdout}")
    return int(reg.group(1)), int(local.group(1))


class CompileRecorder:
    """Context manager: every JIT kernel launch inside compiles for `arch` and is recorded, not run."""

    def __init__(self, arch: int = 90):
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
        self.arch = arch
        self.case = ""
        self.reports: list[KernelReport] = []
        self._seen: set[tuple] = set()

    def __enter__(self):
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        self._driver, self._JITFunction = driver, JITFunction
        self._original_run = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = recorder._original_run(fn, *args, grid=grid, warmup=True, **kwargs)
            recorder._record(fn, kernel)
            return kernel

        self._previous_driver = driver._active  # None until Triton first needs one (none exists without a GPU)
        driver.set_active(_CompileOnlyDriver(self.arch))
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        self._JITFunction.run = self._original_run
        self._driver._active = self._previous_driver
        return False

    def _record(self, fn, kernel) -> None:
        meta = kernel.metadata
        constexprs = {_param_name(fn, k): _plain(v) for k, v in getattr(kernel.src, "constants", {}).items()}
        signature = getattr(kernel.src, "signature", {})
        pointers = " ".join(sorted({str(t)[1:] for t in signature.values() if str(t).startswith("*")}))
        key = (fn.__name__, pointers, json.dumps(constexprs, sort_keys=True, default=str))
        if key in self._seen:
            return
        self._seen.add(key)
        regs, local = _resource_usage(kernel.asm["cubin"])
        report = KernelReport(
            fn.__name__, self.case, constexprs, pointers, meta.num_warps, meta.num_stages, meta.shared, regs, local
        )
        limit = SHARED_MEMORY_LIMIT.get(self.arch)
        if limit is not None and meta.shared > limit:
            report.problems.append(f"shared memory {meta.shared} B > sm_{self.arch} limit {limit} B")
        if regs > MAX_REGISTERS_PER_THREAD:
            report.problems.append(f"{regs} registers per thread > {MAX_REGISTERS_PER_THREAD}")
        self.reports.append(report)


def _param_name(fn, path) -> str:
    """The kernel parameter a constexpr belongs to (Triton keys them by argument position)."""
    index = path[0] if isinstance(path, tuple) else path
    return fn.arg_names[index] if isinstance(index, int) and index < len(fn.arg_names) else str(path)


def _variant(constexprs: dict) -> str:
    """Short label of a specialization: tile sizes and the flags that are on (ACC dtypes and K/V left out)."""
    parts = [f"{k}={v}" for k, v in constexprs.items() if k.startswith("B") and isinstance(v, int) and v is not True]
    parts += [k for k, v in constexprs.items() if v is True]
    return " ".join(parts)


def _plain(v):
    v = getattr(v, "value", v)
    return v if isinstance(v, (bool, int, float, str)) else str(v)


# ---------------------------------------------------------------- the cases: every kernel, as the model calls it


def _gated_case(m: int, d_mem: int, dtype: torch.dtype, scalar: bool, chunk: int = 64) -> None:
    """Dense chunked recurrence, forward and backward, with documents, initial state and final-state gradient."""
    from .gated.chunk_triton import triton_gated_recurrence

    B, H, T = 1, 1, 2 * chunk + 5  # T is a runtime argument: two chunks and a ragged tail reach every branch
    q, k = (torch.zeros(B, H, T, m, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.zeros(B, H, T, d_mem, dtype=dtype, requires_grad=True)
    g = torch.zeros(*((B, H, T) if scalar else (B, H, T, m)), dtype=torch.float32, requires_grad=True)
    doc_ids = torch.zeros(B, T, dtype=torch.int64)
    for h0 in (None, torch.zeros(B, H, m, d_mem, requires_grad=True)):
        o, ht = triton_gated_recurrence(
            q=q, k=k, v=v, g=g, doc_ids=doc_ids, initial_state=h0, output_final_state=True, chunk_size=chunk
        )
        (o.float().sum() + ht.sum()).backward()
        o, _ = triton_gated_recurrence(
            q=q, k=k, v=v, g=g, doc_ids=None, initial_state=h0, output_final_state=False, chunk_size=chunk
        )
        o.float().sum().backward()


def _sparse_case(m: int, top_k: int, d_mem: int, dtype: torch.dtype) -> None:
    """Sparse training kernels (segmented scan over routed pairs), forward and backward, every flag."""
    from .fm.sparse_triton import sparse_fm_triton

    B, H, T = 1, 1, 37
    rows = torch.stack([torch.randperm(m)[:top_k] for _ in range(T)]).view(B, H, T, top_k)
    theta, phi = (torch.zeros(B, H, T, top_k, dtype=dtype, requires_grad=True) for _ in range(2))
    x = torch.zeros(B, H, T, d_mem, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(B, H, m, d_mem, dtype=torch.float32, requires_grad=True)
    for init, final in ((None, False), (h0, True)):
        r, ht = sparse_fm_triton(
            rows=rows, theta_k=theta, phi_k=phi, xbar=x, n_memories=m, initial_state=init, output_final_state=final
        )
        loss = r.float().sum() + (ht.sum() if ht is not None else 0)
        loss.backward()
    with torch.no_grad():  # inference: no checkpoints stored
        sparse_fm_triton(rows=rows, theta_k=theta, phi_k=phi, xbar=x, n_memories=m)


def _decode_case(m: int, top_k: int, d_mem: int, dtype: torch.dtype) -> None:
    from .fm.step_triton import fm_step_sparse_triton

    B, H = 2, 2
    rows = torch.stack([torch.randperm(m)[:top_k] for _ in range(B * H)]).view(B, H, top_k)
    state = torch.zeros(B, H, m, d_mem, dtype=dtype)
    th, ph = torch.zeros(B, H, top_k, dtype=dtype), torch.zeros(B, H, top_k, dtype=dtype)
    fm_step_sparse_triton(state=state, rows=rows, theta_k=th, phi_k=ph, xbar=torch.zeros(B, H, d_mem, dtype=dtype))


def cases(quick: bool):
    """(name, thunk) for every configuration to compile; quick = one per kernel family and flag set."""
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    ms = (128,) if quick else (64, 128, 256, 1024)
    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        for m in ms:
            yield f"fm dense m={m} d_mem=128 {name}", lambda m=m, dt=dt: _gated_case(m, 128, dt, scalar=False)
        # Mamba-2 through the same kernels: keys = d_state, values = head dim, one decay per head
        yield f"mamba2 d_state=128 headdim=64 {name}", lambda dt=dt: _gated_case(128, 64, dt, scalar=True)
        sparse = ((128, 16),) if quick else ((64, 1), (256, 64), (1024, 4), (1024, 1024))
        for m, k in sparse:
            yield f"fm sparse m={m} k={k} {name}", lambda m=m, k=k, dt=dt: _sparse_case(m, k, 128, dt)
            yield f"fm decode m={m} k={k} {name}", lambda m=m, k=k, dt=dt: _decode_case(m, k, 128, dt)


def run(arch: int = 90, quick: bool = False, progress: bool = True) -> list[KernelReport]:
    from tqdm import tqdm

    todo = list(cases(quick))
    with CompileRecorder(arch) as rec:
        for name, thunk in tqdm(todo, desc=f"compiling for sm_{arch}", disable=not progress):
            rec.case = name
            thunk()
    return rec.reports


def format_table(reports: list[KernelReport]) -> str:
    head = "| kernel | case | specialization | pointers | warps | stages | shared KiB | regs | spill B | problems |"
    lines = [head, "|" + "---|" * 10]
    for r in reports:
        lines.append(
            f"| {r.kernel} | {r.case} | {_variant(r.constexprs)} | {r.pointer_types} | {r.num_warps} | "
            f"{r.num_stages} | {r.shared_bytes / 1024:.1f} | {r.registers} | {r.spill_bytes} | "
            f"{'; '.join(r.problems) or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import triton

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    p.add_argument("--quick", action="store_true", help="one shape per kernel family")
    p.add_argument("--json", type=Path, help="also write the reports as JSON here")
    args = p.parse_args(argv)
    reports = run(args.arch, args.quick)
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(reports)} kernel specializations compiled")
    print(format_table(reports))
    if args.json:
        payload = {"triton": triton.__version__, "arch": args.arch, "reports": [asdict(r) for r in reports]}
        args.json.write_text(json.dumps(payload, indent=1))
    bad = [r for r in reports if r.problems]
    for r in bad:
        print(f"PROBLEM {r.kernel} ({r.case}): {'; '.join(r.problems)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
