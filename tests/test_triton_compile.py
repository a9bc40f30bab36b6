"""Every Triton kernel of every registered op compiles for sm_90 (H100), without a GPU, exactly
as Triton's JIT would compile it for the launches its launchers make at the benchmark shapes, the
test token shapes (contiguous and strided) and each model's training step: the launches are
recorded, not run, and specialized by Triton's own binder (umae.verify.jit).

The interpreter lets through what the compiler would refuse (dot shapes, shared memory,
unsupported ops), so this runs in a subprocess without TRITON_INTERPRET (the interpreter
patches triton.language in the process that set it)."""
import json
import os
import subprocess
import sys

import pytest
from umae_testing import HANG_GUARD

from umae.ops import registry

SCRIPT = r"""
import json
from umae.ops import registry
from umae.verify import audit, jit
ops = {ops!r}
owners = {{}}  # an op and its inverse share a kernel module: each kernel counts for both
for o in ops:
    for f in jit.kernels_of(registry.get(o).kernels):
        owners.setdefault(f, []).append(o)
specs, bad, compiled = [], [], dict.fromkeys(ops, 0)
# one pass records every op's launches (the models run all of them), then each specialization compiles once
for key, k, src in jit.compile_all(jit.collect_launches(ops)):
    assert "cubin" in k.asm, key
    for o in owners[src.fn]:
        compiled[o] += 1
    op = owners[src.fn][0]
    if "D" in src.fn.arg_names:  # the token kernels' feature rows
        specs.append(key[1])
    row = audit.audit(k, src)
    lab = jit.label(src)  # half inputs go to the tensor cores on the GPU (not the interpreter's fp32 dot)
    if "DOT_DTYPE=" in lab and lab.split("/")[0] in ("bf16", "fp16"):
        assert ("DOT_DTYPE=1" if lab.startswith("bf16") else "DOT_DTYPE=2") in lab, lab
    bad += [f"{{op}}: {{row['name']}} {{jit.label(src)}}: {{p}}" for p in audit.problems(row, op)]
# what a hand-written signature never compiled: unit strides as constants, 16-divisible pointers
assert any("('constexpr', 1)" in s for s in specs) and all("'D')" in s for s in specs), specs[:3]
print("problems", json.dumps(bad))
print("compiled", json.dumps(compiled))
"""

TRITON_OPS = [name for name, op in registry.OPS.items() if op.kernels]


@pytest.mark.gpucheck
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(ops=TRITON_OPS)], capture_output=True, text=True, env=env,
                       timeout=HANG_GUARD)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    compiled = json.loads(r.stdout.split("compiled")[1].split("\n")[0])
    assert set(compiled) == set(TRITON_OPS) and all(n > 0 for n in compiled.values()), compiled
    # the static audit (umae.verify.audit.problems): no spills, shared memory within the H100's
    # limit, >= 25% occupancy, 128-bit tile accesses in the memory-bound kernels where the
    # specialization allows them (bench/NOTES.md, "Static audit")
    problems = json.loads(r.stdout.split("problems")[1].split("\n")[0])
    assert not problems, "\n".join(problems)


def test_audit_arithmetic():
    from umae.verify import audit

    assert audit.occupancy(regs=32, warps=4, smem=0) == (16, 1.0)  # warp slots bound
    assert audit.occupancy(regs=255, warps=4, smem=0) == (2, 0.125)  # 256 regs/thread: 2 blocks
    assert audit.occupancy(regs=64, warps=4, smem=100 * 1024)[0] == 2  # shared memory bound
    ttgir = ('#loc3 = loc("/x/restore_tokens.py":40:9)\n#loc9 = loc("v"(#loc3))\n'
             '%v = tt.load %p, %m : tensor<16x64x!tt.ptr<f32>, #blocked> loc(#loc9)\n'
             '%t = tt.load %q, %m : tensor<64x!tt.ptr<f32>, #blocked1> loc(#loc3)\n')
    tiles = audit.tile_lines(ttgir)
    assert tiles == {("restore_tokens.py", 40)}
    ptx = (".loc 1 3 5 // restore_tokens.py:3:5\nld.global.b32 a, [y];\n"
           ".loc 1 40 9 // restore_tokens.py:40:9\nld.global.v4.b32 {a,b,c,d}, [x];\n"
           "@%p1 st.global.L1::evict_first.v2.b16 [z], {a,b};")
    assert audit.memory_ops(ptx, tiles) == dict(ld_vec=1, ld_scalar=1, st_vec=1, st_scalar=0, tile_accesses=2,
                                                 tile_narrow=1)
    good = dict(spill_stores=0, spill_loads=0, smem=1024, occupancy=0.5, vec_ok=True, tile_accesses=4, tile_narrow=0)
    assert audit.problems(good, "restore_tokens") == []
    for change, word in ((dict(spill_loads=8), "spills"), (dict(occupancy=0.19), "occupancy"),
                         (dict(smem=300 * 1024), "shared"), (dict(tile_narrow=1), "128-bit")):
        assert word in " ".join(audit.problems(dict(good, **change), "restore_tokens")), change
    assert audit.problems(dict(good, tile_narrow=1, vec_ok=False), "restore_tokens") == []  # strided: scalar is right
    assert audit.problems(dict(good, tile_narrow=1), "uniformity_loss") == []  # not held to 128-bit


def test_every_launch_is_device_guarded(monkeypatch):
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

    class _T:  # a cuda:1 tensor, without a GPU
        device, is_cuda = torch.device("cuda", 1), True

        def get_device(self):
            return 1

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = on_device(_T())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # its device is current: no switch
    assert not isinstance(on_device(_T()), torch.cuda.device)
