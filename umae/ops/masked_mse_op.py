"""MAE's reconstruction loss: the public ops, the references (facebookresearch/mae
`forward_loss`, math in fp32), the fused functions, the fakes of the one custom op umae::patch_mse,
and the registry entries.

Where it runs: csrc/cpu/masked_mse.cpp holds the schemas, the CPU kernel and the autograd (C++, for
every device: no Python between the call and the kernel, in the forward or the backward);
csrc/cuda/masked_mse.cu the CUDA kernel. The kernels compute the per-patch error (N, L) and its
masked mean over the removed patches, with the reference's edge cases: a mask with no removed patch
gives 0 (and zero gradient), NaN propagates.
"""
from __future__ import annotations

import torch

from . import _common
from ._tolerance import LOSS_TOL, TOL, Parity
from ._common import CPP_CUDA_NO_FP64, Op, acc_dtype
from .patchify_op import patchify_reference

NORM_PIX_EPS = 1e-6  # MAE's; the kernels take it as an argument


def _check_loss_args(pred, target, mask, target_name: str, expected_target_shape=None):
    _common.tensor(pred, "pred", dims=3)
    _common.tensor(target, target_name)  # floating: an int, uint8 or complex target has no MSE here
    _common.tensor(mask, "mask", dims=2, floating=False)
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a floating or bool tensor (1 = removed), got {mask.dtype}")
    _common.same_device(pred, "pred", target, target_name)
    _common.same_device(pred, "pred", mask, "mask")
    _common.nonempty_batch(pred, "pred")
    if expected_target_shape is not None:
        _common.shape(target, target_name, expected_target_shape, "(the shape of pred)")
    _common.shape(mask, "mask", (pred.size(0), pred.size(1)), "(N, L of pred)")
    if (pred.dtype == torch.float64) != (target.dtype == torch.float64):
        raise TypeError(f"pred ({pred.dtype}) and {target_name} ({target.dtype}): float64 goes with float64 only")


def _check_norm_pix(norm_pix: bool, K: int) -> None:
    if norm_pix and K < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch (unbiased variance), pred has K={K}")


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    norm_pix: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """MAE's `forward_loss` on a patchified target (N, L, K); fp32 scalar.

    With norm_pix, each target patch is normalized by its mean and unbiased variance
    (eps NORM_PIX_EPS = 1e-6). The squared error is averaged over K, then over the removed
    patches (mask == 1). A mask with no removed patch gives 0 (and zero gradient), not NaN.
    NaN in pred or target propagates to the loss, as in the reference. The math runs in fp32 for
    fp32 / bf16 / fp16 inputs (fp64 stays fp64); the gradient reaches `pred` in its dtype, and a
    float `mask` that requires grad gets the reference's. norm_pix needs 2 values per patch at
    least; an empty batch is an error. A `target` that requires grad is refused by the fused
    loss (it differentiates `pred` only: detach it, or use the reference).
    """
    _check_loss_args(pred, target, mask, "target", pred.shape)
    _check_norm_pix(norm_pix, pred.size(2))
    if _common.fused(MASKED_MSE_LOSS, (pred, target), backend):
        return masked_mse_loss_fused(pred, target, mask, norm_pix)
    return masked_mse_loss_reference(pred, target, mask, norm_pix=norm_pix)


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """`masked_mse_loss(pred, patchify(imgs, patch_size), mask, norm_pix)` with patchify fused in:
    the (normalized) target is never written to memory."""
    p = _common.images(imgs, patch_size)
    N, C, H, W = imgs.shape
    _check_loss_args(pred, imgs, mask, "imgs")
    if pred.shape != (N, (H // p) * (W // p), p * p * C):
        raise ValueError(f"pred must have shape (N, L, p*p*C) = {(N, (H // p) * (W // p), p * p * C)} "
                         f"for imgs {tuple(imgs.shape)} and patch_size {p}, got {tuple(pred.shape)}")
    _check_norm_pix(norm_pix, pred.size(2))
    if _common.fused(MAE_LOSS, (pred, imgs), backend):
        return mae_loss_fused(pred, imgs, mask, p, norm_pix)
    return mae_loss_reference(pred, imgs, mask, p, norm_pix=norm_pix)


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


def masked_mse_loss_fused(pred, target, mask, norm_pix=True):
    """umae::patch_mse on a patchified target: the C++ kernel on CPU (csrc/cpu/masked_mse.cpp, with the
    autograd, which refuses a target that requires grad), the CUDA kernel (csrc/cuda/masked_mse.cu)."""
    return _PATCH_MSE(pred, target, mask, 0, norm_pix, NORM_PIX_EPS)


def mae_loss_fused(pred, imgs, mask, patch_size, norm_pix=True):
    """umae::patch_mse on the images, patchified by the kernel as it reads them."""
    return _PATCH_MSE(pred, imgs, mask, patch_size, norm_pix, NORM_PIX_EPS)


_PATCH_MSE = None
if _common.EXT_LOADED:
    _PATCH_MSE = torch.ops.umae.patch_mse.default

    @torch.library.register_fake("umae::patch_mse")
    def _patch_mse_fake(pred, target, mask, patch_size, norm_pix, eps):
        return pred.new_empty((), dtype=acc_dtype(pred.dtype))

    @torch.library.register_fake("umae::patch_mse_with_rows")
    def _patch_mse_with_rows_fake(pred, target, mask, patch_size, norm_pix, eps):
        acc = acc_dtype(pred.dtype)
        return pred.new_empty((), dtype=acc), pred.new_empty(pred.shape[:2], dtype=acc)

    @torch.library.register_fake("umae::patch_mse_backward")
    def _patch_mse_backward_fake(grad, mask, pred, target, patch_size, norm_pix, eps):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


MASKED_MSE_LOSS = Op("masked_mse_loss", "umae::patch_mse", masked_mse_loss, masked_mse_loss_reference,
                     masked_mse_loss_fused, CPP_CUDA_NO_FP64,
                     parity=Parity(LOSS_TOL, TOL, out_scaled=True, grad_scaled=True))
MAE_LOSS = Op("mae_loss", "umae::patch_mse", mae_loss, mae_loss_reference, mae_loss_fused, CPP_CUDA_NO_FP64,
              parity=Parity(LOSS_TOL, TOL, out_scaled=True, grad_scaled=True))
