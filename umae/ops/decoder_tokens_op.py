"""VideoMAE's decoder input for a given mask, `cat([x_vis + pos[~mask], mask_token + pos[mask]], 1)`,
fused from two ops' kernels as they are: restore_tokens puts the visible tokens and the mask token back
in token order (ids_restore from the mask's ranks, no sort), then random_masking's op with the mask as
its noise and every token kept adds the positions and orders the rows visible first, masked after
(a stable order, as `x[~mask]` and `x[mask]`). Their C++ and Triton kernels and C++ autograd
(csrc/cpu/restore_tokens.cpp, csrc/cpu/random_masking.cpp, kernels/restore_tokens.py,
kernels/random_masking.py) serve; the price is one (B, N, D) write and read more than one kernel's."""
from __future__ import annotations

import torch

from . import _common, random_masking_op, restore_tokens_op


def decoder_tokens(x_vis: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """(B, N, D): `cat([x_vis + pos_vis, mask_token + pos_mask], 1)`, VideoMAE's decoder input
    (transformers' `VideoMAEForPreTraining`, MCG-NJU's `PretrainVisionTransformer`): x_vis (B, N_vis, D)
    the encoder's visible tokens (in ascending token order, as `visible_tokens` gives them), mask bool
    (B, N), True = masked, N_vis = N - masked in every row; pos_embed (1, N, D), gathered by ~mask then
    mask. The decoder's last N - N_vis rows are the masked tokens, ascending. Output dtype: type
    promotion of x_vis, mask_token and pos_embed, as the reference's adds and cat. Gradients reach
    x_vis, mask_token and pos_embed."""
    _common.tensor(x_vis, "x_vis", dims=3)
    B, n_vis, D = x_vis.shape
    _common.tensor(mask, "mask", dims=2, floating=False)
    N = mask.shape[1]
    _common.video_mask(mask, (B, N), x_vis, "x_vis", N - n_vis)
    _common.param(mask_token, "mask_token", (1, 1, D), x_vis)
    _common.param(pos_embed, "pos_embed", (1, N, D), x_vis)
    if mask_token is None:
        raise TypeError("mask_token is required (1, 1, D)")
    if (_common.fused(restore_tokens_op.RESTORE_TOKENS, (x_vis, mask_token, None), backend)
            and _common.fused(random_masking_op.RANDOM_MASKING, (x_vis, pos_embed, None), backend)):
        return decoder_tokens_fused(x_vis, mask, mask_token, pos_embed)
    return decoder_tokens_reference(x_vis, mask, mask_token, pos_embed)


def decoder_tokens_reference(x_vis, mask, mask_token, pos_embed=None):
    B, _, D = x_vis.shape
    if pos_embed is None:
        pos_embed = torch.zeros((), dtype=x_vis.dtype, device=x_vis.device)
    pos = pos_embed.expand(B, mask.shape[1], D)
    pos_vis, pos_mask = pos[~mask].reshape(B, -1, D), pos[mask].reshape(B, -1, D)
    return torch.cat([x_vis + pos_vis, mask_token + pos_mask], dim=1)


def ids_restore_of(mask: torch.Tensor) -> torch.Tensor:
    """The ids_restore random_masking gives for noise = mask: each token's row in the visible-then-masked order
    (visible: its rank among the visible; masked: N_vis + its rank among the masked). On the device."""
    masked = mask.cumsum(1)  # int64: the masked tokens up to and including each
    visible = torch.arange(1, mask.shape[1] + 1, device=mask.device) - masked
    return torch.where(mask, visible[:, -1:] + masked, visible) - 1


def decoder_tokens_fused(x_vis, mask, mask_token, pos_embed=None):
    N = mask.shape[1]
    full = restore_tokens_op.restore_tokens_fused(x_vis, ids_restore_of(mask), mask_token, None, False)
    return random_masking_op._RANDOM_MASKING(full, mask.to(torch.float32), pos_embed, None, N)[0]
