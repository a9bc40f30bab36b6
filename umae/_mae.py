"""MAE's glue on any model with facebookresearch/mae's attribute names (patch_embed, pos_embed,
cls_token, blocks, norm, decoder_*, mask_token): one copy for umae's own models
(umae/models/mae.py) and umae.patch's MAE-style swaps (umae/patching.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops


def from_arch_config(cls, config: dict, **kwargs):
    """cls (umae's image or video model) of an `arch_config()` dict: its LayerNorm eps (`norm_eps`,
    1e-6 where a checkpoint predates it) as the norm layer; kwargs: fused, lamb, ..."""
    from functools import partial

    config = dict(config)
    eps = config.pop("norm_eps", 1e-6)
    return cls(**config, norm_layer=partial(nn.LayerNorm, eps=eps), **kwargs)


def conv_tokens(proj: nn.Conv2d, imgs: torch.Tensor) -> torch.Tensor:
    """A patch-embedding conv's tokens (N, L, D), contiguous: the conv runs with its weight viewed
    channels_last, so it writes NHWC and flatten + transpose is a view (NCHW gives strides
    (L*D, 1, L)). Same values as proj(imgs).flatten(2).transpose(1, 2)."""
    w = proj.weight.contiguous(memory_format=torch.channels_last)
    return F.conv2d(imgs, w, proj.bias, stride=proj.stride, padding=proj.padding).flatten(2).transpose(1, 2)


def embed_tokens(patch_embed, imgs: torch.Tensor) -> torch.Tensor:
    """A timm-style PatchEmbed (conv `proj`, flattened tokens, `norm`) with contiguous tokens
    (conv_tokens): with timm's own (L*D, 1, L) strides the masking gather would touch every
    32-byte sector of x to keep 25% of its rows. Same values (CPU: bitwise). Any other patch
    embedding runs as it is."""
    pe = patch_embed
    if not isinstance(getattr(pe, "proj", None), nn.Conv2d) or not getattr(pe, "flatten", True) \
            or getattr(pe, "dynamic_img_pad", False):
        return pe(imgs)
    size = getattr(pe, "img_size", None)
    if size is not None and getattr(pe, "strict_img_size", True) and tuple(imgs.shape[-2:]) != tuple(size):
        raise ValueError(f"imgs must be {tuple(size)} pixels, got {tuple(imgs.shape[-2:])}")
    x = conv_tokens(pe.proj, imgs)
    return pe.norm(x) if hasattr(pe, "norm") else x


def run_blocks(model, blocks, x):
    """The blocks in order; with `model.grad_checkpointing` and a backward to come, each block's
    activations are recomputed in the backward instead of kept (timm's set_grad_checkpointing)."""
    ckpt = getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
    return x


def encode(m, imgs, mask_ratio, noise=None, *, backend=None, token_layout: bool = True):
    """MAE's forward_encoder: patch embed, then + pos_embed, random masking, gather of the kept
    tokens and cls prepend in one op, the blocks and the final norm. token_layout: the patch
    embedding through embed_tokens (else the module as it is)."""
    x = embed_tokens(m.patch_embed, imgs) if token_layout else m.patch_embed(imgs)
    x, mask, ids_restore = ops.random_masking(x, mask_ratio, noise, pos_embed=m.pos_embed[:, 1:, :],
                                              cls_token=m.cls_token + m.pos_embed[:, :1, :], backend=backend)
    return m.norm(run_blocks(m, m.blocks, x)), mask, ids_restore


def cls_feature(latent, norm=None):
    """The encoder's cls feature for U-MAE's term: latent[:, 0], or norm(latent[:, 0]) where
    U-MAE's official forward applies the encoder norm a second time (norm(latent)[:, 0]; the
    norm is per row, so only the cls row is normed)."""
    cls = latent[:, 0]
    return cls if norm is None else norm(cls)


def decode(m, x, ids_restore, *, backend=None):
    """MAE's forward_decoder: mask tokens, unshuffle, cls and + decoder_pos_embed in one op, the
    blocks, norm and prediction; the cls row dropped."""
    x = ops.restore_tokens(m.decoder_embed(x), ids_restore, m.mask_token, pos_embed=m.decoder_pos_embed,
                           has_cls=True, backend=backend)
    # the cls row dropped before the (row-wise) norm and prediction: its output is not computed, and the
    # prediction is a tensor of its own, not a view (FSDP2 warns about a view among a module's outputs)
    return m.decoder_pred(m.decoder_norm(run_blocks(m, m.decoder_blocks, x)[:, 1:, :]))
