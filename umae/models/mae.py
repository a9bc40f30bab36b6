"""MAE / U-MAE ViT with facebookresearch/mae's structure and numerics, on timm's Block and
PatchEmbed, with every glue op routed through umae (fused) or its reference.

Reads top to bottom like MAE's models_mae.py: forward_encoder (patch embed, masking with the
positional embedding and cls token), forward_decoder (restore with mask tokens), forward_loss
(norm_pix MSE on removed patches), plus U-MAE's uniformity term on the encoder's cls feature.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .. import _mae, ops
from .timm_api import TimmEncoderAPI, check_timm_kwargs


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # loss_mae + lamb * loss_unif
    loss_mae: torch.Tensor
    loss_unif: torch.Tensor
    pred: torch.Tensor  # (N, L, p*p*C)
    mask: torch.Tensor  # (N, L), 1 = removed
    latent: torch.Tensor  # (N, 1 + len_keep, D), after the encoder norm
    loss_probe: torch.Tensor | None = None  # the online probe's cross-entropy (in `loss`; it trains only the probe)
    probe_correct: torch.Tensor | None = None  # its correct predictions in this batch (a count, on the device)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
    """MAE's fixed 2-D sin-cos positional embedding (float64 numpy, (1 + )h*w x D)."""
    gh, gw = np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_h, grid_w)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


