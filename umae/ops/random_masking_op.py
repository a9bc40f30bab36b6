"""Random masking: the public op, the reference (facebookresearch/mae `random_masking`, with the
positional embedding add and cls prepend that surround it in `forward_encoder`), the fused function,
the fakes and the outputs' shape rule, the Triton launchers' registration and the registry entry.

Where it runs: csrc/cpu/random_masking.cpp holds the schemas, the CPU kernel and the autograd, in C++
for every device, Triton's too: a call is one dispatcher entry and the backward runs no Python
autograd (the host time of a small op on a GPU); kernels/random_masking.py holds the Triton kernels,
whose launchers register below at the CUDA key and allocate by `_outputs`.
"""
from __future__ import annotations

import torch

from . import _common
from ._tolerance import EXACT, TOL, Parity
from ._common import CPP_CPU_TRITON_CUDA, Op, acc_dtype, result_dtype


def len_keep_for(L: int, mask_ratio: float) -> int:
    return int(L * (1 - mask_ratio))


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                   pos_embed: torch.Tensor | None = None, cls_token: torch.Tensor | None = None, *,
                   backend: str | None = None):
    """MAE's per-sample random masking -> (x_masked, mask, ids_restore).

    len_keep = int(L * (1 - mask_ratio)) tokens with the smallest noise are kept, in ascending
    noise order (ties by index: a stable argsort). mask (N, L) fp32 is 1 for removed patches, in
    the original order; ids_restore (N, L) int64 is the inverse permutation. pos_embed (1, L, D)
    is added to the kept tokens (the fused kernel never forms x + pos_embed for removed ones);
    cls_token (1, 1, D), its own positional embedding already added, is prepended. Output dtype
    follows type promotion of x, pos_embed and cls_token, as in the reference. Without noise,
    noise = torch.rand(N, L) from torch's default generator (same seed, same mask; no host sync).
    len_keep may round to 0 (x_masked then holds only the cls token, or no token). The order is
    torch.argsort(stable=True)'s: NaN noise after +inf, fp64 noise compared in fp64. mask_ratio
    must be in [0, 1). Given noise, fused and reference agree bitwise.
    """
    _common.tensor(x, "x", dims=3)
    r = _common.as_float(mask_ratio)
    if r is None or not 0 <= r < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    mask_ratio = r
    N, L, D = x.shape
    if noise is not None:
        _common.tensor(noise, "noise", dims=2)
        _common.shape(noise, "noise", (N, L), "(N, L of x)")
        _common.same_device(x, "x", noise, "noise")
    _common.param(pos_embed, "pos_embed", (1, L, D), x)
    _common.param(cls_token, "cls_token", (1, 1, D), x)
    if _common.fused(RANDOM_MASKING, (x, pos_embed, cls_token), backend):
        return random_masking_fused(x, mask_ratio, noise, pos_embed, cls_token)
    return random_masking_reference(x, mask_ratio, noise, pos_embed, cls_token)


def random_masking_reference(x, mask_ratio, noise=None, pos_embed=None, cls_token=None):
    N, L, D = x.shape
    len_keep = len_keep_for(L, mask_ratio)
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    if pos_embed is not None:
        x = x + pos_embed
    # stable: ties (equal noise) keep index order, which defines the result for every input
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    if cls_token is not None:
        x_masked = torch.cat([cls_token.expand(N, -1, -1), x_masked], dim=1)  # cat promotes dtypes
    return x_masked, mask, ids_restore


def _noise(x, noise):
    # torch's generator, as the reference: same seed, same mask
    return torch.rand(x.shape[0], x.shape[1], device=x.device) if noise is None else noise


def random_masking_fused(x, mask_ratio, noise=None, pos_embed=None, cls_token=None):
    """umae::random_masking: the C++ kernel on CPU (csrc/cpu/random_masking.cpp), the Triton kernel on
    CUDA (kernels/random_masking.py)."""
    return _RANDOM_MASKING(x, _noise(x, noise), pos_embed, cls_token, len_keep_for(x.shape[1], mask_ratio))


