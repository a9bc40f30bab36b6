"""VideoMAE's glue, the references: tubelet patchify and its inverse, and the video reconstruction
loss (MCG-NJU/VideoMAE `engine_for_pretraining.py`; transformers' `VideoMAEForPreTraining`, which
computes the same from (B, T, C, H, W): pass it here as the view `pixel_values.transpose(1, 2)`).

These define the semantics the fused video ops will be held to; until those land they are not in
the registry nor in `umae`'s public names.
"""
from __future__ import annotations

import torch

from . import _common
from .tube_mask_op import check_mask

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
NORM_EPS = 1e-6  # added to the std, not the variance (VideoMAE's rule; image MAE adds 1e-6 to the variance)


def _video_geometry(videos, patch_size, tubelet_size, name: str = "videos") -> tuple[int, int]:
    """(p, ts) checked against videos (B, C, T, H, W): T divisible by ts, H and W by p."""
    _common.tensor(videos, name, dims=5)
    p = _common.patch_size_int(patch_size)
    ts = _common.as_int(tubelet_size)
    if ts is None or ts <= 0:
        raise ValueError(f"tubelet_size must be a positive int, got {tubelet_size!r}")
    C, T, H, W = videos.shape[1:]
    if 0 in (C, T, H, W):
        raise ValueError(f"{name} must have at least one channel, frame, row and column, got shape {tuple(videos.shape)}")
    if T % ts:
        raise ValueError(f"{name} frames ({T}) must be divisible by tubelet_size {ts}")
    if H % p or W % p:
        raise ValueError(f"{name} height and width ({H}, {W}) must be divisible by patch_size {p}")
    return p, ts


def _tubelets(videos, p: int, ts: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, ts*p*p, C): tokens ordered (t, h, w), a token's values (p0, p1, p2) by C."""
    B, C, T, H, W = videos.shape
    x = videos.reshape(B, C, T // ts, ts, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # B, t, h, w, p0, p1, p2, C
    return x.reshape(B, (T // ts) * (H // p) * (W // p), ts * p * p, C)


def tubelet_patchify_reference(videos: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, ts*p*p*C), N = T/ts * H/p * W/p tokens ordered (t, h, w), a token's
    values ordered (p0, p1, p2, c), p0 the frame inside the tubelet: VideoMAE's label layout."""
    p, ts = _video_geometry(videos, patch_size, tubelet_size)
    x = _tubelets(videos, p, ts)
    return x.reshape(x.shape[0], x.shape[1], -1)


def tubelet_unpatchify_reference(x: torch.Tensor, patch_size: int, tubelet_size: int, frames: int, height: int,
                                 width: int) -> torch.Tensor:
    """(B, N, ts*p*p*C) -> (B, C, T, H, W), the exact inverse of `tubelet_patchify_reference`."""
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
    if N != t * h * w or K % (ts * p * p):
        raise ValueError(f"x must have shape (B, {t * h * w}, ts*p*p*C) for {T} x {H} x {W} at tubelet {ts} and "
                         f"patch {p}, got {tuple(x.shape)}")
    C = K // (ts * p * p)
    v = x.reshape(B, t, h, w, ts, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)  # B, C, t, p0, h, p1, w, p2
    return v.reshape(B, C, T, H, W)


def videomae_loss_reference(pred: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor, patch_size: int,
                            tubelet_size: int, norm_pix: bool = True, mean=IMAGENET_DEFAULT_MEAN,
                            std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """VideoMAE's reconstruction loss, an fp32 scalar: the videos (B, C, T, H, W), normalized with
    `mean` / `std`, unnormalized (x * std + mean in fp32; mean=None, std=None: as given), tubelet
    patchified; with norm_pix each token normalized per channel over its ts*p*p values, with the
    unbiased variance, (x - mean) / (sqrt(var) + 1e-6); the labels are the masked tokens in ascending
    token order; the mean squared error over every label value against pred (B, N_masked, ts*p*p*C)."""
    p, ts = _video_geometry(videos, patch_size, tubelet_size)
    _common.tensor(pred, "pred", dims=3)
    _common.same_device(pred, "pred", videos, "videos")
    if videos.requires_grad:
        raise ValueError("videos is the target and takes no gradient; pass videos.detach()")
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: both given, or both None")
    B, C, T, H, W = videos.shape
    N, K = (T // ts) * (H // p) * (W // p), ts * p * p * C
    n_masked = check_mask(mask, (B, N), pred, "pred")
    _common.shape(pred, "pred", (B, n_masked, K), "(B, masked tokens, ts*p*p*C)")
    x = videos.float()
    if mean is not None:
        if len(mean) != C or len(std) != C:
            raise ValueError(f"mean and std need one value per channel ({C}), got {len(mean)} and {len(std)}")
        shape = (1, C, 1, 1, 1)
        x = x * torch.tensor(std, dtype=torch.float32, device=x.device).view(shape) + torch.tensor(
            mean, dtype=torch.float32, device=x.device).view(shape)
    x = _tubelets(x, p, ts)  # B, N, ts*p*p, C
    if norm_pix:
        if ts * p * p < 2:
            raise ValueError("norm_pix needs at least 2 values per token and channel (unbiased variance)")
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + NORM_EPS)
    labels = x.reshape(B, N, K)[mask].reshape(B, n_masked, K)
    return (pred.float() - labels).pow(2).mean()
