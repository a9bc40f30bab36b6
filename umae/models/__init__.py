"""MAE / U-MAE ViT models, registered with timm: `timm.create_model("umae_vit_tiny_patch4_32",
fused=True, lamb=0.01, norm_pix_loss=True)`."""
from functools import partial

from timm.models import register_model

from .mae import MAEOutput, MaskedAutoencoderViT, get_2d_sincos_pos_embed
from .videomae import VIDEO_CONFIGS, VideoMAEOutput, VideoMaskedAutoencoderViT, build_video

# name -> (img, patch, dim, depth, heads, decoder dim, decoder depth, decoder heads)
CONFIGS = {
    # MAE's ImageNet configs (decoder 512-d, 8 blocks, 16 heads)
    "umae_vit_tiny_patch16_224": (224, 16, 192, 12, 3, 512, 8, 16),
    "umae_vit_small_patch16_224": (224, 16, 384, 12, 6, 512, 8, 16),
    "umae_vit_base_patch16_224": (224, 16, 768, 12, 12, 512, 8, 16),
    "umae_vit_large_patch16_224": (224, 16, 1024, 24, 16, 512, 8, 16),
    "umae_vit_huge_patch14_224": (224, 14, 1280, 32, 16, 512, 8, 16),
    # 32x32 inputs (CIFAR), U-MAE's small-image setting; a lighter decoder (192-d, 4 blocks)
    "umae_vit_tiny_patch4_32": (32, 4, 192, 12, 3, 192, 4, 3),
    "umae_vit_tiny_patch2_32": (32, 2, 192, 12, 3, 192, 4, 3),
    "umae_vit_small_patch4_32": (32, 4, 384, 12, 6, 192, 4, 3),
    "umae_vit_small_patch2_32": (32, 2, 384, 12, 6, 192, 4, 3),
    # umae reproduce's default: small enough for 2 CPU cores, large enough to show the collapse
    "umae_vit_mini_patch4_32": (32, 4, 96, 4, 3, 64, 2, 2),
    # the hierarchical sweep's larger patches (umae reproduce --preset hierarchical; --full: tiny)
    "umae_vit_mini_patch8_32": (32, 8, 96, 4, 3, 64, 2, 2),
    "umae_vit_tiny_patch8_32": (32, 8, 192, 12, 3, 192, 4, 3),
    # for tests and smoke runs: the tiny 32x32 model, 2 + 1 blocks
    "umae_vit_micro_patch4_32": (32, 4, 64, 2, 2, 64, 1, 2),
}

_TIMM_KWARGS = ("cache_dir", "pretrained_model_args")  # create_model's, for its own use


def check_name(name, flag: str = "--model") -> None:
    """A ValueError naming `flag` unless `name` is one of umae's models (image or video)."""
    if name not in CONFIGS and name not in VIDEO_CONFIGS:  # timm knows other models (resnet18): not MAE models
        import timm

        known = ("is a timm model, not a umae MAE model" if isinstance(name, str) and timm.is_model(name)
                 else "is not registered")
        raise ValueError(f"{flag} {name!r} {known}; umae models: {', '.join([*CONFIGS, *VIDEO_CONFIGS])}")


def is_video(name) -> bool:
    """Whether `name` is one of umae's video (VideoMAE) models."""
    return name in VIDEO_CONFIGS


def build(name: str, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
          features_only: bool = False, out_indices=3, feature_cls: str = "getter", **kwargs):
    """The named config, with any of its values overridden by keyword (as timm's own ViTs).
    timm's create_model options: pretrained (weights from a pretrained_cfg's file, folder or Hub
    id, e.g. create_model("local-dir:<save_for_hf folder>", pretrained=True); umae registers no
    weights of its own), pretrained_cfg / _overlay, and features_only (timm's FeatureGetterNet over
    forward_intermediates, out_indices as timm's ViTs: the last 3 blocks by default)."""
    from timm.models import load_pretrained

    for k in _TIMM_KWARGS:
        kwargs.pop(k, None)
    given = pretrained_cfg if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "__dict__", None) or {}
    # timm's rule (build_model_with_cfg): a given cfg's classes and pool are the defaults (a save_for_hf folder's)
    if given.get("num_classes"):
        kwargs.setdefault("num_classes", given["num_classes"])
    if given.get("global_pool") is not None:
        kwargs.setdefault("global_pool", given["global_pool"])
    img, p, d, depth, heads, dd, ddepth, dheads = CONFIGS[name]
    cfg = dict(img_size=img, patch_size=p, embed_dim=d, depth=depth, num_heads=heads, decoder_embed_dim=dd,
               decoder_depth=ddepth, decoder_num_heads=dheads)
    model = MaskedAutoencoderViT(**{**cfg, **kwargs})
    model.pretrained_cfg = {**model.pretrained_cfg, **given, **(pretrained_cfg_overlay or {}),
                            "architecture": name, "num_classes": model.num_classes, "global_pool": model.global_pool}
    if pretrained:
        src = model.pretrained_cfg
        if not any(src.get(k) for k in ("file", "state_dict", "url", "hf_hub_id")):
            raise ValueError(f"{name} has no pretrained weights of its own: pass them with pretrained_cfg_overlay="
                             "dict(file=...), or create the model from a save_for_hf folder ('local-dir:<folder>')")
        # the weights' own class count: timm drops their head when the model's differs (re-heading); an
        # overlay's num_classes says it (timm's train.py --pretrained-path passes -1: any head is re-made)
        classes = (pretrained_cfg_overlay or {}).get("num_classes", given.get("num_classes", model.num_classes))
        load_pretrained(model, pretrained_cfg={**src, "num_classes": classes}, num_classes=model.num_classes,
                        in_chans=model.in_chans)
    if features_only:
        from timm.models._features import FeatureGetterNet

        if feature_cls != "getter":
            raise ValueError(f"feature_cls {feature_cls!r}: umae models give their features as timm's ViTs do, "
                             "through 'getter' (forward_intermediates)")
        return FeatureGetterNet(model, out_indices=out_indices)
    return model


for _name in CONFIGS:
    _fn = partial(build, _name)
    _fn.__name__ = _name
    _fn.__module__ = __name__
    _fn.__doc__ = f"{_name}: {CONFIGS[_name]} (img, patch, dim, depth, heads, dec dim, dec depth, dec heads)"
    globals()[_name] = register_model(_fn)

for _name in VIDEO_CONFIGS:
    _fn = partial(build_video, _name)
    _fn.__name__ = _name
    _fn.__module__ = __name__
    _fn.__doc__ = (f"{_name}: {VIDEO_CONFIGS[_name]} (img, patch, frames, tubelet, dim, depth, heads, dec dim, "
                   "dec depth, dec heads)")
    globals()[_name] = register_model(_fn)

__all__ = ["MAEOutput", "MaskedAutoencoderViT", "get_2d_sincos_pos_embed", "CONFIGS", "build", "check_name", "is_video", *CONFIGS,
           "VideoMAEOutput", "VideoMaskedAutoencoderViT", "VIDEO_CONFIGS", "build_video", *VIDEO_CONFIGS]
