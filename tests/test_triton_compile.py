"""Every Triton kernel of every registered op, at every block configuration its launcher uses
for the shapes the tests, the model and the benchmarks run (the registry's `aot_shapes`),
compiles for sm_90 (H100) -- without a GPU.

The interpreter lets through what the compiler would refuse (dot shapes, shared memory,
unsupported ops), so this runs in a subprocess without TRITON_INTERPRET (the interpreter
patches triton.language in the process that set it)."""
import os
import subprocess
import sys

import pytest

from umae import registry

SCRIPT = r"""
import torch
from umae import registry
from umae.kernels import _util
DT = [torch.float32, torch.bfloat16, torch.float16]
op = registry.get({op!r})
n, seen = 0, set()
for fn, sig, consts, warps in op.kernel_module().aot_specs(op.aot_shapes, DT):
    key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), warps)
    if key in seen:
        continue
    seen.add(key)
    k = _util.compile_sm90(fn, sig, consts, num_warps=warps)
    assert "cubin" in k.asm and k.metadata.shared <= 227 * 1024, (fn.__name__, consts, k.metadata.shared)
    n += 1
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
