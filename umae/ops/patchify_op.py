"""patchify / unpatchify: the public ops, the references (facebookresearch/mae's, for any C and
H != W), the fused functions, the fakes and the registry entries.

Where they run: csrc/cpu/patchify.cpp holds the schemas, the CPU kernels and the autograd (C++, for
every device: each op's backward is the other op's kernel); csrc/cuda/patchify.cu the CUDA kernels.
"""
from __future__ import annotations

import torch

from . import _common
from ._tolerance import EXACT, Parity
from ._common import CPP, Op


def patchify(imgs: torch.Tensor, patch_size: int, *, backend: str | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), ordered as facebookresearch/mae's `patchify`.

    Any C, any H and W divisible by p; any strides are accepted (no copy); the output is
    contiguous. An empty batch gives an empty result.
    """
    patch_size = _common.images(imgs, patch_size)
    if _common.fused(PATCHIFY, (imgs,), backend):
        return patchify_fused(imgs, patch_size)
    return patchify_reference(imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, image_size, channels: int = 3, *,
               backend: str | None = None) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), the exact inverse of `patchify`; image_size is H or (H, W)."""
    _common.tensor(x, "x", dims=3)
    p = _common.patch_size_int(patch_size)
    H, W = _common.pair(image_size, "image_size")
    if H % p or W % p:
        raise ValueError(f"image_size ({H}, {W}) must be divisible by patch_size {p}")
    c = _common.as_int(channels)
    if c is None or c <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    channels = c
    h, w = H // p, W // p
    if x.shape[1] != h * w or x.shape[2] != p * p * channels:
        raise ValueError(f"x must have shape (N, {h * w}, {p * p * channels}) for image_size ({H}, {W}), "
                         f"patch_size {p}, channels {channels}; got {tuple(x.shape)}")
    if _common.fused(UNPATCHIFY, (x,), backend):
        return unpatchify_fused(x, p, h, w, channels)
    return unpatchify_reference(x, p, h, w, channels)


def patchify_reference(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), last dim ordered (row-in-patch, col-in-patch, channel)."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify_reference(x: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    """(N, h*w, p*p*C) -> (N, C, h*p, w*p): the inverse of `patchify_reference`."""
    N = x.shape[0]
    x = x.reshape(N, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, c, h * p, w * p)


def patchify_fused(imgs: torch.Tensor, p: int) -> torch.Tensor:
    return _PATCHIFY(imgs, p)


def unpatchify_fused(x: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    return _UNPATCHIFY(x, p, h, w, c)


_PATCHIFY = _UNPATCHIFY = None
if _common.EXT_LOADED:  # the autograd is C++ (csrc/cpu/patchify.cpp): each op is the other's backward
    _PATCHIFY, _UNPATCHIFY = torch.ops.umae.patchify.default, torch.ops.umae.unpatchify.default

    @torch.library.register_fake("umae::patchify")
    def _patchify_fake(imgs, p):
        torch._check(imgs.dim() == 4, lambda: "patchify: imgs must be (N, C, H, W)")
        N, C, H, W = imgs.shape
        return imgs.new_empty((N, (H // p) * (W // p), p * p * C))

    @torch.library.register_fake("umae::unpatchify")
    def _unpatchify_fake(x, p, h, w, c):
        torch._check(x.dim() == 3, lambda: "unpatchify: x must be (N, L, K)")
        return x.new_empty((x.shape[0], c, h * p, w * p))


PATCHIFY = Op("patchify", "umae::patchify", patchify, patchify_reference, patchify_fused, CPP,
              parity=Parity(EXACT, EXACT))
UNPATCHIFY = Op("unpatchify", "umae::unpatchify", unpatchify, unpatchify_reference, unpatchify_fused, CPP,
                parity=Parity(EXACT, EXACT))
