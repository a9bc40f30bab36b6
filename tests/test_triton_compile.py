"""Every Triton kernel, at every block configuration its launcher uses for the shapes the
tests, the model and the benchmarks run, compiles for sm_90 (H100) -- without a GPU.

The interpreter lets through what the compiler would refuse (dot shapes, shared memory,
unsupported ops), so this runs in a subprocess without TRITON_INTERPRET (the interpreter
patches triton.language in the process that set it)."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch
from umae.kernels import _util, random_masking, restore_tokens, uniformity
{extra_imports}
DT = [torch.float32, torch.bfloat16, torch.float16]
n, seen = 0, set()
for mod, shapes in {targets}:
    for fn, sig, consts, warps in mod.aot_specs(shapes, DT):
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), warps)
        if key in seen:
            continue
        seen.add(key)
        k = _util.compile_sm90(fn, sig, consts, num_warps=warps)
        assert "cubin" in k.asm and k.metadata.shared <= 227 * 1024, (fn.__name__, consts, k.metadata.shared)
        n += 1
print("compiled", n)
"""

# (L, D) the masking/restore kernels see: test shapes, ViT configs (patch tokens, decoder dims).
MASKING_SHAPES = [(49, 64), (196, 768), (197, 384), (256, 192), (1024, 1000), (64, 192), (196, 512), (64, 128),
                  (256, 1024)]


def _run(targets, extra_imports=""):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = SCRIPT.format(targets=targets, extra_imports=extra_imports)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r.stdout


def test_masking_and_restore_kernels_compile_for_sm90():
    out = _run(f"[(random_masking, {MASKING_SHAPES}), (restore_tokens, {MASKING_SHAPES})]")
    assert "compiled" in out


def test_uniformity_kernels_compile_for_sm90_with_tensor_cores():
    out = _run("[(uniformity, [])]")
    assert "compiled" in out
