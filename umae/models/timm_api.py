"""The encoder of umae's MAE / U-MAE models, as timm's VisionTransformer presents one, so that a
timm fine-tune or linear-probe script takes it unchanged: `forward_features`, `forward_head`,
`reset_classifier`, `get_classifier`, `set_grad_checkpointing`, `forward_intermediates`,
`feature_info` and `pretrained_cfg` (which `timm.data.resolve_data_config` reads).

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


def default_cfg(img_size: int, in_chans: int, num_classes: int) -> dict:
    """timm's pretrained_cfg for a umae model: its own input size and umae's data statistics
    (MAE's: ImageNet's mean and std), so resolve_data_config builds transforms the model takes."""
    return dict(url="", num_classes=num_classes, input_size=(in_chans, img_size, img_size), pool_size=None,
                crop_pct=1.0 if img_size <= 64 else 0.875, interpolation="bicubic", fixed_input_size=True,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj",
                classifier="head", license="apache-2.0", architecture="umae")


class TimmEncoderAPI:
    """Mixed into MaskedAutoencoderViT; needs patch_embed, pos_embed, cls_token, blocks, norm,
    embed_dim and the decoder's modules (frozen in classifier mode)."""

    num_prefix_tokens = 1
    has_class_token = True

    def _init_timm(self, num_classes, global_pool: str, img_size: int, in_chans: int, patch_size: int):
        self.num_features = self.head_hidden_size = self.embed_dim
        self.grad_checkpointing = False
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=self.embed_dim, reduction=patch_size)
                             for i in range(len(self.blocks))]
        self.global_pool = _check_pool(global_pool)
        self.is_classifier = False
        self.num_classes = 0
        self.head = nn.Identity()
        if num_classes is not None:
            self.reset_classifier(num_classes)
        self.pretrained_cfg = default_cfg(img_size, in_chans, self.num_classes)

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head (nn.Linear, or Identity for 0 classes) and pool; the model becomes a classifier."""
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
            self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)
        self.is_classifier = True
        for name, p in self.named_parameters():
            if name.startswith(self.DECODER_KEYS):
                p.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def _embed(self, imgs):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on the unmasked image: (N, 1 + L, D) tokens after the final norm."""
        return self.norm(run_blocks(self, self.blocks, self._embed(imgs)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ('token': the cls token; 'avg': the mean patch token; '': no pooling), then the head."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's: the outputs of the blocks `indices` (an int n: the last n), patch tokens as
        (N, D, h, w) for 'NCHW' or (N, L, D) for 'NLC'; with the final features unless
        intermediates_only."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        h, w = self.patch_embed.grid_size
        x = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early or intermediates_only else self.blocks
        out = []
        for i, blk in enumerate(blocks):
            x = run_blocks(self, [blk], x)
            if i in take:
                y = self.norm(x) if norm else x
                tokens = y[:, 1:]
                if output_fmt == "NCHW":
                    tokens = tokens.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
                out.append((tokens, y[:, :1]) if return_prefix_tokens else tokens)
        if intermediates_only:
            return out
        return self.norm(x), out


def _check_pool(pool) -> str:
    if pool not in POOLS:
        raise ValueError(f"global_pool must be one of {POOLS}, got {pool!r}")
    return pool
