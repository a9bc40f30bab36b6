"""Every Triton kernel of every registered op compiles for sm_90 (H100), without a GPU, exactly
as Triton's JIT would compile it for the launches its launchers make at the benchmark shapes, the
test token shapes (contiguous and strided) and each model's training step: the launches are
recorded, not run, and specialized by Triton's own binder (umae.kernels._jit).

The interpreter lets through what the compiler would refuse (dot shapes, shared memory,
unsupported ops), so this runs in a subprocess without TRITON_INTERPRET (the interpreter
patches triton.language in the process that set it)."""
import os
import subprocess
import sys

import pytest

from umae import registry

SCRIPT = r"""
import json
from umae.kernels import _audit, _jit
n, specs, rows = 0, [], []
for key, k, label in _jit.compile_all(_jit.collect_launches({op!r})):
    assert "cubin" in k.asm and k.metadata.shared <= _audit.H100["max_smem_block"], (key, k.metadata.shared)
    n, specs = n + 1, specs + [key[1]]
    rows.append(dict(_audit.audit(k), spec=label))
# what a hand-written signature never compiled: unit strides as constants, 16-divisible pointers
assert any("('constexpr', 1)" in s for s in specs) and all("'D')" in s for s in specs), specs[:3]
print("audit", json.dumps(dict(spills=sum(r["spill_stores"] > 0 for r in rows),
                              below_25pct=sum(r["occupancy"] < 0.25 for r in rows),
                              no_vector_loads=sum(r["ld_vec"] == 0 for r in rows))))
print("compiled", n)
"""

TRITON_OPS = [name for name, op in registry.OPS.items() if op.kernels]


@pytest.mark.parametrize("op", TRITON_OPS)
def test_kernels_compile_for_sm90(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(op=op)], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert int(r.stdout.split("compiled")[1]) > 0
    # the audit's counts (issue 12: no spills, >= 25% occupancy, 128-bit accesses) are printed, not
    # yet asserted: the block sizes are still to tune (bench/NOTES.md, "Static audit")
    print(op, r.stdout.split("audit")[1].split("\n")[0])


def test_audit_arithmetic():
    from umae.kernels import _audit

    assert _audit.occupancy(regs=32, warps=4, smem=0) == (16, 1.0)  # warp slots bound
    assert _audit.occupancy(regs=255, warps=4, smem=0) == (2, 0.125)  # 256 regs/thread: 2 blocks
    assert _audit.occupancy(regs=64, warps=4, smem=100 * 1024)[0] == 2  # shared memory bound
    ptx = "ld.global.v4.b32 {a,b,c,d}, [x];\nld.global.b32 a, [y];\nst.global.v2.b16 [z], {a,b};"
    assert _audit.memory_ops(ptx) == dict(ld_vec=1, ld_scalar=1, st_vec=1, st_scalar=0)


def test_every_launch_is_device_guarded():
    # Triton launches on the current CUDA device: each launch must sit in `with on_device(t)`,
    # or a tensor on cuda:1 is launched on GPU 0 with GPU 1 pointers
    import ast
    import pathlib

    import torch

    from umae.kernels._util import on_device

    launches = 0
    for path in sorted(pathlib.Path(__file__).parent.parent.joinpath("kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call) and
                                                  getattr(i.context_expr.func, "id", "") == "on_device"
                                                  for i in node.items):
                guarded |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(tree):  # kernel[grid](...)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    getattr(node.func.value, "id", "").endswith("_kernel"):
                launches += 1
                assert id(node) in guarded, f"{path.name}:{node.lineno}: launch without `with on_device(...)`"
    assert launches >= 6
    guard = on_device(torch.empty(0, device="meta").new_empty(0).to("meta"))  # not CUDA: no guard
    assert not isinstance(guard, torch.cuda.device)

    class _T:  # a cuda:1 tensor's device, without a GPU
        device = torch.device("cuda", 1)

    guard = on_device(_T())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
