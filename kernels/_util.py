"""Helpers shared by the Triton kernels and their launchers.

kernels/ is installed as `umae.kernels` (the link umae/kernels) and is a namespace package (no
__init__.py): in a process whose sys.path holds the repo root it would also be a top-level
`kernels`, PyPI's name (transformers imports that package when it is installed), and a regular
package found anywhere on sys.path wins over a namespace portion, so PyPI's is what `import kernels`
finds. One op per file; each holds its @triton.jit kernels and their launchers, which pick block sizes
by a rule (no autotuning, so the interpreter runs what the GPU would); the token ops' launchers write
outputs their op module allocates (by the shape rule its fake uses too). Nothing here imports umae: the
kernels are the bottom layer.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# Decided at import, so a compile check (a process without the interpreter) compiles the GPU branch;
# umae.ops._common.triton_interpreted reads the same variable at each use, to pick the implementation.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def _interpreter_index_fix():
    """Triton 3.6's interpreter turns a scalar kernel argument into an index (`range(0, L, BLOCK)`)
    with int() of its 1-element array, an error since numpy 2.4 ('only 0-dimensional arrays can
    be converted to Python scalars'); 3.8's squeezes the array first. That fix, for interpreters
    without it (the interpreter runs only CPU tests: TRITON_INTERPRET=1)."""
    import inspect

    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "umae_fix", False) or "squeeze()" in inspect.getsource(patch_tensor):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.umae_fix = True
    interpreter._patch_lang_tensor = patched



H100_SM_COUNT = 132  # the target GPU's, where no GPU is visible (the interpreter, compile checks)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of `device`'s GPU; the H100's where none is visible."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return H100_SM_COUNT


_NO_GUARD = contextlib.nullcontext()


_fixed = False


def on_device(t: torch.Tensor):
    """The device guard every launch needs: Triton launches on the current CUDA device, so a tensor
    on cuda:1 needs cuda:1 current (`umae train --device cuda:1` does not make it so). None where it
    is current already (the common case: a guard's two device switches cost more than the check).
    Under the interpreter the first launch applies its fix (_interpreter_index_fix): where
    interpretation runs, not at import."""
    global _fixed
    if INTERPRETED.value and not _fixed:
        _interpreter_index_fix()
        _fixed = True
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(t.device)


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def tile_warps(rows: int, block_d: int) -> int:
    """Warps for the token kernels' [rows, block_d] tiles: 8 elements per thread where the tile
    allows, so one 16-byte access covers 8 bf16/fp16 (two cover 4 fp32 each) of a row, and no
    more (an fp32 16 x 128 tile at 8 warps stays under 64 registers: >= 50% occupancy on an H100)."""
    return 8 if rows * block_d >= 8 * 256 else 4


@triton.jit
def cast_rn(v, dtype: tl.constexpr):
    """fp32 `v` to `dtype`, rounded to nearest even as the GPU's cvt.rn does. The interpreter's
    own fp32 -> bf16 cast truncates (its fp16 cast already rounds to nearest even), so there
    the bf16 rounding is done on the bits: the interpreter's stores equal the GPU's."""
    if INTERPRETED and dtype == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        b = tl.where(v != v, 0x7FC0, b)  # NaN stays NaN (the rounding add could carry it to inf)
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def tubelet_offsets(b, l, j, s_b, s_t, s_h, s_w, h, w, P: tl.constexpr, TS: tl.constexpr):
    """The video offsets (channel 0) of values j = (p0*P + p1)*P + p2 of tubelet token l (ordered (t, h, w)
    over an h x w patch grid) of sample b, for videos (B, C, T, H, W) of strides s_b, s_t, s_h, s_w."""
    ti = l // (h * w)
    hw = l - ti * h * w
    hi = hw // w
    wi = hw - hi * w
    p0 = j // (P * P)
    p1 = (j // P) % P
    p2 = j % P
    return b * s_b + (ti * TS + p0) * s_t + (hi * P + p1) * s_h + (wi * P + p2) * s_w