class MaskedAutoencoderViT(TimmEncoderAPI, nn.Module):
    """MAE with a ViT backbone; U-MAE when lamb > 0.

    Every glue op goes through umae's public ops. fused=True: the fused kernels, obeying
    umae.set_backend / use_backend; fused=False: this model's ops run the references.
    timm's VisionTransformer keywords, with its meaning (umae/models/timm_api.py): num_classes (a
    classifier: model(x) gives logits), global_pool ('token'; 'avg': fc_norm of the mean patch
    token, the final norm dropped; ''), fc_norm, drop_rate (before the head), pos_drop_rate,
    proj_drop_rate, attn_drop_rate, drop_path_rate (the encoder's), qkv_bias; those of its options
    this architecture cannot honour are refused by name.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True, lamb=0.01, fused=True,
                 exclude_diagonal=False, exact_ddp_grad=True, cls_double_norm=True, probe_classes=0,
                 num_classes=None, global_pool="token", drop_path_rate=0.0, qkv_bias=True, drop_rate=0.0,
                 pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, fc_norm=None, **timm_kwargs):
        check_timm_kwargs(timm_kwargs)
        super().__init__()
        self.embed_dim = embed_dim
        # U-MAE's official forward takes its cls feature as norm(latent)[:, 0], the encoder norm
        # applied a second time; False: latent[:, 0]
        self.cls_double_norm = bool(cls_double_norm)
        self.patch_size, self.in_chans, self.img_size = patch_size, in_chans, img_size
        self.norm_pix_loss, self.lamb = norm_pix_loss, float(lamb)
        self.fused = bool(fused)
        self.exclude_diagonal, self.exact_ddp_grad = exclude_diagonal, exact_ddp_grad
        self.unif_process_group = None  # set by the trainer under DDP: uniformity over the global batch

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        # timm's stochastic depth rule (linspace from 0 to the rate), in Python: no tensor read on the host
        dpr = [float(drop_path_rate) * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=bool(qkv_bias), drop_path=dpr[i],
                                           proj_drop=float(proj_drop_rate), attn_drop=float(attn_drop_rate),
                                           norm_layer=norm_layer) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                   norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.initialize_weights()
        # U-MAE's online linear probe (its `fc`, nn.Linear's own init) on the detached cls feature
        self.fc = nn.Linear(embed_dim, probe_classes) if probe_classes else None
        self._init_timm(num_classes, global_pool, img_size, in_chans, patch_size, norm_layer, fc_norm, drop_rate,
                        pos_drop_rate)

    DECODER_KEYS = ("decoder_", "mask_token")  # what an encoder-only checkpoint lacks
    PROBE_KEYS = ("fc.", "fc_norm.")  # U-MAE's online probe: optional in a checkpoint and in the model
    HEAD_KEYS = ("head.",)  # a classifier's head (timm_api): optional, as the probe

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, plus facebookresearch/mae's checkpoints: a `{"model": state_dict}` file is
        unwrapped (the parameter names are MAE's), and an encoder-only checkpoint (e.g.
        mae_pretrain_vit_base.pth: no decoder) loads the encoder with a warning naming the missing
        decoder keys. A probe or classifier head the checkpoint has and the model lacks is left out,
        one the model has and the checkpoint lacks keeps its initialization (MAE's fine-tuning),
        each with a warning. Any other mismatch of names or shapes raises before anything is
        loaded, naming the keys."""
        if "model" in state_dict and isinstance(state_dict["model"], dict):
            state_dict = state_dict["model"]
        own = self.state_dict()
        if strict:  # as timm's ViT, whose strict load names the fc_norm keys (a re-heading load is not strict)
            _check_pool_of(state_dict, own)
        optional = self.PROBE_KEYS + self.HEAD_KEYS
        extra = sorted(k for k in state_dict if k.startswith(optional) and k not in own)
        if extra:  # a U-MAE checkpoint's probe or a classifier's head, into a model without one
            _warn(f"the checkpoint's probe / head keys are not loaded: {', '.join(extra)}")
            state_dict = {k: v for k, v in state_dict.items() if k not in extra}
        shapes = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state_dict.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if shapes:
            raise RuntimeError(f"checkpoint does not match {type(self).__name__}: the shapes of {len(shapes)} keys "
                               f"differ: {'; '.join(shapes)}")
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        fresh = [k for k in missing if k.startswith(optional)]  # keep their initialization
        missing = [k for k in missing if k not in fresh]
        encoder_only = bool(missing) and all(k.startswith(self.DECODER_KEYS) for k in missing)
        if strict and (unexpected or (missing and not encoder_only)):
            raise RuntimeError(f"checkpoint does not match {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        if strict and fresh:
            _warn(f"the model's probe / head keep their initialization (not in the checkpoint): {', '.join(fresh)}")
        if strict and encoder_only:
            _warn(f"encoder-only checkpoint: the decoder keeps its initialization ({len(missing)} missing "
                  f"keys: {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        lenient = not strict or encoder_only or bool(fresh)
        return super().load_state_dict(state_dict, strict=not lenient, assign=assign)

    @property
    def backend(self) -> str | None:
        """The per-call backend of this model's ops: None follows umae's global switch."""
        return None if self.fused else "reference"

    def arch_config(self) -> dict:
        """The architecture as plain values (what every checkpoint umae writes records beside the
        weights, so that any shape loads back without naming a config): `from_config` rebuilds it."""
        blk, dblk = self.blocks[0], self.decoder_blocks[0]
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=len(self.blocks), num_heads=blk.attn.num_heads,
                    decoder_embed_dim=self.decoder_embed.out_features, decoder_depth=len(self.decoder_blocks),
                    decoder_num_heads=dblk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / self.embed_dim,
                    norm_eps=self.norm.eps if hasattr(self.norm, "eps") else blk.norm1.eps,
                    norm_pix_loss=bool(self.norm_pix_loss))

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> "MaskedAutoencoderViT":
        """A model of `config`'s architecture (`arch_config()`'s dict); kwargs: fused, lamb, ..."""
        return _mae.from_arch_config(cls, config, **kwargs)

    def fill_pos_embeds(self):
        """MAE's fixed sin-cos position embeddings for the current grid, encoder's and decoder's."""
        gh, gw = self.grid
        for pe in (self.pos_embed, self.decoder_pos_embed):
            pe.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(pe.shape[-1], gh, gw, cls_token=True)).to(pe)
                          .unsqueeze(0))

    def initialize_weights(self):
        self.fill_pos_embeds()
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        # the fused model's patch tokens come out contiguous for the masking gather (same values)
        return _mae.encode(self, imgs, mask_ratio, noise, backend=self.backend, token_layout=self.fused)

    def forward_decoder(self, x, ids_restore):
        return _mae.decode(self, x, ids_restore, backend=self.backend)

    def forward_loss(self, imgs, pred, mask):
        return ops.mae_loss(pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss, backend=self.backend)

    def cls_feature(self, latent):
        """The cls feature U-MAE's term and probe see (per row, so norm(latent)[:, 0] = norm(latent[:, 0]))."""
        return _mae.cls_feature(latent, self.norm if self.cls_double_norm else None)

    def forward_uniformity(self, cls):
        if self.lamb == 0:  # plain MAE: still reported, not differentiated
            cls = cls.detach()
        return ops.uniformity_loss(cls, normalize=True, exclude_diagonal=self.exclude_diagonal,
                                   process_group=self.unif_process_group, exact_ddp_grad=self.exact_ddp_grad,
                                   backend=self.backend)

    def forward(self, imgs, mask_ratio=0.75, noise=None, labels=None):
        """The MAE / U-MAE objective (MAEOutput); labels: the batch's class labels, for the online
        probe (probe_classes > 0). A classifier (num_classes=, reset_classifier): the logits."""
        if self.is_classifier:
            return self.forward_head(self.forward_features(imgs))
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss_mae = self.forward_loss(imgs, pred, mask)
        cls = self.cls_feature(latent)
        loss_unif = self.forward_uniformity(cls)
        loss = loss_mae + self.lamb * loss_unif
        if self.fc is None or labels is None:
            return MAEOutput(loss, loss_mae, loss_unif, pred, mask, latent)
        logits = self.fc(cls.detach())  # trains the probe only, as U-MAE's
        loss_probe = torch.nn.functional.cross_entropy(logits.float(), labels)
        correct = (logits.argmax(1) == labels).sum()
        return MAEOutput(loss + loss_probe, loss_mae, loss_unif, pred, mask, latent, loss_probe, correct)

    @torch.no_grad()
    def features(self, imgs, pool="cls"):
        """Encoder features of unmasked images, for probing: 'cls' token or 'mean' of patch tokens."""
        x = self.forward_features(imgs)
        return x[:, 0] if pool == "cls" else x[:, 1:].mean(1)


def _check_pool_of(state: dict, own: dict) -> None:
    """A classifier's checkpoint pooled otherwise than the model raises, as timm's VisionTransformer
    does (its fc_norm is unexpected or missing): loaded anyway, 'avg' weights in a 'token' model score
    another network. U-MAE's online probe has an fc_norm too, beside its fc: those stay optional."""
    def keys(d, prefix):
        return any(k.startswith(prefix) for k in d)

    probe = keys(state, "fc.")
    if keys(state, "fc_norm.") and not probe and not keys(own, "fc_norm."):
        raise RuntimeError("the checkpoint is a classifier pooled through fc_norm (global_pool='avg'), the model "
                           "has none (global_pool='token' or fc_norm=False): unexpected keys fc_norm.*; create it "
                           "with global_pool='avg' (and fc_norm left at its default)")
    if keys(state, "head.") and keys(own, "fc_norm.") and not keys(state, "fc_norm."):
        raise RuntimeError("the checkpoint is a classifier without fc_norm (global_pool='token'), the model pools "
                           "through one (global_pool='avg' or fc_norm=True): missing keys fc_norm.*; create it with "
                           "global_pool='token'")


def _warn(msg: str) -> None:
    import warnings

    warnings.warn(msg, stacklevel=3)
