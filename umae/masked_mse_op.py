"""MAE's reconstruction loss: the reference (facebookresearch/mae `forward_loss`, math in
fp32) and the torch.library glue of the C++/CUDA per-patch kernels.

The kernels compute the per-patch error (N, L); the masked mean over removed patches
is a few (N, L)-sized torch ops shared by both paths, so both define the edge cases
the same way.
"""
from __future__ import annotations

import torch

from . import _backend
from .patchify_op import patchify_reference

NORM_PIX_EPS = 1e-6


def patch_mse_reference(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Per-patch mean squared error (N, L) in fp32; target (N, L, K) already patchified."""
    acc = torch.promote_types(target.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    target = target.to(acc)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    return ((pred.to(acc) - target) ** 2).mean(dim=-1)


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(per_patch * mask).sum() / mask.sum(); defined as 0 (with zero gradient) when mask.sum() == 0,
    where MAE's formula would give 0/0 = NaN. Needs no host sync."""
    m = mask.to(per_patch.dtype)
    denom = m.sum()
    return (per_patch * m).sum() / torch.where(denom != 0, denom, torch.ones_like(denom))


def masked_mse_loss_reference(pred, target, mask, norm_pix=True):
    return masked_mean(patch_mse_reference(pred, target, norm_pix), mask)


def mae_loss_reference(pred, imgs, mask, patch_size, norm_pix=True):
    return masked_mean(patch_mse_reference(pred, patchify_reference(imgs, patch_size), norm_pix), mask)


if _backend.EXT_LOADED:

    @torch.library.register_fake("umae::patch_mse")
    def _patch_mse_fake(pred, target, patch_size, norm_pix):
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        return pred.new_empty(pred.shape[:2], dtype=dtype)

    @torch.library.register_fake("umae::patch_mse_backward")
    def _patch_mse_backward_fake(grad_rows, pred, target, patch_size, norm_pix):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)

    def _setup(ctx, inputs, output):
        pred, target, ctx.patch_size, ctx.norm_pix = inputs
        ctx.save_for_backward(pred, target)

    def _backward(ctx, grad_rows):
        pred, target = ctx.saved_tensors
        grad = torch.ops.umae.patch_mse_backward(grad_rows, pred, target, ctx.patch_size, ctx.norm_pix)
        return grad, None, None, None

    torch.library.register_autograd("umae::patch_mse", _backward, setup_context=_setup)
