"""MAE decoder input in one pass: kept tokens back to their original positions, the mask
token elsewhere, the cls token in front, the positional embedding added.

Forward: one program per (sample, block of output rows) gathers each row from x or the
mask token. Backward: one program per (sample, block of columns) walks the rows, scatters
the kept rows' gradient to x and sums the removed rows' gradient into one fp32 row per
sample for the mask token (a deterministic two-level sum, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import cast_rn, on_device, pow2_clamp, tile_warps


@triton.jit
def _rows(ids_ptr, n, rb, L, len_keep, HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr):
    """For output rows o of block rb: (o, valid, comes from x, its row in x, is a mask token)."""
    o = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # output row, cls included
    o_ok = o < L + HAS_CLS
    i = o - HAS_CLS
    is_patch = o_ok & (i >= 0)
    r = tl.load(ids_ptr + n * L + i, mask=is_patch, other=0)
    # an id outside [0, L) is neither a kept row nor a mask token: its row is never read or written
    # (check_ids refuses such ids; this keeps every address in bounds whatever ids_ptr holds)
    id_ok = is_patch & (r >= 0) & (r < L)
    in_x = (id_ok & (r < len_keep)) | (o_ok & (i < 0))
    return o, o_ok, in_x, tl.where(id_ok, r + HAS_CLS, 0), id_ok & (r >= len_keep)


@triton.jit
def _restore_kernel(x_ptr, ids_ptr, tok_ptr, pos_ptr, out_ptr, L, D, len_keep,
                    stride_x_n, stride_x_l, stride_x_d, stride_tok_d, stride_pos_l, stride_pos_d,
                    HAS_POS: tl.constexpr, HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    o, o_ok, from_x, src, is_tok = _rows(ids_ptr, n, tl.program_id(1), L, len_keep, HAS_CLS, BLOCK_R)
    R = L + HAS_CLS
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = (d < D)[None, :]
        x_off = n * stride_x_n + src[:, None] * stride_x_l + d[None, :] * stride_x_d
        v = tl.load(x_ptr + x_off, mask=from_x[:, None] & dm, other=0.0)
        t = tl.load(tok_ptr + d * stride_tok_d, mask=d < D, other=0.0)
        v = tl.where(is_tok[:, None], t[None, :].to(tl.float32), v.to(tl.float32))
        if HAS_POS:
            pos_off = o[:, None] * stride_pos_l + d[None, :] * stride_pos_d
            v += tl.load(pos_ptr + pos_off, mask=o_ok[:, None] & dm, other=0.0).to(tl.float32)
        tl.store(out_ptr + (n * R + o[:, None]) * D + d[None, :], cast_rn(v, out_ptr.dtype.element_ty), mask=o_ok[:, None] & dm)


@triton.jit
def _restore_bwd_kernel(g_ptr, ids_ptr, gx_ptr, part_ptr, L, D, len_keep,
                        stride_grad_n, stride_grad_l, stride_grad_d,
                        HAS_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (sample, column block), looping over the rows: the mask token's partial
    # sum is one (D,) row per sample, not one per row block
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = (d < D)[None, :]
    Kx = len_keep + HAS_CLS
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for rb in range(0, tl.cdiv(L + HAS_CLS, BLOCK_R)):
        o, o_ok, to_x, dst, is_tok = _rows(ids_ptr, n, rb, L, len_keep, HAS_CLS, BLOCK_R)
        grad_off = n * stride_grad_n + o[:, None] * stride_grad_l + d[None, :] * stride_grad_d
        g = tl.load(g_ptr + grad_off, mask=o_ok[:, None] & dm, other=0.0)
        tl.store(gx_ptr + (n * Kx + dst[:, None]) * D + d[None, :], cast_rn(g.to(tl.float32), gx_ptr.dtype.element_ty),
                 mask=to_x[:, None] & dm)
        acc += tl.where(is_tok[:, None], g.to(tl.float32), 0.0)
    tl.store(part_ptr + n * D + d, tl.sum(acc, axis=0), mask=d < D)


def _config(L: int, D: int):
    block_d = pow2_clamp(D, 16, 128)
    return dict(BLOCK_R=16, BLOCK_D=block_d), tile_warps(16, block_d)


def check_ids(ids_restore: torch.Tensor) -> None:
    """Refuse an ids_restore that is not a permutation of 0..L-1 per row (what random_masking returns):
    an id out of range would otherwise be a silent mask token (the kernels never touch memory for it),
    and a repeated one would leave rows of grad x unwritten in the backward.

    The check is on the device and costs no host sync: per row, the count of every id (ids out of range
    counted in an extra bin) must be 1. On CUDA its verdict goes to torch._assert_async, a device-side
    assert as torch.gather's for a bad index (the error surfaces at the next synchronizing call and the
    CUDA context is lost, as for any device-side assert); a host check would stall the launch queue on
    every call (and break CUDA graph capture) to guard against ids that MAE's random_masking never
    produces. A few small elementwise launches over N x L ids, next to the N x L x D tokens moved.
    On CPU (the interpreter) the verdict is read at once and the error names the first bad row."""
    N, L = ids_restore.shape
    if N * L == 0:
        return
    in_range = (ids_restore >= 0) & (ids_restore < L)
    counts = torch.zeros((N, L + 1), dtype=torch.int32, device=ids_restore.device)
    ones = torch.ones((1, 1), dtype=torch.int32, device=ids_restore.device).expand(N, L)
    counts.scatter_add_(1, torch.where(in_range, ids_restore, L), ones)
    ok = (counts[:, :L] == 1).all()
    msg = f"restore_tokens: ids_restore must be a permutation of 0..{L - 1} in every row (as random_masking returns)"
    if ids_restore.device.type == "cuda":
        torch._assert_async(ok, msg)
        return
    if bool(ok):
        return
    n = int((counts[:, :L] != 1).any(1).nonzero()[0, 0])
    seen = set()
    for l, r in enumerate(ids_restore[n].tolist()):  # the first bad id in the row, as the C++ kernel reports it
        if not 0 <= r < L or r in seen:
            break
        seen.add(r)
    raise RuntimeError(f"restore_tokens: ids_restore[{n}] must be a permutation of 0..{L - 1} "
                       f"(as random_masking returns), but has {r} at {l}")


def forward(x, ids_restore, mask_token, pos_embed, out, *, has_cls: bool):
    """Writes out (N, [1 +] L, D), which the caller allocates (umae/ops/restore_tokens_op.py: one shape
    rule for it and the fake)."""
    N, L = ids_restore.shape
    check_ids(ids_restore)
    D = x.shape[2]
    if out.numel() == 0:
        return
    ids = ids_restore.contiguous()
    pos = pos_embed if pos_embed is not None else x
    cfg, warps = _config(L, D)
    grid = (N, triton.cdiv(out.shape[1], cfg["BLOCK_R"]))
    with on_device(x):
        _restore_kernel[grid](x, ids, mask_token, pos, out, L, D, x.shape[1] - int(has_cls),
                              x.stride(0), x.stride(1), x.stride(2), mask_token.stride(-1), pos.stride(-2),
                              pos.stride(-1), HAS_POS=pos_embed is not None, HAS_CLS=has_cls, num_warps=warps, **cfg)


def backward(grad_out, ids_restore, gx, *, has_cls: bool):
    """Writes gx (x's shape and dtype, allocated by the caller); returns the mask token's gradient, fp32 (D,)."""
    N, L = ids_restore.shape
    D = grad_out.shape[2]
    cfg, warps = _config(L, D)
    part = torch.empty((N, D), device=grad_out.device, dtype=torch.float32)
    if grad_out.numel() == 0:
        return part.sum(0)
    with on_device(grad_out):
        grid = (N, triton.cdiv(D, cfg["BLOCK_D"]))
        _restore_bwd_kernel[grid](grad_out, ids_restore.contiguous(), gx, part, L, D, gx.shape[1] - int(has_cls),
                                  grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                                  HAS_CLS=has_cls, num_warps=warps, **cfg)
    return part.sum(0)
