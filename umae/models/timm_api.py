"""The encoder of umae's MAE / U-MAE models, as timm's VisionTransformer presents one, so that
timm's and MAE's fine-tune and feature-extraction scripts take it unchanged: create_model's
keywords, `forward_features`, `forward_head`, `reset_classifier`, `get_classifier`,
`pool`, `no_weight_decay` and `group_matcher` (layer-wise lr decay), `set_grad_checkpointing`,
`forward_intermediates` (with `output_dict`), `get_intermediate_layers`,
`prune_intermediate_layers`, `set_input_size`, `feature_info` and `pretrained_cfg` (which
`timm.data.resolve_data_config` reads and `save_for_hf` records).

A model built with `num_classes=` (or after `reset_classifier`) is a classifier: `model(x)` is
`forward_head(forward_features(x))` on the unmasked image, as a timm ViT, and the decoder, which
a classifier does not use, is frozen (it stays in the state dict, so a pretraining checkpoint
loads strictly). Without `num_classes`, `model(imgs)` is the MAE / U-MAE objective.
"""
from __future__ import annotations

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # MAE's (and umae.data's) statistics

from .._mae import run_blocks

POOLS = ("token", "avg", "")
# timm VisionTransformer options and the only value this architecture (MAE's ViT) can honour
FIXED = dict(class_token=True, no_embed_class=False, reg_tokens=0, dynamic_img_size=False, dynamic_img_pad=False,
             patch_drop_rate=0.0, init_values=None, qk_norm=False, pre_norm=False, final_norm=True,
             drop_block_rate=None, weight_init="")


