"""MAE's reconstruction loss: the reference (facebookresearch/mae `forward_loss`, math in
fp32), the fused entries and the torch.library glue of the C++/CUDA per-patch kernels
(csrc/cpu/masked_mse.cpp, csrc/cuda/masked_mse.cu).

The kernels compute the per-patch error (N, L); the masked mean over removed patches
is a few (N, L)-sized torch ops shared by both paths, so both define the edge cases
the same way.
"""
from __future__ import annotations

import torch

from . import _backend
from ._checks import acc_dtype, first_order_only
from .patchify_op import patchify_reference

NORM_PIX_EPS = 1e-6  # MAE's; the kernels take it as an argument


def patch_mse_reference(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Per-patch mean squared error (N, L) in fp32; target (N, L, K) already patchified."""
    acc = acc_dtype(target.dtype)
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


def _refuse_target_grad(target: torch.Tensor, name: str) -> None:
    # MAE's target is data; the fused kernels give no gradient to it, so say so instead of returning None.
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but the fused loss differentiates pred only; "
                         f"detach {name} or use umae.use_backend('reference')")


def masked_mse_loss_fused(pred, target, mask, norm_pix=True):
    _refuse_target_grad(target, "target")
    return masked_mean(torch.ops.umae.patch_mse(pred, target, 0, norm_pix, NORM_PIX_EPS), mask)


def mae_loss_fused(pred, imgs, mask, patch_size, norm_pix=True):
    _refuse_target_grad(imgs, "imgs")
    return masked_mean(torch.ops.umae.patch_mse(pred, imgs, patch_size, norm_pix, NORM_PIX_EPS), mask)


if _backend.EXT_LOADED:

    @torch.library.register_fake("umae::patch_mse")
    def _patch_mse_fake(pred, target, patch_size, norm_pix, eps):
        return pred.new_empty(pred.shape[:2], dtype=acc_dtype(pred.dtype))

    @torch.library.register_fake("umae::patch_mse_backward")
    def _patch_mse_backward_fake(grad_rows, pred, target, patch_size, norm_pix, eps):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)

    def _setup(ctx, inputs, output):
        pred, target, ctx.patch_size, ctx.norm_pix, ctx.eps = inputs
        ctx.save_for_backward(pred, target)

    def _backward(ctx, grad_rows):
        pred, target = ctx.saved_tensors
        # the kernel's gradient is not differentiable again: a second-order gradient raises (umae/_checks.py)
        grad = first_order_only("patch_mse (mae_loss, masked_mse_loss)", torch.ops.umae.patch_mse_backward,
                                grad_rows, pred, target, ctx.patch_size, ctx.norm_pix, ctx.eps)
        return grad, None, None, None, None

    torch.library.register_autograd("umae::patch_mse", _backward, setup_context=_setup)
