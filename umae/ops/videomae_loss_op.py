"""VideoMAE's reconstruction loss: the public op, the reference (MCG-NJU/VideoMAE
`engine_for_pretraining.py`; transformers' `VideoMAEForPreTraining` computes the same from
(B, T, C, H, W): pass it as the view `pixel_values.transpose(1, 2)`), the fused function, the fakes,
the Triton launchers' registration and the registry entry.

Where it runs: csrc/cpu/videomae_loss.cpp holds the schemas, the CPU kernel and the autograd (C++, for
every device: no Python between the call and the kernel, in the forward or the backward);
kernels/videomae_loss.py the Triton kernel, whose launchers register below at the CUDA key.
"""
from __future__ import annotations

import torch

from . import _common
from ._tolerance import LOSS_TOL, TOL, Parity
from ._common import CPP_CPU_TRITON_CUDA, Op, acc_dtype
from .tubelet_patchify_op import tubelets

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# the unnormalize constants as the op takes them, (2, C) (mean; std) on the device, made once per device and
# dtype (ImageNet's: keyed without the values); a list argument cost the dispatcher 1.4 us a call
_STATS: dict = {}
NORM_EPS = 1e-6  # added to the std, not the variance (VideoMAE's rule; image MAE adds 1e-6 to the variance)


def videomae_loss(pred: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor, patch_size: int, tubelet_size: int,
                  norm_pix: bool = True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, *,
                  backend: str | None = None) -> torch.Tensor:
    """VideoMAE's reconstruction loss, an fp32 scalar (fp64 for fp64 pred).

    videos (B, C, T, H, W), normalized with `mean` / `std`, are unnormalized (x * std + mean in
    fp32; mean=None, std=None: taken as they are) and tubelet patchified (`tubelet_patchify`); with
    norm_pix each token is normalized per channel over its ts*p*p values with the unbiased variance,
    (x - mean) / (sqrt(var) + 1e-6). The labels are the masked tokens (mask: bool (B, N), True =
    masked, the same count in every row) in ascending token order; the loss is the mean squared
    error over every label value against pred (B, masked tokens, ts*p*p*C). Any strides for videos
    (HF's layout as a view); `videos` takes no gradient (detach it). The math runs in fp32 for
    fp32 / bf16 / fp16 inputs; pred's gradient comes in pred's dtype. The mask's rows are checked on
    the device on CUDA (no host sync).
    """
    p, ts = _common.videos(videos, patch_size, tubelet_size)
    _common.tensor(pred, "pred", dims=3)
    _common.same_device(pred, "pred", videos, "videos")
    if videos.requires_grad:
        raise ValueError("videos is the target and takes no gradient; pass videos.detach()")
    if (pred.dtype == torch.float64) != (videos.dtype == torch.float64):
        raise TypeError(f"pred ({pred.dtype}) and videos ({videos.dtype}): float64 goes with float64 only")
    B, C, T, H, W = videos.shape
    N, K = (T // ts) * (H // p) * (W // p), ts * p * p * C
    if pred.dim() == 3 and (pred.shape[0] != B or pred.shape[2] != K):
        raise ValueError(f"pred must have shape (B, masked tokens, ts*p*p*C) = ({B}, *, {K}) for videos "
                         f"{tuple(videos.shape)}, patch_size {p} and tubelet_size {ts}, got {tuple(pred.shape)}")
    fused = _common.fused(VIDEOMAE_LOSS, (pred, videos), backend)
    # fused, the kernels check the rows (C++ as it ranks the tokens; the Triton launcher on the device)
    _common.video_mask(mask, (B, N), pred, "pred", pred.shape[1], rows=not fused)
    mean, std = _stats(mean, std, C)
    if norm_pix and ts * p * p < 2:
        raise ValueError("norm_pix needs at least 2 values per token and channel (unbiased variance)")
    if fused:
        return videomae_loss_fused(pred, videos, mask, p, ts, norm_pix, mean, std)
    return videomae_loss_reference(pred, videos, mask, p, ts, norm_pix, mean, std)


def _stats(mean, std, C: int):
    """mean and std as tuples of C floats, or both None."""
    if mean is IMAGENET_DEFAULT_MEAN and std is IMAGENET_DEFAULT_STD and C == 3:
        return mean, std  # the default, as it is (a call's host time)
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: both given, or both None")
    if mean is None:
        return None, None
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise TypeError(f"mean and std must be sequences of numbers, got {mean!r} and {std!r}") from None
    if len(mean) != C or len(std) != C:
        raise ValueError(f"mean and std need one value per channel ({C}), got {len(mean)} and {len(std)}")
    return mean, std


def videomae_loss_reference(pred, videos, mask, p, ts, norm_pix=True, mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD):
    B, C = videos.shape[:2]
    x = videos.to(acc_dtype(videos.dtype))
    if mean is not None:
        shape = (1, C, 1, 1, 1)
        x = x * torch.tensor(std, dtype=x.dtype, device=x.device).view(shape) + torch.tensor(
            mean, dtype=x.dtype, device=x.device).view(shape)
    x = tubelets(x, p, ts)  # B, N, ts*p*p, C
    if norm_pix:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + NORM_EPS)
    N, K = x.shape[1], x.shape[2] * C
    labels = x.reshape(B, N, K)[mask].reshape(B, -1, K)
    return (pred.to(x.dtype) - labels).pow(2).mean()


