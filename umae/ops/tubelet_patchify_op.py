"""tubelet_patchify / tubelet_unpatchify: VideoMAE's token layout. The public ops, the references
(MCG-NJU/VideoMAE's rearrange of the labels; transformers' `VideoMAEForPreTraining` computes the same
from (B, T, C, H, W): pass it as the view `pixel_values.transpose(1, 2)`), the fused functions, the
fakes and the outputs' shape rule, the Triton launchers' registration and the registry entries.

Where they run: csrc/cpu/tubelet_patchify.cpp holds the schemas, the CPU kernels and the autograd (C++,
for every device: each op's backward is the other op's kernel); kernels/tubelet_patchify.py the
Triton kernels, whose launchers register below at the CUDA key.
"""
from __future__ import annotations

import torch

from . import _common
from ._tolerance import EXACT, Parity
from ._common import CPP_CPU_TRITON_CUDA, Op


def tubelet_patchify(videos: torch.Tensor, patch_size: int, tubelet_size: int, *,
                     backend: str | None = None) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, ts*p*p*C), N = T/ts * H/p * W/p tokens ordered (t, h, w), a token's
    values ordered (p0, p1, p2, c), p0 the frame inside the tubelet: VideoMAE's label layout.

    Any C; T divisible by ts, H and W by p; any strides (no copy: HF's (B, T, C, H, W) as
    `pixel_values.transpose(1, 2)`); the output is contiguous. An empty batch gives an empty result.
    """
    p, ts = _common.videos(videos, patch_size, tubelet_size)
    if _common.fused(TUBELET_PATCHIFY, (videos,), backend):
        return tubelet_patchify_fused(videos, p, ts)
    return tubelet_patchify_reference(videos, p, ts)


def tubelet_unpatchify(x: torch.Tensor, patch_size: int, tubelet_size: int, frames: int, height: int, width: int,
                       *, backend: str | None = None) -> torch.Tensor:
    """(B, N, ts*p*p*C) -> (B, C, T, H, W), the exact inverse of `tubelet_patchify`; C = K / (ts*p*p)."""
    _common.tensor(x, "x", dims=3)
    p, ts = _common.patch_size_int(patch_size), _common.as_int(tubelet_size)
    dims = [_common.as_int(v) for v in (frames, height, width)]
    if ts is None or ts <= 0 or any(v is None or v <= 0 for v in dims):
        raise ValueError(f"tubelet_size, frames, height and width must be positive ints, got "
                         f"{tubelet_size!r}, {frames!r}, {height!r}, {width!r}")
    T, H, W = dims
    if T % ts or H % p or W % p:
        raise ValueError(f"frames {T} must be divisible by tubelet_size {ts}, height and width ({H}, {W}) by patch_size {p}")
    t, h, w = T // ts, H // p, W // p
    B, N, K = x.shape
    if N != t * h * w or K % (ts * p * p) or K == 0:
        raise ValueError(f"x must have shape (B, {t * h * w}, ts*p*p*C) = (B, {t * h * w}, C * {ts * p * p}) for "
                         f"{T} x {H} x {W} at tubelet_size {ts} and patch_size {p}, got {tuple(x.shape)}")
    if _common.fused(TUBELET_UNPATCHIFY, (x,), backend):
        return tubelet_unpatchify_fused(x, p, ts, t, h, w, K // (ts * p * p))
    return tubelet_unpatchify_reference(x, p, ts, t, h, w, K // (ts * p * p))


def tubelets(videos: torch.Tensor, p: int, ts: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, ts*p*p, C): tokens ordered (t, h, w), a token's values (p0, p1, p2) by C."""
    B, C, T, H, W = videos.shape
    x = videos.reshape(B, C, T // ts, ts, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, t, h, w, p0, p1, p2, C
    return x.reshape(B, (T // ts) * (H // p) * (W // p), ts * p * p, C)


def tubelet_patchify_reference(videos: torch.Tensor, p: int, ts: int) -> torch.Tensor:
    x = tubelets(videos, p, ts)
    return x.reshape(x.shape[0], x.shape[1], -1)


def tubelet_unpatchify_reference(x: torch.Tensor, p: int, ts: int, t: int, h: int, w: int, c: int) -> torch.Tensor:
    """(B, t*h*w, ts*p*p*c) -> (B, c, t*ts, h*p, w*p), the inverse of `tubelet_patchify_reference`."""
    B = x.shape[0]
    v = x.reshape(B, t, h, w, ts, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, t, p0, h, p1, w, p2
    return v.reshape(B, c, t * ts, h * p, w * p)


def tubelet_patchify_fused(videos: torch.Tensor, p: int, ts: int) -> torch.Tensor:
    """umae::tubelet_patchify: the C++ kernel on CPU (csrc/cpu/tubelet_patchify.cpp), Triton on CUDA
    (kernels/tubelet_patchify.py)."""
    return _PATCHIFY(videos, p, ts)


def tubelet_unpatchify_fused(x: torch.Tensor, p: int, ts: int, t: int, h: int, w: int, c: int) -> torch.Tensor:
    return _UNPATCHIFY(x, p, ts, t, h, w, c)


def _patchify_output(videos, p, ts):
    """The one shape rule of tubelet_patchify's output, for the fake and the Triton launcher."""
    B, C, T, H, W = videos.shape
    return videos.new_empty((B, (T // ts) * (H // p) * (W // p), ts * p * p * C))


def _unpatchify_output(x, p, ts, t, h, w, c):
    return x.new_empty((x.shape[0], c, t * ts, h * p, w * p))


_PATCHIFY = _UNPATCHIFY = None
if _common.EXT_LOADED:  # the autograd is C++ (csrc/cpu/tubelet_patchify.cpp): each op is the other's backward
    _PATCHIFY, _UNPATCHIFY = torch.ops.umae.tubelet_patchify.default, torch.ops.umae.tubelet_unpatchify.default
    torch.library.register_fake("umae::tubelet_patchify")(_patchify_output)
    torch.library.register_fake("umae::tubelet_unpatchify")(_unpatchify_output)

KERNELS = TRITON_KERNELS = None
if _common.TRITON_USABLE:
    from ..kernels import tubelet_patchify as KERNELS

    def _triton_patchify(videos, p, ts):
        out = _patchify_output(videos, p, ts)
        KERNELS.forward(videos, p, ts, out)
        return out

    def _triton_unpatchify(x, p, ts, t, h, w, c):
        out = _unpatchify_output(x, p, ts, t, h, w, c)
        KERNELS.backward(x, p, ts, out)
        return out

    TRITON_KERNELS = {"tubelet_patchify": _triton_patchify, "tubelet_unpatchify": _triton_unpatchify}
    _common.register_kernels(TRITON_KERNELS, "CUDA")


TUBELET_PATCHIFY = Op("tubelet_patchify", "umae::tubelet_patchify", tubelet_patchify, tubelet_patchify_reference,
                      tubelet_patchify_fused, CPP_CPU_TRITON_CUDA, kernels=KERNELS, triton_kernels=TRITON_KERNELS,
                      parity=Parity(EXACT, EXACT))
TUBELET_UNPATCHIFY = Op("tubelet_unpatchify", "umae::tubelet_unpatchify", tubelet_unpatchify,
                        tubelet_unpatchify_reference, tubelet_unpatchify_fused, CPP_CPU_TRITON_CUDA, kernels=KERNELS,
                        triton_kernels=TRITON_KERNELS, parity=Parity(EXACT, EXACT))
