"""Every Triton kernel compiles for the H100/H200 (sm_90) with Triton's real CUDA compiler, on this GPU-less machine.

The interpreter tests prove the arithmetic; these prove the GPU compiler accepts the programs (tl.dot tile
minimums, casts, shared memory within the chip's limit). They run in a subprocess with TRITON_INTERPRET
unset, because `triton.jit` reads it when a kernel module is imported.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _run_without_interpreter(code: str, tmp_path, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compile for real, not from an earlier run's cache
    script = tmp_path / "script.py"  # triton.jit needs its kernels in a file
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)


def test_all_kernel_families_compile_for_sm90(tmp_path):
    out = tmp_path / "reports.json"
    proc = _run_without_interpreter(
        f"""
        import sys
        from fm_kernels.compile_check import main
        sys.exit(main(["--quick", "--arch", "90", "--json", {str(out)!r}]))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = json.loads(out.read_text())["reports"]
    compiled = {r["kernel"] for r in reports}
    expected = {
        "chunk_cumsum_kernel", "fwd_state_kernel", "fwd_intra_kernel", "fwd_out_kernel", "bwd_state_kernel",
        "bwd_dv_kernel", "bwd_inter_kernel", "bwd_intra_kernel",
        "_sparse_fm_fwd_kernel", "_sparse_fm_bwd_kernel", "_fm_decode_sparse_kernel",
    }  # fmt: skip
    assert compiled == expected
    # every flag combination the wrappers use was reached (initial state, final-state gradient, reverse cumsum)
    flags = {(r["kernel"], k) for r in reports for k, v in r["constexprs"].items() if v is True}
    for needed in [
        ("fwd_state_kernel", "HAS_H0"), ("bwd_state_kernel", "HAS_DHT"), ("chunk_cumsum_kernel", "REVERSE"),
        ("_sparse_fm_fwd_kernel", "HAS_H0"), ("_sparse_fm_fwd_kernel", "STORE_HT"),
        ("_sparse_fm_fwd_kernel", "STORE_CKPT"), ("_sparse_fm_bwd_kernel", "HAS_DHT"),
    ]:  # fmt: skip
        assert needed in flags, needed
    for r in reports:
        assert r["registers"] > 0 and r["problems"] == [], r


SMALL_DOT = """
import torch, triton, triton.language as tl

@triton.jit
def small_dot(a, b, c, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(a + r[:, None] * N + r[None, :])
    y = tl.load(b + r[:, None] * N + r[None, :])
    tl.store(c + r[:, None] * N + r[None, :], tl.dot(x, y))
"""


def test_interpreter_runs_an_8x8_dot(tmp_path):
    """The premise of the negative control below: the interpreter (what the CPU tests use) accepts this kernel."""
    proc = _run_without_interpreter(
        SMALL_DOT
        + """
a = torch.randn(8, 8)
c = torch.empty(8, 8)
small_dot[(1,)](a, a, c, 8)
print("MATCH", torch.allclose(c, a @ a, atol=1e-5))
""",
        tmp_path,
        interpret=True,
    )
    assert "MATCH True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_compile_check_rejects_what_only_the_interpreter_accepts(tmp_path):
    """Negative control: the 8x8 tl.dot that the interpreter runs is refused by sm_90's compiler, and an
    oversized tile is flagged for shared memory past the chip's limit."""
    proc = _run_without_interpreter(
        SMALL_DOT
        + """
from fm_kernels.compile_check import CompileRecorder

@triton.jit
def big_tiles(a, c, N: tl.constexpr):
    r = tl.arange(0, N)
    x = tl.load(a + r[:, None] * N + r[None, :])
    tl.store(c + r[:, None] * N + r[None, :], tl.dot(x, tl.trans(x)))

with CompileRecorder(90) as rec:
    t = torch.zeros(8, 8, dtype=torch.float16)
    try:
        small_dot[(1,)](t, t, t, 8)
        print("SMALL_DOT_COMPILED")
    except Exception as e:
        print("SMALL_DOT_REJECTED", type(e).__name__)
    big = torch.zeros(256, 256, dtype=torch.float32)  # fp32 operand tiles: 256 KiB of shared memory
    big_tiles[(1,)](big, big, 256)
print("BIG", rec.reports[-1].kernel, rec.reports[-1].problems)
""",
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMALL_DOT_REJECTED" in proc.stdout, proc.stdout
    assert "BIG big_tiles ['shared memory" in proc.stdout, proc.stdout
