"""VideoMAE / U-MAE video ViTs with MCG-NJU/VideoMAE's structure (modeling_pretrain.py:
PretrainVisionTransformer) and numerics, on timm's Block, with every glue op routed through umae
(fused) or its reference.

Reads top to bottom like MCG-NJU's model: the tubelet embedding (a Conv3d) plus fixed sin-cos
positions and the visible tokens (`visible_tokens`), the encoder blocks and norm; the decoder input
(`decoder_tokens`: the visible tokens and the mask token with their positions, visible first), the
decoder blocks, norm and head on the masked tokens; VideoMAE's loss (`videomae_loss`), plus U-MAE's
uniformity term on the mean of the encoder's visible tokens (VideoMAE has no cls token).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from .. import ops
from .._mae import from_arch_config, run_blocks


class VideoMAEOutput(NamedTuple):
    loss: torch.Tensor  # loss_mae + lamb * loss_unif
    loss_mae: torch.Tensor
    loss_unif: torch.Tensor
    pred: torch.Tensor  # (B, masked tokens, ts*p*p*C), the masked tokens ascending
    mask: torch.Tensor  # (B, N) bool, True = masked
    latent: torch.Tensor  # (B, visible tokens, D), after the encoder norm


def get_sinusoid_encoding_table(n_position: int, d_hid: int) -> torch.Tensor:
    """VideoMAE's fixed 1-D sin-cos table (1, n_position, d_hid), fp32, computed in float64 as its numpy
    code does: angle pos / 10000^(2 * (j // 2) / d_hid), sin on even j, cos on odd j."""
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(d_hid)
    table = pos / np.power(10000, 2 * (j // 2) / d_hid)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


class VideoMaskedAutoencoderViT(nn.Module):
    """VideoMAE with a ViT backbone; video U-MAE when lamb > 0.

    Input clips (B, C, T, H, W), normalized with `mean` / `std` (ImageNet's by default; None: the
    loss takes the clips as they are); tubelets of tubelet_size frames and patch_size pixels square.
    forward(videos, mask=None, num_masked=None): mask bool (B, N), True = masked, the same count per
    row (tube masks: umae.tube_mask, drawn in the loader); without one, the model draws a tube mask of
    mask_ratio on the device (no host sync). Given a mask without num_masked, its count is read (one
    host sync). fused=True: umae's fused kernels (obeying umae.set_backend / use_backend); False: the
    references.
    """

    def __init__(self, img_size=224, patch_size=16, num_frames=16, tubelet_size=2, in_chans=3, embed_dim=768,
                 depth=12, num_heads=12, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6,
                 mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, norm_pix_loss=True,
                 mask_ratio=0.9, lamb=0.0, fused=True, exclude_diagonal=False, exact_ddp_grad=True,
                 mean=ops.videomae_loss_op.IMAGENET_DEFAULT_MEAN, std=ops.videomae_loss_op.IMAGENET_DEFAULT_STD,
                 drop_path_rate=0.0):
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size} and num_frames "
                             f"{num_frames} by tubelet_size {tubelet_size}")
        self.img_size, self.patch_size, self.num_frames, self.tubelet_size = img_size, patch_size, num_frames, tubelet_size
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.norm_pix_loss, self.mask_ratio, self.lamb, self.fused = bool(norm_pix_loss), float(mask_ratio), float(lamb), bool(fused)
        self.exclude_diagonal, self.exact_ddp_grad = exclude_diagonal, exact_ddp_grad
        self.mean, self.std = mean, std
        self.unif_process_group = None  # set by a trainer under DDP: uniformity over the global batch
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        n = self.grid[0] * self.grid[1] * self.grid[2]
        # encoder
        self.patch_embed = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                                     stride=(tubelet_size, patch_size, patch_size))
        self.register_buffer("pos_embed", get_sinusoid_encoding_table(n, embed_dim), persistent=False)
        dpr = [float(drop_path_rate) * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                                           norm_layer=norm_layer) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        # decoder
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", get_sinusoid_encoding_table(n, decoder_embed_dim), persistent=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                                   norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.head = nn.Linear(decoder_embed_dim, tubelet_size * patch_size ** 2 * in_chans)
        self.initialize_weights()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, plus a checkpoint file's `{"model": state_dict}` (umae's and MCG-NJU's) unwrapped,
        and MCG-NJU/VideoMAE's parameter names (`encoder.blocks.0.attn.q_bias`, ...) read as umae's."""
        if "model" in state_dict and isinstance(state_dict["model"], dict):
            state_dict = state_dict["model"]
        if "encoder.patch_embed.proj.weight" in state_dict:
            state_dict = from_videomae_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def backend(self) -> str | None:
        """The per-call backend of this model's ops: None follows umae's global switch."""
        return None if self.fused else "reference"

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def arch_config(self) -> dict:
        """The architecture as plain values (recorded in every checkpoint umae writes): `from_config`
        rebuilds it."""
        blk, dblk = self.blocks[0], self.decoder_blocks[0]
        return dict(img_size=self.img_size, patch_size=self.patch_size, num_frames=self.num_frames,
                    tubelet_size=self.tubelet_size, in_chans=self.in_chans, embed_dim=self.embed_dim,
                    depth=len(self.blocks), num_heads=blk.attn.num_heads,
                    decoder_embed_dim=self.mask_token.shape[-1], decoder_depth=len(self.decoder_blocks),
                    decoder_num_heads=dblk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / self.embed_dim,
                    norm_eps=self.norm.eps, norm_pix_loss=self.norm_pix_loss)

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> "VideoMaskedAutoencoderViT":
        """A model of `config`'s architecture (`arch_config()`'s dict); kwargs: fused, lamb, ..."""
        return from_arch_config(cls, config, **kwargs)

    def initialize_weights(self):
        # MCG-NJU's: xavier-uniform Linear weights, zero biases, unit LayerNorms; the mask token trunc-normal
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def num_masked(self) -> int:
        """The tokens a tube mask of mask_ratio masks per clip (umae.tube_mask's count)."""
        t, h, w = self.grid
        return t * int(self.mask_ratio * h * w)

    def tube_mask(self, batch: int, device) -> tuple[torch.Tensor, int]:
        """(a tube mask of mask_ratio drawn on `device`, its masked count per row)."""
        return ops.tube_mask(batch, *self.grid, self.mask_ratio, device=device), self.num_masked

    def forward_encoder(self, videos, mask, num_masked=None):
        """The visible tokens (B, N_vis, D) after the blocks and the norm."""
        x = self.patch_embed(videos).flatten(2).transpose(1, 2)  # (B, N, D), tokens ordered (t, h, w)
        x = ops.visible_tokens(x, mask, self.pos_embed.to(x.dtype), num_masked, backend=self.backend)
        return self.norm(run_blocks(self, self.blocks, x))

    def forward_decoder(self, latent, mask):
        """The prediction of the masked tokens (B, N_masked, ts*p*p*C), ascending."""
        x = ops.decoder_tokens(self.encoder_to_decoder(latent), mask, self.mask_token,
                               self.decoder_pos_embed.to(latent.dtype), backend=self.backend)
        x = run_blocks(self, self.decoder_blocks, x)
        return self.head(self.decoder_norm(x[:, latent.shape[1]:]))

    @torch.no_grad()
    def features(self, videos, pool: str = "mean") -> torch.Tensor:
        """The encoder's features of whole clips (no token masked), mean-pooled over the tokens: the
        feature VideoMAE's classifier pools (and U-MAE's term here takes over the visible ones)."""
        if pool != "mean":
            raise ValueError(f"pool {pool!r}: a video model has no cls token; its feature is the mean token ('mean')")
        x = self.patch_embed(videos).flatten(2).transpose(1, 2) + self.pos_embed.to(videos.dtype)
        return self.norm(run_blocks(self, self.blocks, x)).mean(dim=1)

    def forward(self, videos, mask=None, num_masked=None) -> VideoMAEOutput:
        if mask is None:
            mask, num_masked = self.tube_mask(videos.shape[0], videos.device)
        latent = self.forward_encoder(videos, mask, num_masked)
        pred = self.forward_decoder(latent, mask)
        loss_mae = ops.videomae_loss(pred, videos.detach(), mask, self.patch_size, self.tubelet_size,
                                     self.norm_pix_loss, self.mean, self.std, backend=self.backend)
        if self.lamb > 0:
            loss_unif = ops.uniformity_loss(latent.mean(dim=1), exclude_diagonal=self.exclude_diagonal,
                                            process_group=self.unif_process_group,
                                            exact_ddp_grad=self.exact_ddp_grad, backend=self.backend)
            loss = loss_mae + self.lamb * loss_unif
        else:
            loss_unif = torch.zeros((), device=loss_mae.device)
            loss = loss_mae
        return VideoMAEOutput(loss, loss_mae, loss_unif, pred, mask, latent)


# (umae prefix, MCG-NJU prefix) of the tensors whose names differ only there
_MCG = (("patch_embed.", "encoder.patch_embed.proj."), ("blocks.", "encoder.blocks."), ("norm.", "encoder.norm."),
        ("decoder_blocks.", "decoder.blocks."), ("decoder_norm.", "decoder.norm."), ("head.", "decoder.head."))


def from_videomae_state_dict(state: dict) -> dict:
    """MCG-NJU/VideoMAE's pretraining state dict (PretrainVisionTransformer) in umae's names: its q_bias
    and v_bias become qkv.bias with a zero key bias (its attention's own); its sin-cos tables are not in it."""
    out = {}
    for k, v in state.items():
        for ours, theirs in _MCG:
            if k.startswith(theirs):
                k = ours + k[len(theirs):]
                break
        if k.endswith(".attn.q_bias"):
            pre = k[:-len("q_bias")]
            v = torch.cat([v, torch.zeros_like(v), state[_mcg_name(pre + "v_bias")]])
            k = pre + "qkv.bias"
        elif k.endswith(".attn.v_bias"):
            continue
        out[k] = v
    return out


def to_videomae_state_dict(state: dict) -> dict:
    """umae's video state dict in MCG-NJU's names (PretrainVisionTransformer's `model` entry). qkv.bias
    becomes q_bias and v_bias: MCG-NJU's attention has no key bias, and dropping it changes no output (it
    adds one number to every score of a query, which the softmax cancels)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.qkv.bias"):
            q, _, val = v.chunk(3)
            pre = k[:-len("qkv.bias")]
            for name, t in (("q_bias", q), ("v_bias", val)):
                out[_mcg_name(pre + name)] = t.clone()
            continue
        out[_mcg_name(k)] = v
    return out


def _mcg_name(k: str) -> str:
    for ours, theirs in _MCG:
        if k.startswith(ours):
            return theirs + k[len(ours):]
    return k


# name -> (img, patch, frames, tubelet, dim, depth, heads, decoder dim, decoder depth, decoder heads)
VIDEO_CONFIGS = {
    # MCG-NJU's pretrain_videomae_*_patch16_224, with the decoder depth their pretraining scripts pass (4)
    "umae_videomae_small_patch16_224": (224, 16, 16, 2, 384, 12, 6, 192, 4, 3),
    "umae_videomae_base_patch16_224": (224, 16, 16, 2, 768, 12, 12, 384, 4, 6),
    "umae_videomae_large_patch16_224": (224, 16, 16, 2, 1024, 24, 16, 512, 4, 8),
    # for tests and CPU runs: 4 frames of 32 x 32, patch 4, 2 + 1 blocks
    "umae_videomae_micro_patch4_32": (32, 4, 4, 2, 64, 2, 2, 64, 1, 2),
}


def build_video(name: str, pretrained: bool = False, **kwargs) -> VideoMaskedAutoencoderViT:
    """The named config, any of its values overridden by keyword. umae registers no weights."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights of its own; load a state dict into it")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args"):
        kwargs.pop(k, None)
    img, p, frames, ts, d, depth, heads, dd, ddepth, dheads = VIDEO_CONFIGS[name]
    cfg = dict(img_size=img, patch_size=p, num_frames=frames, tubelet_size=ts, embed_dim=d, depth=depth,
               num_heads=heads, decoder_embed_dim=dd, decoder_depth=ddepth, decoder_num_heads=dheads)
    return VideoMaskedAutoencoderViT(**{**cfg, **kwargs})
