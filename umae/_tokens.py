"""Patch-embedding tokens laid out for umae's kernels (used by umae's models and umae.patch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_tokens(proj: nn.Conv2d, imgs: torch.Tensor) -> torch.Tensor:
    """A patch-embedding conv's tokens (N, L, D), contiguous: the conv runs with its weight viewed
    channels_last, so it writes NHWC and flatten + transpose is a view (NCHW gives strides
    (L*D, 1, L)). Same values as proj(imgs).flatten(2).transpose(1, 2)."""
    w = proj.weight.contiguous(memory_format=torch.channels_last)
    return F.conv2d(imgs, w, proj.bias, stride=proj.stride, padding=proj.padding).flatten(2).transpose(1, 2)
