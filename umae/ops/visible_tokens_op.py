"""VideoMAE's encoder input for a given mask, `x[~mask]` (+ the positions), fused: random_masking's
custom op with the mask as its noise. A stable order of the noise (0 for a visible token, 1 for a
masked one) keeps the visible tokens first, in ascending token order: exactly `x[~mask]`. So its C++
and Triton kernels and its C++ autograd (csrc/cpu/random_masking.cpp, kernels/random_masking.py)
serve as they are."""
from __future__ import annotations

import torch

from . import _common, random_masking_op


def visible_tokens(x: torch.Tensor, mask: torch.Tensor, pos_embed: torch.Tensor | None = None,
                   num_masked: int | None = None, *, backend: str | None = None) -> torch.Tensor:
    """(x + pos_embed)[~mask] as (B, N - num_masked, D): the visible tokens of x (B, N, D) in
    ascending token order, pos_embed (1, N, D) added (VideoMAE's encoder, transformers'
    `embeddings[~bool_masked_pos]`). mask: bool (B, N), True = masked, the same count in every row
    (tube masking). num_masked: that count; without it, it is read from mask's first row (a host
    sync, as the boolean index has). A row with another count is refused (_common.video_mask:
    given num_masked, on CUDA by a device-side assert, no host sync)."""
    _common.tensor(x, "x", dims=3)
    B, N, D = x.shape
    n = _common.video_mask(mask, (B, N), x, "x", num_masked)
    _common.param(pos_embed, "pos_embed", (1, N, D), x)
    if _common.fused(random_masking_op.RANDOM_MASKING, (x, pos_embed, None), backend):
        return random_masking_op._RANDOM_MASKING(x, mask.to(torch.float32), pos_embed, None, N - n)[0]
    return visible_tokens_reference(x, mask, pos_embed)


def visible_tokens_reference(x, mask, pos_embed=None):
    if pos_embed is not None:
        x = x + pos_embed
    return x[~mask].reshape(x.shape[0], -1, x.shape[2])