def _outputs(x, pos_embed, cls_token, len_keep):
    """(x_masked, mask, ids_restore) allocated: the one shape and dtype rule, for the fake and the
    Triton launcher (the C++ kernel keeps its own checks)."""
    N, L, D = x.shape
    out = x.new_empty((N, len_keep + int(cls_token is not None), D), dtype=result_dtype(x, pos_embed, cls_token))
    return out, x.new_empty((N, L), dtype=torch.float32), x.new_empty((N, L), dtype=torch.int64)


def _masking_fake(x, noise, pos_embed, cls_token, len_keep):
    return _outputs(x, pos_embed, cls_token, len_keep)


def _backward_fake(grad_out, ids_restore, has_cls, need_x, need_pos, need_cls, x_dtype, pos_dtype, cls_dtype):
    N, L = ids_restore.shape
    D = grad_out.shape[2]
    return (grad_out.new_empty((N, L, D) if need_x else (0,), dtype=x_dtype),
            grad_out.new_empty((1, L, D) if need_pos else (0,), dtype=pos_dtype),
            grad_out.new_empty((1, 1, D) if need_cls else (0,), dtype=cls_dtype))


_RANDOM_MASKING = None
if _common.EXT_LOADED:  # the autograd is C++ (csrc/cpu/random_masking.cpp), for every device
    _RANDOM_MASKING = torch.ops.umae.random_masking.default
    torch.library.register_fake("umae::random_masking")(_masking_fake)
    torch.library.register_fake("umae::random_masking_backward")(_backward_fake)

# the Triton kernel module and its launchers ({op name: launcher}) for the CUDA key; None without Triton
KERNELS = TRITON_KERNELS = None
if _common.TRITON_USABLE:
    from ..kernels import random_masking as KERNELS

    def _triton_forward(x, noise, pos_embed, cls_token, len_keep):
        outs = _outputs(x, pos_embed, cls_token, len_keep)
        KERNELS.forward(x, noise, pos_embed, cls_token, *outs)
        return outs

    def _triton_backward(grad_out, ids_restore, has_cls, need_x, need_pos, need_cls, x_dtype, pos_dtype, cls_dtype):
        # pos's gradient sums the unrounded gradient; without it (MAE's fixed pos_embed) the kernel
        # stores x's dtype directly (no fp32 copy to convert under autocast). The sums accumulate in
        # fp32 as they read (sum's dtype=): no fp32 copy of the gradient.
        acc, empty = acc_dtype(grad_out.dtype), grad_out.new_empty
        gx, gpos, gcls = empty((0,), dtype=x_dtype), empty((0,), dtype=pos_dtype), empty((0,), dtype=cls_dtype)
        if need_x or need_pos:
            N, L = ids_restore.shape
            g = empty((N, L, grad_out.shape[2]), dtype=grad_out.dtype if need_pos else x_dtype)
            KERNELS.backward(grad_out, ids_restore, g, has_cls=has_cls)
            if need_x:
                gx = g if g.dtype == x_dtype else g.to(x_dtype)
            if need_pos:
                gpos = _as(g.sum(0, keepdim=True, dtype=acc), pos_dtype)
        if need_cls:
            gcls = _as(grad_out[:, :1].sum(0, keepdim=True, dtype=acc), cls_dtype)
        return gx, gpos, gcls

    def _as(t, dtype):
        return t if t.dtype == dtype else t.to(dtype)

    TRITON_KERNELS = {"random_masking": _triton_forward, "random_masking_backward": _triton_backward}
    _common.register_kernels(TRITON_KERNELS, "CUDA")


RANDOM_MASKING = Op("random_masking", "umae::random_masking", random_masking, random_masking_reference,
                    random_masking_fused, CPP_CPU_TRITON_CUDA,
                    kernels=KERNELS, triton_kernels=TRITON_KERNELS,
                    parity=Parity(EXACT, TOL))