def videomae_loss_fused(pred, videos, mask, p, ts, norm_pix=True, mean=IMAGENET_DEFAULT_MEAN,
                        std=IMAGENET_DEFAULT_STD):
    """umae::videomae_loss: the C++ kernel on CPU (csrc/cpu/videomae_loss.cpp, with the autograd), the
    Triton kernel on CUDA (kernels/videomae_loss.py)."""
    stats = None
    if mean is not None:
        dtype = acc_dtype(videos.dtype)  # fp64 constants for fp64 videos, as the reference's
        if mean is IMAGENET_DEFAULT_MEAN and std is IMAGENET_DEFAULT_STD:  # the default: no tuples to hash
            key = (videos.device, dtype)
        else:
            mean, std = tuple(mean), tuple(std)
            key = (mean, std, videos.device, dtype)
        stats = _common.device_constant(_STATS, key, videos, lambda device=videos.device: torch.tensor(
            [mean, std], dtype=dtype, device=device))
    return _LOSS(pred, videos, mask, stats, p, ts, norm_pix, NORM_EPS)


_LOSS = None
if _common.EXT_LOADED:
    _LOSS = torch.ops.umae.videomae_loss.default

    @torch.library.register_fake("umae::videomae_loss")
    def _loss_fake(pred, videos, mask, stats, p, ts, norm_pix, eps):
        return pred.new_empty((), dtype=acc_dtype(pred.dtype))

    @torch.library.register_fake("umae::videomae_loss_backward")
    def _backward_fake(grad, pred, videos, mask, stats, p, ts, norm_pix, eps):
        return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)

KERNELS = TRITON_KERNELS = None
if _common.TRITON_USABLE:
    from ..kernels import videomae_loss as KERNELS

    def _rows(pred):
        if pred.dtype == torch.float64:  # the public op runs the reference for it
            raise TypeError("umae::videomae_loss: the Triton kernel takes float32, bfloat16 or float16 pred, not "
                            "float64; use the reference")
        return pred if pred.stride(2) == 1 else pred.contiguous()

    def _triton_loss(pred, videos, mask, stats, p, ts, norm_pix, eps):
        return KERNELS.forward(_rows(pred), videos, mask.contiguous(), stats, p, ts, norm_pix, eps)

    def _triton_backward(grad, pred, videos, mask, stats, p, ts, norm_pix, eps):
        pred = _rows(pred)
        out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
        KERNELS.backward(grad, pred, videos, mask.contiguous(), stats, p, ts, norm_pix, eps, out)
        return out

    TRITON_KERNELS = {"videomae_loss": _triton_loss, "videomae_loss_backward": _triton_backward}
    _common.register_kernels(TRITON_KERNELS, "CUDA")


VIDEOMAE_LOSS = Op("videomae_loss", "umae::videomae_loss", videomae_loss, videomae_loss_reference,
                   videomae_loss_fused, CPP_CPU_TRITON_CUDA, kernels=KERNELS, triton_kernels=TRITON_KERNELS,
                   parity=Parity(LOSS_TOL, TOL, out_scaled=True, grad_scaled=True))
