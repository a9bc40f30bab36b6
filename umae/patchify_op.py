"""patchify / unpatchify: the references (facebookresearch/mae's, for any C and H != W),
the fused entries and the torch.library glue (fake tensors, autograd) of the C++/CUDA
kernels (csrc/cpu/patchify.cpp, csrc/cuda/patchify.cu)."""
from __future__ import annotations

import torch

from . import _backend


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
    return torch.ops.umae.patchify(imgs, p)


def unpatchify_fused(x: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    return torch.ops.umae.unpatchify(x, p, h, w, c)


if _backend.EXT_LOADED:

    @torch.library.register_fake("umae::patchify")
    def _patchify_fake(imgs, p):
        torch._check(imgs.dim() == 4, lambda: "patchify: imgs must be (N, C, H, W)")
        N, C, H, W = imgs.shape
        return imgs.new_empty((N, (H // p) * (W // p), p * p * C))

    @torch.library.register_fake("umae::unpatchify")
    def _unpatchify_fake(x, p, h, w, c):
        torch._check(x.dim() == 3, lambda: "unpatchify: x must be (N, L, K)")
        return x.new_empty((x.shape[0], c, h * p, w * p))

    def _patchify_setup(ctx, inputs, output):
        imgs, ctx.p = inputs
        ctx.hwc = (imgs.shape[2] // ctx.p, imgs.shape[3] // ctx.p, imgs.shape[1])

    def _patchify_backward(ctx, grad):
        return torch.ops.umae.unpatchify(grad, ctx.p, *ctx.hwc), None

    def _unpatchify_setup(ctx, inputs, output):
        ctx.p = inputs[1]

    def _unpatchify_backward(ctx, grad):
        return torch.ops.umae.patchify(grad, ctx.p), None, None, None, None

    torch.library.register_autograd("umae::patchify", _patchify_backward, setup_context=_patchify_setup)
    torch.library.register_autograd("umae::unpatchify", _unpatchify_backward, setup_context=_unpatchify_setup)
