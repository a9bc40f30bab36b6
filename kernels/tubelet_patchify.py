"""Tubelet patchify and its inverse: one program per token, a flat tile over its ts*p*p*C values
(p0, p1, p2, c), the token row side contiguous (16-byte stores and loads where aligned), the video
side read or written by its strides (HF's (B, T, C, H, W) passed as a view: no copy).

The geometry (p, ts, C) is constexpr: the index arithmetic is divisions by constants, and a model
has one geometry.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import on_device, tile_warps, tubelet_offsets


@triton.jit
def _video_offsets(b, l, s_b, s_c, s_t, s_h, s_w, h, w, P: tl.constexpr, TS: tl.constexpr, C: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """(k, valid, the video offset of value k = ((p0*P + p1)*P + p2)*C + c of token l of sample b)."""
    k = tl.arange(0, BLOCK_K)
    j = k // C
    return k, k < TS * P * P * C, tubelet_offsets(b, l, j, s_b, s_t, s_h, s_w, h, w, P, TS) + (k - j * C) * s_c


@triton.jit
def _patchify_kernel(v_ptr, out_ptr, N, s_b, s_c, s_t, s_h, s_w, h, w, P: tl.constexpr, TS: tl.constexpr,
                     C: tl.constexpr, BLOCK_K: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    b = tok // N
    k, ok, src = _video_offsets(b, tok - b * N, s_b, s_c, s_t, s_h, s_w, h, w, P, TS, C, BLOCK_K)
    v = tl.load(v_ptr + src, mask=ok)
    tl.store(out_ptr + tok * (TS * P * P * C) + k, v, mask=ok)


@triton.jit
def _unpatchify_kernel(x_ptr, out_ptr, N, s_xb, s_xn, s_xk, s_b, s_c, s_t, s_h, s_w, h, w, P: tl.constexpr,
                       TS: tl.constexpr, C: tl.constexpr, BLOCK_K: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    b = tok // N
    l = tok - b * N
    k, ok, dst = _video_offsets(b, l, s_b, s_c, s_t, s_h, s_w, h, w, P, TS, C, BLOCK_K)
    v = tl.load(x_ptr + b * s_xb + l * s_xn + k * s_xk, mask=ok)
    tl.store(out_ptr + dst, v, mask=ok)


def config(K: int):
    """(BLOCK_K, num_warps) for tokens of K values: the whole token in one tile."""
    block = triton.next_power_of_2(K)
    return block, tile_warps(1, block)


def forward(videos: torch.Tensor, p: int, ts: int, out: torch.Tensor) -> None:
    """Writes out (B, N, ts*p*p*C), contiguous, allocated by the caller (umae/ops/tubelet_patchify_op.py)."""
    B, C, T, H, W = videos.shape
    N = out.shape[1]
    if out.numel() == 0:
        return
    block, warps = config(out.shape[2])
    with on_device(videos):
        _patchify_kernel[(B * N,)](videos, out, N, *videos.stride(), H // p, W // p, P=p, TS=ts, C=C,
                                   BLOCK_K=block, num_warps=warps)


def backward(x: torch.Tensor, p: int, ts: int, out: torch.Tensor) -> None:
    """tubelet_unpatchify: writes out (B, C, T, H, W), contiguous, allocated by the caller."""
    B, C, T, H, W = out.shape
    N = x.shape[1]
    if out.numel() == 0:
        return
    block, warps = config(x.shape[2])
    with on_device(x):
        _unpatchify_kernel[(B * N,)](x, out, N, *x.stride(), *out.stride(), H // p, W // p, P=p, TS=ts, C=C,
                                     BLOCK_K=block, num_warps=warps)
