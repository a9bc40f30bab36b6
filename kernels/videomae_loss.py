"""VideoMAE's loss, forward and pred's gradient: one program per token; a masked token's program
finds its pred row (the count of masked tokens before it in the mask's row), gathers the token from
the videos by their strides as a [ts*p*p, C] tile, unnormalizes and normalizes it per channel in
fp32, and compares it with the pred row. Forward: each program writes its token's sum of squares
(0 for a visible token), summed by the caller (deterministic, no atomics); backward: the pred row's
gradient. A visible token's program reads one mask byte and stops there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import cast_rn, on_device, tile_warps, tubelet_offsets

BLOCK_N = 1024  # mask bytes per step of the rank count


@triton.jit
def _label(v_ptr, stats_ptr, b, l, s_b, s_c, s_t, s_h, s_w, h, w, eps, P: tl.constexpr, TS: tl.constexpr,
           C: tl.constexpr, NORM: tl.constexpr, UNNORM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Token l of sample b as its label, fp32 [BLOCK_J, BLOCK_C] (0 outside), and the tile's valid part."""
    J: tl.constexpr = TS * P * P
    j = tl.arange(0, BLOCK_J)
    c = tl.arange(0, BLOCK_C)
    ok = (j < J)[:, None] & (c < C)[None, :]
    off = tubelet_offsets(b, l, j, s_b, s_t, s_h, s_w, h, w, P, TS)[:, None] + c[None, :] * s_c
    x = tl.load(v_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if UNNORM:  # x * std + mean, as the reference (two roundings)
        std = tl.load(stats_ptr + C + c, mask=c < C, other=1.0)
        mean = tl.load(stats_ptr + c, mask=c < C, other=0.0)
        x = tl.where(ok, x * std[None, :] + mean[None, :], 0.0)
    if NORM:  # per channel over the J values: unbiased variance, eps added to the std
        mu = tl.sum(x, axis=0) / J
        # one correction of the mean (the sum's rounding): a constant token's labels are 0, not
        # rounding noise scaled by 1 / eps
        mu += tl.sum(tl.where(ok, x - mu[None, :], 0.0), axis=0) / J
        d = tl.where(ok, x - mu[None, :], 0.0)
        den = tl.sqrt_rn(tl.sum(d * d, axis=0) / (J - 1)) + eps
        x = tl.div_rn(d, den[None, :])
    return x, ok, j, c


@triton.jit
def _rank(mask_ptr, row, l, BLOCK: tl.constexpr):
    """The masked tokens before token l of the mask row at `row`: the token's pred row."""
    r = tl.zeros((), dtype=tl.int32)
    for start in range(0, l, BLOCK):
        o = start + tl.arange(0, BLOCK)
        r += tl.sum(tl.load(mask_ptr + row + o, mask=o < l, other=0).to(tl.int32))
    return r


@triton.jit
def _loss_kernel(pred_ptr, v_ptr, mask_ptr, stats_ptr, grad_ptr, out_ptr, N, Nm, s_pb, s_pn,
                 s_b, s_c, s_t, s_h, s_w, h, w, eps, inv_count,
                 P: tl.constexpr, TS: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, UNNORM: tl.constexpr,
                 BACKWARD: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    b = tok // N
    l = tok - b * N
    acc = tl.zeros((), dtype=tl.float32)
    if tl.load(mask_ptr + tok) != 0:
        r = _rank(mask_ptr, b * N, l, BLOCK_N).to(tl.int64)
        y, ok, j, c = _label(v_ptr, stats_ptr, b, l, s_b, s_c, s_t, s_h, s_w, h, w, eps, P, TS, C, NORM, UNNORM,
                             BLOCK_J, BLOCK_C)
        k = j[:, None] * C + c[None, :]
        pred = tl.load(pred_ptr + b * s_pb + r * s_pn + k, mask=ok, other=0.0).to(tl.float32)
        diff = tl.where(ok, pred - y, 0.0)
        if BACKWARD:
            coef = tl.load(grad_ptr) * 2.0 * inv_count
            tl.store(out_ptr + (b * Nm + r) * (TS * P * P * C) + k, cast_rn(coef * diff, out_ptr.dtype.element_ty),
                     mask=ok)
        else:
            acc = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
    if not BACKWARD:
        tl.store(out_ptr + tok, acc)


def check_rows(mask: torch.Tensor, num_masked: int) -> None:
    """Refuse a mask whose rows do not each mask `num_masked` tokens (pred's rows): a token ranked past
    them would address no pred row, and a pred row no token names would get no gradient. On CUDA a
    device-side assert (no host sync; the error surfaces at the next synchronizing call, as
    restore_tokens' check_ids); on CPU (the interpreter) at once, naming the first bad row."""
    counts = mask.sum(1)
    ok = (counts == num_masked).all()
    msg = f"videomae_loss: mask must mask {num_masked} tokens (pred's rows) in every row"
    if mask.device.type == "cuda":
        torch._assert_async(ok, msg)
    elif not bool(ok):
        b = int((counts != num_masked).nonzero()[0, 0])
        raise ValueError(f"{msg}, but row {b} masks {int(counts[b])}")


def config(J: int, C: int):
    """(BLOCK_J, BLOCK_C, num_warps): the whole token in one tile."""
    bj, bc = triton.next_power_of_2(J), triton.next_power_of_2(C)
    return bj, bc, tile_warps(bj, bc)


def _launch(pred, videos, mask, stats, grad, out, p, ts, norm_pix, eps, backward):
    B, C, T, H, W = videos.shape
    N = mask.shape[1]
    Nm = pred.shape[1]
    bj, bc, warps = config(ts * p * p, C)
    with on_device(videos):
        _loss_kernel[(B * N,)](pred, videos, mask.view(torch.uint8), stats if stats is not None else videos,
                               grad if grad is not None else pred, out, N, Nm, pred.stride(0), pred.stride(1),
                               *videos.stride(), H // p, W // p, eps, 1.0 / max(B * Nm * pred.shape[2], 1),
                               P=p, TS=ts, C=C, NORM=norm_pix, UNNORM=stats is not None, BACKWARD=backward,
                               BLOCK_J=bj, BLOCK_C=bc, BLOCK_N=BLOCK_N, num_warps=warps)


def forward(pred, videos, mask, stats, p, ts, norm_pix, eps) -> torch.Tensor:
    """The loss, fp32 0-dim. pred's rows must be unit-strided; stats: (2, C) fp32 (mean; std) or None."""
    B, N = mask.shape
    check_rows(mask, pred.shape[1])
    parts = torch.empty(B * N, device=pred.device, dtype=torch.float32)
    if parts.numel():
        _launch(pred, videos, mask, stats, None, parts, p, ts, norm_pix, eps, backward=False)
    return parts.sum() / (B * pred.shape[1] * pred.shape[2])  # 0 / 0 = NaN for no masked token, as the reference


def backward(grad, pred, videos, mask, stats, p, ts, norm_pix, eps, out) -> None:
    """Writes pred's gradient into out (pred's shape and dtype, contiguous), allocated by the caller."""
    if out.numel():
        _launch(pred, videos, mask, stats, grad.float(), out, p, ts, norm_pix, eps, backward=True)