def check_timm_kwargs(kwargs: dict) -> None:
    """timm's keywords umae's models cannot honour, refused by name (a value equal to the one
    they have passes: timm's scripts pass some of them always); any other: a TypeError as Python's."""
    unknown = sorted(k for k in kwargs if k not in FIXED)
    if unknown:
        raise TypeError(f"MaskedAutoencoderViT got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    bad = [f"{k}={v!r}" for k, v in kwargs.items() if v != FIXED[k] and not (v == "" and FIXED[k] is None)]
    if bad:
        raise ValueError(f"umae's MAE ViT cannot honour timm's {', '.join(bad)} (its structure is MAE's: "
                         + ", ".join(f"{k}={FIXED[k]!r}" for k in kwargs) + ")")


def default_cfg(name: str, img_size: int, in_chans: int, num_classes: int) -> dict:
    """timm's pretrained_cfg for a umae model: its registered name (models.build sets it; save_for_hf
    writes it as the folder's architecture), its own input size and umae's data statistics (MAE's: ImageNet's mean
    and std), so resolve_data_config builds transforms the model takes."""
    return dict(url="", num_classes=num_classes, input_size=(in_chans, img_size, img_size), pool_size=None,
                crop_pct=1.0 if img_size <= 64 else 0.875, interpolation="bicubic", fixed_input_size=True,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj",
                classifier="head", license="bsd-3-clause", architecture=name)


class TimmEncoderAPI:
    """Mixed into MaskedAutoencoderViT; needs patch_embed, pos_embed, cls_token, blocks, norm,
    embed_dim and the decoder's modules (frozen in classifier mode)."""

    num_prefix_tokens = 1
    has_class_token = True

    def _init_timm(self, num_classes, global_pool: str, img_size: int, in_chans: int, patch_size: int, norm_layer,
                   fc_norm, drop_rate: float, pos_drop_rate: float):
        self.num_features = self.head_hidden_size = self.embed_dim
        self.grad_checkpointing = False
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=patch_size)
                             for i in range(len(self.blocks))]
        self.global_pool = _check_pool(global_pool)
        # timm's rule: 'avg' pools then normalizes (fc_norm) and drops the final norm; MAE's fine-tune too
        self.use_fc_norm = global_pool == "avg" if fc_norm is None else bool(fc_norm)
        self.fc_norm = norm_layer(self.embed_dim) if self.use_fc_norm else nn.Identity()
        self.pos_drop = nn.Dropout(float(pos_drop_rate))
        self.head_drop = nn.Dropout(float(drop_rate))
        self.is_classifier = False
        self.num_classes = 0
        self.head = nn.Identity()
        if num_classes is not None:
            self.reset_classifier(num_classes)
        self.pretrained_cfg = dict(default_cfg("umae", img_size, in_chans, self.num_classes),
                                                      global_pool=self.global_pool)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of pretrained_cfg."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    def no_weight_decay(self) -> set:
        """timm's VisionTransformer's: what layer-decay optimizers (timm's create_optimizer_v2, MAE's
        param_groups_lrd) keep out of weight decay beside 1-d parameters."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's VisionTransformer's: the stem (layer 0), block i (layer i + 1), the final norm last;
        what matches nothing (fc_norm, the head, the frozen decoder) takes the last layer's scale."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head (nn.Linear, or Identity for 0 classes) and pool; the model becomes a classifier,
        trained as MAE's fine-tune trains timm's ViT: the decoder frozen (unused), the position
        embedding trainable from its sin-cos values, the final norm frozen where fc_norm replaces it."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's fine-tuning head init
            nn.init.zeros_(self.head.bias)
        if hasattr(self, "pretrained_cfg"):
            self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes,
                                                          global_pool=self.global_pool)
        self.is_classifier = True
        for name, p in self.named_parameters():
            if name.startswith(self.DECODER_KEYS) or (self.use_fc_norm and name.startswith("norm.")):
                p.requires_grad_(False)
        self.pos_embed.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def _embed(self, imgs):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1))

    def _final_norm(self, x):
        return x if self.use_fc_norm else self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on the unmasked image: (N, 1 + L, D) tokens after the final norm (none with
        fc_norm: global_pool 'avg')."""
        return self._final_norm(run_blocks(self, self.blocks, self._embed(imgs)))

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """timm's VisionTransformer.pool: 'token' the cls token, 'avg' / 'max' / 'avgmax' over the patch
        tokens, '' none; the model's global_pool by default."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return patches.mean(dim=1)
        if pool_type == "max":
            return patches.amax(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))
        raise ValueError(f"pool_type must be one of 'token', 'avg', 'max', 'avgmax', '', got {pool_type!r}")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ('token': the cls token; 'avg': the mean patch token; '': no pooling), fc_norm,
        dropout, then the head."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False):
        """timm's: the outputs of the blocks `indices` (an int n: the last n), patch tokens as
        (N, D, h, w) for 'NCHW' or (N, L, D) for 'NLC'; with the final features unless
        intermediates_only; output_dict: {'image_intermediates', 'image_intermediates_prefix' (with
        return_prefix_tokens), 'image_features' (unless intermediates_only)}."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        n, _, height, width = x.shape
        h, w = height // self.patch_embed.patch_size[0], width // self.patch_embed.patch_size[1]
        x = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early or intermediates_only else self.blocks
        tokens, prefix = [], []
        for i, blk in enumerate(blocks):
            x = run_blocks(self, [blk], x)
            if i in take:
                y = self._final_norm(x) if norm else x
                prefix.append(y[:, :1])
                t = y[:, 1:]
                tokens.append(t.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else t)
        if output_dict:
            out = dict(image_intermediates=tokens)
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self._final_norm(x)
            return out
        out = list(zip(tokens, prefix)) if return_prefix_tokens else tokens
        return out if intermediates_only else (self._final_norm(x), out)

    def get_intermediate_layers(self, x, n=1, reshape: bool = False, return_prefix_tokens: bool = False,
                                norm: bool = False):
        """timm's (DINO's interface): the last n blocks' outputs, or those indexed by n."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list:
        """timm's: drops the blocks after the last of `indices` (and the final norm, the head); what
        timm's features_only wrapper calls. The model is an encoder afterwards (no decoder use)."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's: a new input resolution. MAE's fixed 2-D sin-cos position embeddings are computed
        again for the new grid; a classifier's (trained, or frozen after training) are resampled as
        timm's ViT resamples its own."""
        if patch_size is not None and tuple(_pair(patch_size)) != tuple(self.patch_embed.patch_size):
            raise ValueError(f"set_input_size: patch_size {patch_size!r}: umae models keep their patch size "
                             f"({self.patch_size}), whose pixels the decoder predicts")
        if img_size is None:
            return
        size = _pair(img_size)
        if size[0] != size[1]:
            raise ValueError(f"set_input_size: umae models take square images, got img_size {img_size!r}")
        from timm.layers import resample_abs_pos_embed

        old_grid, learned = self.grid, self.pos_embed.detach().clone() if self.is_classifier else None
        self.patch_embed.set_input_size(img_size=size)
        self.img_size = size[0]
        self.grid = self.patch_embed.grid_size
        n = self.patch_embed.num_patches + 1
        for name in ("pos_embed", "decoder_pos_embed"):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.new_zeros(1, n, old.shape[-1]), requires_grad=False))
        self.fill_pos_embeds()
        if learned is not None:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(learned, new_size=self.grid, old_size=old_grid,
                                                                 num_prefix_tokens=1))
        self.pretrained_cfg = dict(self.pretrained_cfg,
                                                      input_size=(self.in_chans, self.img_size, self.img_size))


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_pool(pool) -> str:
    if pool not in POOLS:
        raise ValueError(f"global_pool must be one of {POOLS}, got {pool!r}")
    return pool
