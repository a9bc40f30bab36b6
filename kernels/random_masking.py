"""MAE's random masking fused with the gather of kept tokens (+ positional embedding, + cls).

One program per (sample, block of BLOCK_I patches): it ranks its patches' noise against
the whole row (no global argsort: rank = #smaller, ties broken by index, i.e. a stable
argsort), writes ids_restore and mask, and copies its kept rows (x + pos) to their slot
rank + has_cls. Removed rows are never read, and x + pos is never written for them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import cast_rn, on_device, pow2_clamp, tile_warps


@triton.jit
def _rank_gather_kernel(noise_ptr, x_ptr, pos_ptr, cls_ptr, out_ptr, mask_ptr, ids_ptr,
                        L, D, len_keep,
                        stride_x_n, stride_x_l, stride_x_d, stride_pos_l, stride_pos_d, stride_cls_d,
                        stride_out_n, stride_out_l,
                        HAS_POS: tl.constexpr, HAS_CLS: tl.constexpr, XP_DTYPE: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # a kept row is x + pos rounded to XP_DTYPE (promote(x, pos), where the reference's add rounds), then
    # stored in out's dtype (wider where cls is: exact)
    n = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    # torch.argsort(stable=True)'s order: numbers ascending, NaN after every number (+inf too),
    # ties by index; the noise is compared in its own dtype (fp32, or fp64: no ties added).
    ni = tl.load(noise_ptr + n * L + i, mask=i_ok, other=0.0)
    ni_nan = ni != ni
    ni = tl.where(ni_nan, float("inf"), ni)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        nj = tl.load(noise_ptr + n * L + j, mask=j < L, other=0.0)
        nj_nan = nj != nj
        nj = tl.where(nj_nan, float("inf"), nj)
        tie = (nj[None, :] == ni[:, None]) & (nj_nan[None, :] == ni_nan[:, None])
        before = (nj[None, :] < ni[:, None]) | ((nj[None, :] == ni[:, None]) & ~nj_nan[None, :] & ni_nan[:, None])
        before = (before | (tie & (j[None, :] < i[:, None]))) & (j[None, :] < L)
        rank += tl.sum(before.to(tl.int32), axis=1)
    tl.store(ids_ptr + n * L + i, rank.to(tl.int64), mask=i_ok)
    keep = rank < len_keep
    tl.store(mask_ptr + n * L + i, tl.where(keep, 0.0, 1.0), mask=i_ok)
    row_ok = i_ok & keep
    dst = (rank + HAS_CLS).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (d < D)[None, :]
        x_off = n * stride_x_n + i[:, None].to(tl.int64) * stride_x_l + d[None, :] * stride_x_d
        v = tl.load(x_ptr + x_off, mask=m, other=0.0)
        v = v.to(tl.float32)
        if HAS_POS:
            pos_off = i[:, None] * stride_pos_l + d[None, :] * stride_pos_d
            v += tl.load(pos_ptr + pos_off, mask=m, other=0.0).to(tl.float32)
        out_off = n * stride_out_n + dst[:, None] * stride_out_l + d[None, :]
        v = cast_rn(v, XP_DTYPE).to(tl.float32)
        tl.store(out_ptr + out_off, cast_rn(v, out_ptr.dtype.element_ty), mask=m)
    if HAS_CLS:
        if ib == 0:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                c = tl.load(cls_ptr + d * stride_cls_d, mask=d < D, other=0.0)
                tl.store(out_ptr + n * stride_out_n + d, cast_rn(c.to(tl.float32), out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _scatter_grad_kernel(grad_ptr, ids_ptr, gx_ptr, L, D, len_keep, stride_grad_n, stride_grad_l, stride_grad_d,
                         HAS_CLS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_x[n, i] = grad_out[n, has_cls + rank_i] for kept rows, 0 for removed rows.
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < L
    rank = tl.load(ids_ptr + n * L + i, mask=i_ok, other=0)
    keep = i_ok & (rank < len_keep)
    src = rank + HAS_CLS
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = (d < D)[None, :]
        grad_off = n * stride_grad_n + src[:, None] * stride_grad_l + d[None, :] * stride_grad_d
        g = tl.load(grad_ptr + grad_off, mask=keep[:, None] & dm, other=0.0)
        tl.store(gx_ptr + (n * L + i[:, None]) * D + d[None, :], cast_rn(g.to(tl.float32), gx_ptr.dtype.element_ty),
                 mask=i_ok[:, None] & dm)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _config(L: int, D: int):
    block_d = pow2_clamp(D, 16, 128)
    return dict(BLOCK_I=16, BLOCK_J=pow2_clamp(L, 16, 64), BLOCK_D=block_d), tile_warps(16, block_d)


def forward(x, noise, pos_embed, cls_token, out, mask, ids_restore):
    """x (N, L, D) any strides; noise (N, L); pos_embed (1, L, D) or None; cls_token (1, 1, D) or None;
    writes out (N, [1 +] len_keep, D), mask (N, L) fp32 and ids_restore (N, L) int64, which the caller
    allocates (umae/ops/random_masking_op.py: one shape rule for them and the fake)."""
    N, L, D = x.shape
    has_cls = cls_token is not None
    if N == 0:
        return
    # fp64 noise stays fp64 (fp32 would create ties the reference does not have); others are exact in fp32
    if noise.dtype not in (torch.float32, torch.float64) or not noise.is_contiguous():
        noise = noise.to(torch.promote_types(noise.dtype, torch.float32)).contiguous()
    pos = pos_embed if pos_embed is not None else x
    cls = cls_token if has_cls else x
    xp_dtype = torch.promote_types(x.dtype, pos.dtype)  # x + pos rounds to this, as the reference's add
    cfg, warps = _config(L, D)
    # at least one program per sample: program 0 writes the cls row, also when L == 0
    grid = (N, max(1, triton.cdiv(L, cfg["BLOCK_I"])))
    with on_device(x):
        _rank_gather_kernel[grid](noise, x, pos, cls, out, mask, ids_restore, L, D, out.shape[1] - int(has_cls),
                                  x.stride(0), x.stride(1), x.stride(2), pos.stride(-2), pos.stride(-1),
                                  cls.stride(-1), out.stride(0), out.stride(1),
                                  HAS_POS=pos_embed is not None, HAS_CLS=has_cls,
                                  XP_DTYPE=_TL[xp_dtype], num_warps=warps, **cfg)


def backward(grad_out, ids_restore, gx, *, has_cls: bool):
    """Writes gx (N, L, D), the gradient of x + pos, from grad_out, the gradient of x_masked."""
    N, L = ids_restore.shape
    D = grad_out.shape[2]
    if gx.numel() == 0:
        return
    cfg, warps = _config(L, D)
    cfg.pop("BLOCK_J")
    len_keep = grad_out.shape[1] - int(has_cls)
    grid = (N, triton.cdiv(L, cfg["BLOCK_I"]))
    with on_device(grad_out):
        _scatter_grad_kernel[grid](grad_out, ids_restore, gx, L, D, len_keep, grad_out.stride(0), grad_out.stride(1),
                                   grad_out.stride(2), HAS_CLS=has_cls, num_warps=warps, **cfg)
