"""MAE checkpoints between umae, facebookresearch/mae and transformers' ViTMAE, both ways and
losslessly (the tensors are copied bit for bit; q, k and v are split from / joined into timm's qkv).

- umae's models use facebookresearch/mae's parameter names, so an MAE `.pth` (`{"model": state_dict}`)
  is an umae checkpoint: `load_mae` / `save_mae`.
- `to_hf(model)`: an umae (or MAE) model as a `ViTMAEForPreTraining` (`save_pretrained` writes a
  folder `from_pretrained` loads); `from_hf(hf_model or folder or state_dict)`: back. transformers'
  own names and the older layout of the Hub's `facebook/vit-mae-*` checkpoints
  (`encoder.layer.N.attention.attention.query`, ...) are both read.
- `umae convert SRC OUT --to hf|mae`: the same from the command line.
- Video: `video_to_hf` / `video_from_hf` for transformers' VideoMAEForPreTraining, `load_video` /
  `save_videomae` for MCG-NJU/VideoMAE's `.pth`; `umae convert SRC OUT --to hf|videomae`.

Same weights, same noise: same mask, same loss (HF and MAE order patches and draw the mask from
the noise alike; tests/test_convert.py checks it in float64).
"""
from __future__ import annotations

import functools
import os
import re

import torch
from torch import nn

from ._files import (check_finite_weights, check_recorded_config, check_target, load_weights, read_checkpoint, read_json,
                     reason, recover, write_whole)
from .models import (CONFIGS, VIDEO_CONFIGS, MaskedAutoencoderViT, VideoMaskedAutoencoderViT, build, build_video,
                     check_name, is_video)
from .models.videomae import to_videomae_state_dict

# (umae key suffix, transformers key suffix) of one transformer block
_BLOCK = (("norm1", "layernorm_before"), ("attn.proj", "attention.o_proj"), ("norm2", "layernorm_after"),
          ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
# the Hub's older transformers layout -> transformers' current names
_LEGACY = ((r"\.encoder\.layer\.(\d+)\.", r".layers.\1."), (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
           (r"attention\.attention\.query", "attention.q_proj"), (r"attention\.attention\.key", "attention.k_proj"),
           (r"attention\.attention\.value", "attention.v_proj"), (r"attention\.output\.dense", "attention.o_proj"),
           (r"intermediate\.dense", "mlp.fc1"), (r"\.output\.dense", ".mlp.fc2"))


def _pairs(depth: int, decoder_depth: int) -> list[tuple[str, str]]:
    """(umae key, transformers key) of every tensor; a key ending in 'qkv.*' maps to q_proj/k_proj/v_proj."""
    out = [("cls_token", "vit.embeddings.cls_token"), ("pos_embed", "vit.embeddings.position_embeddings"),
           ("norm.weight", "vit.layernorm.weight"), ("norm.bias", "vit.layernorm.bias"),
           ("mask_token", "decoder.mask_token"), ("decoder_pos_embed", "decoder.decoder_pos_embed")]
    for wb in ("weight", "bias"):
        out += [(f"patch_embed.proj.{wb}", f"vit.embeddings.patch_embeddings.projection.{wb}"),
                (f"decoder_embed.{wb}", f"decoder.decoder_embed.{wb}"),
                (f"decoder_norm.{wb}", f"decoder.decoder_norm.{wb}"),
                (f"decoder_pred.{wb}", f"decoder.decoder_pred.{wb}")]
        for prefix, hf_prefix, n in (("blocks", "vit.layers", depth), ("decoder_blocks", "decoder.decoder_layers",
                                                                       decoder_depth)):
            for i in range(n):
                out.append((f"{prefix}.{i}.attn.qkv.{wb}", f"{hf_prefix}.{i}.attention.qkv.{wb}"))
                out += [(f"{prefix}.{i}.{a}.{wb}", f"{hf_prefix}.{i}.{b}.{wb}") for a, b in _BLOCK]
    return out


def _qkv_names(hf_key: str) -> list[str]:
    return [hf_key.replace(".qkv.", f".{p}_proj.") for p in "qkv"]


def hf_state_dict(state: dict, depth: int, decoder_depth: int) -> dict:
    """An umae / MAE state dict in transformers' ViTMAEForPreTraining names (copies, bitwise)."""
    out = {}
    for u, h in _pairs(depth, decoder_depth):
        if ".qkv." in h:
            out.update({k: t.clone() for k, t in zip(_qkv_names(h), state[u].chunk(3, dim=0))})
        else:
            out[h] = state[u].clone()
    return out


def umae_state_dict(hf_state: dict, depth: int, decoder_depth: int) -> dict:
    """A ViTMAEForPreTraining state dict (current or the Hub's older names) in umae / MAE names."""
    hf_state = {_modern(k): v for k, v in hf_state.items()}
    out = {}
    for u, h in _pairs(depth, decoder_depth):
        names = _qkv_names(h) if ".qkv." in h else [h]
        missing = [n for n in names if n not in hf_state]
        if missing:
            raise KeyError(f"the ViTMAE state dict lacks {', '.join(missing)} (for umae's {u})")
        out[u] = torch.cat([hf_state[n] for n in names]) if len(names) > 1 else hf_state[h].clone()
    return out


def _modern(key: str) -> str:
    for pattern, repl in _LEGACY:
        key = re.sub(pattern, repl, key)
    return key


def hf_config(model: MaskedAutoencoderViT, mask_ratio: float = 0.75):
    """The ViTMAEConfig of an umae model (MAE's structure: qkv bias, exact GELU, one LayerNorm eps)."""
    from transformers import ViTMAEConfig

    blk, dblk = model.blocks[0], model.decoder_blocks[0]
    return ViTMAEConfig(
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=model.norm.eps,
        image_size=model.img_size, patch_size=model.patch_size, num_channels=model.in_chans, qkv_bias=True,
        decoder_hidden_size=model.decoder_embed.out_features, decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dblk.attn.num_heads, decoder_intermediate_size=dblk.mlp.fc1.out_features,
        mask_ratio=float(mask_ratio), norm_pix_loss=bool(model.norm_pix_loss))


def umae_kwargs(config) -> dict:
    """MaskedAutoencoderViT's keywords for a ViTMAEConfig; refuses what umae's structure cannot hold."""
    ratio = config.intermediate_size / config.hidden_size
    if config.decoder_intermediate_size != ratio * config.decoder_hidden_size:
        raise ValueError(f"the encoder's and the decoder's MLP widths differ in ratio ({ratio} vs "
                         f"{config.decoder_intermediate_size / config.decoder_hidden_size}); umae models share one")
    if config.hidden_act != "gelu" or not config.qkv_bias:
        raise ValueError(f"umae models use exact GELU and qkv bias (MAE's); the config has hidden_act="
                         f"{config.hidden_act!r}, qkv_bias={config.qkv_bias}")
    size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)
    if not isinstance(size, int) and size[0] != size[1]:
        raise ValueError(f"umae models take square images; the config has image_size {size}")
    return dict(img_size=size if isinstance(size, int) else size[0], patch_size=config.patch_size,
                in_chans=config.num_channels, embed_dim=config.hidden_size, depth=config.num_hidden_layers,
                num_heads=config.num_attention_heads, decoder_embed_dim=config.decoder_hidden_size,
                decoder_depth=config.decoder_num_hidden_layers, decoder_num_heads=config.decoder_num_attention_heads,
                mlp_ratio=ratio, norm_layer=functools.partial(nn.LayerNorm, eps=config.layer_norm_eps),
                norm_pix_loss=bool(config.norm_pix_loss))


def to_hf(model: MaskedAutoencoderViT, mask_ratio: float = 0.75):
    """A transformers ViTMAEForPreTraining with `model`'s weights (bitwise) and structure."""
    from transformers import ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(hf_config(model, mask_ratio))
    hf.load_state_dict(hf_state_dict(model.state_dict(), len(model.blocks), len(model.decoder_blocks)), strict=True)
    return hf.eval() if not model.training else hf


def from_hf(source, **model_kwargs) -> MaskedAutoencoderViT:
    """An umae model from a ViTMAEForPreTraining, a `save_pretrained` folder, or a
    (state_dict, ViTMAEConfig) pair; `model_kwargs` (fused, lamb, ...) go to the model."""
    if isinstance(source, (str, os.PathLike)):
        from transformers import ViTMAEForPreTraining

        source = ViTMAEForPreTraining.from_pretrained(source)
    state, config = (source.state_dict(), source.config) if isinstance(source, nn.Module) else source
    model = MaskedAutoencoderViT(**umae_kwargs(config), **model_kwargs)
    model.load_state_dict(umae_state_dict(state, config.num_hidden_layers, config.decoder_num_hidden_layers))
    return model


def load_mae(path, model: str | None = None, what: str = "src", *, ck: dict | None = None,
             **model_kwargs) -> MaskedAutoencoderViT:
    """An umae model from a facebookresearch/mae `.pth` (`{"model": state_dict}`) or an umae checkpoint;
    `model` names umae's config; without it the file's recorded architecture ("config": umae writes
    it in every checkpoint) or its run's model (MAE's own files record neither: its number of heads
    is not in the weights). `ck`: the file, already read."""
    path = os.fspath(path)
    ck = read_checkpoint(path, what) if ck is None else ck
    run, config = ck.get("run"), ck.get("config")
    name = model or (run.get("model") if isinstance(run, dict) else None)
    if model is None and isinstance(config, dict):  # the architecture as written: any shape, its norm eps
        try:
            m = MaskedAutoencoderViT.from_config(config, **model_kwargs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} {path!r}: its recorded config does not make a model: {e}") from None
        name = "its recorded config"
    elif name is None:
        raise ValueError(f"{what} {path!r}: name the model's config (--model, one of "
                         f"{', '.join(CONFIGS)}): a facebookresearch/mae checkpoint does not record its number of heads")
    else:
        label = "--model" if model else f"{what} {path!r}'s recorded model"
        check_name(name, label)
        if is_video(name):
            raise ValueError(f"{label} {name} is a video model; {what} {path!r} holds an image model's weights")
        m = build(name, **model_kwargs)
        # --model never replaces a recorded architecture (a LayerNorm eps of 1e-12 would become 1e-6)
        try:
            check_recorded_config(m, ck, path, what, f"--model {name}" if model else name)
        except ValueError as e:
            raise ValueError(f"{e}: drop --model to convert the recorded architecture" if model else str(e)) from None
    load_weights(m, ck, path, what, name)  # unwraps {"model": ...}, names any mismatch
    return m


def save_mae(model: MaskedAutoencoderViT, path) -> None:
    """facebookresearch/mae's checkpoint layout, {"model": state_dict}, with the architecture beside
    it ("config": MAE's loaders read "model" only), so the file loads back without --model."""
    # the file opened here: a disk error is then an OSError with its errno (torch's own writer says
    # "unexpected pos" and nothing else)
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "config": model.arch_config()}, f)


def _read_hf(folder: str):
    """from_hf (ViTMAE) or video_from_hf (VideoMAE) of a save_pretrained folder, or a ValueError naming it."""
    config = read_json(os.path.join(folder, "config.json"), "src")
    kind = config.get("model_type")
    if kind not in ("vit_mae", "videomae"):
        raise ValueError(f"src {folder!r} holds a transformers {kind!r} model, not a ViTMAE or VideoMAE")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line of output, as every umae command
    try:
        if kind == "videomae":
            from transformers import VideoMAEForPreTraining

            return video_from_hf(VideoMAEForPreTraining.from_pretrained(folder))
        return from_hf(folder)
    except Exception as e:  # OSError, load errors, safetensors' SafetensorError for a truncated file, ...
        name = "VideoMAE" if kind == "videomae" else "ViTMAE"
        raise ValueError(f"src {folder!r} is not a readable {name} folder: {type(e).__name__}: {reason(e)}") from None


# ---- umae convert -----------------------------------------------------------------------

HELP = ("convert MAE / VideoMAE checkpoints between umae, facebookresearch/mae or MCG-NJU/VideoMAE (.pth) and "
        "transformers' ViTMAE / VideoMAE (folder)")


def add_args(p) -> None:
    p.add_argument("src", help="a transformers save_pretrained folder (ViTMAE or VideoMAE), or a .pth (umae, "
                   "facebookresearch/mae or MCG-NJU/VideoMAE)")
    p.add_argument("out", help="--to hf: a folder (save_pretrained); --to mae / videomae: a .pth file")
    p.add_argument("--to", required=True, choices=["hf", "mae", "videomae"],
                   help="hf: transformers' ViTMAEForPreTraining or VideoMAEForPreTraining; mae: facebookresearch/mae's "
                   ".pth (image models); videomae: MCG-NJU/VideoMAE's .pth (video models)")
    p.add_argument("--model", default=None, help="umae's config of a .pth that records none (facebookresearch/mae's; "
                   f"MCG-NJU's name theirs): {', '.join([*CONFIGS, *VIDEO_CONFIGS])}")
    p.add_argument("--mask-ratio", type=float, default=0.75,
                   help="the transformers ViTMAE config's mask_ratio (VideoMAE's config has none: its masks are given)")


def _check_out(out: str, to: str) -> None:
    try:
        check_target(out, "out", folder=to == "hf")
    except ValueError as e:  # save_pretrained onto a file logs and returns: "wrote" was printed over nothing
        raise ValueError(f"{e}; --to {to} writes {'a folder' if to == 'hf' else 'a .pth file'}") from None
    # the folder is replaced as a whole: only one that holds a model (or nothing) may be
    if to == "hf" and os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise ValueError(f"out {out!r} is a folder holding other files (no config.json): --to hf replaces the "
                         "folder as a whole; give a new or a model's folder")


def main(args) -> int:
    if not 0 <= args.mask_ratio < 1:  # also NaN: not in range
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.model is not None:
        check_name(args.model)
    _check_out(args.out, args.to)
    recover(args.src)  # a folder a killed convert was swapping: its old model back first
    is_hf = os.path.isdir(args.src)
    if not is_hf and not os.path.isfile(args.src):
        raise ValueError(f"src {args.src!r}: no such file or folder")
    model = _read_hf(args.src) if is_hf else load_model_file(args.src, args.model)
    check_finite_weights(model, args.src, "src")  # as eval refuses them: a diverged run's weights
    video = isinstance(model, VideoMaskedAutoencoderViT)
    if args.to == ("mae" if video else "videomae"):
        raise ValueError(f"--to {args.to}: src {args.src!r} holds {'a video' if video else 'an image'} model; "
                         f"its .pth is --to {'videomae' if video else 'mae'}")
    if args.to == "hf":
        from transformers.utils import logging as hf_logging

        hf = video_to_hf(model) if video else to_hf(model, args.mask_ratio)
        hf_logging.disable_progress_bar()  # one line of output, as every umae command
        write_whole(args.out, hf.save_pretrained)
    else:
        write_whole(args.out, lambda tmp: (save_videomae if video else save_mae)(model, tmp))
    kind = {"hf": "transformers folder", "mae": "facebookresearch/mae .pth", "videomae": "MCG-NJU/VideoMAE .pth"}
    print(f"wrote {args.out} ({kind[args.to]})")
    return 0


def load_model_file(path, model: str | None = None, what: str = "src"):
    """load_video for a video checkpoint (its recorded config or run, a video --model, MCG-NJU's keys),
    load_mae otherwise."""
    ck = read_checkpoint(path, what)
    run, config, state = ck.get("run"), ck.get("config"), ck.get("model")
    video = (is_video(model) or (model is None and isinstance(config, dict) and "num_frames" in config)
             or (model is None and isinstance(run, dict) and is_video(run.get("model")))
             or (isinstance(state, dict) and "encoder.patch_embed.proj.weight" in state))
    return (load_video if video else load_mae)(path, model, what, ck=ck)


# ---- video: umae's VideoMAE models <-> transformers' VideoMAEForPreTraining --------------------------

# (umae key suffix, transformers key suffix) of one block: timm's Block, transformers' VideoMAELayer
_VIDEO_BLOCK = (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"), ("norm2", "layernorm_after"),
                ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
_VIDEO_TOP = (("patch_embed", "videomae.embeddings.patch_embeddings.projection"), ("norm", "videomae.layernorm"),
              ("encoder_to_decoder", "encoder_to_decoder"), ("decoder_norm", "decoder.norm"), ("head", "decoder.head"))


def video_hf_config(model: VideoMaskedAutoencoderViT):
    """The VideoMAEConfig of an umae video model: MCG-NJU's structure (the encoder's final norm, so
    use_mean_pooling=False; q and v biases; exact GELU; one LayerNorm eps)."""
    from transformers import VideoMAEConfig

    blk, dblk = model.blocks[0], model.decoder_blocks[0]
    return VideoMAEConfig(
        image_size=model.img_size, patch_size=model.patch_size, num_channels=model.in_chans,
        num_frames=model.num_frames, tubelet_size=model.tubelet_size, hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks), num_attention_heads=blk.attn.num_heads,
        intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=model.norm.eps, qkv_bias=True,
        use_mean_pooling=False, decoder_hidden_size=model.mask_token.shape[-1],
        decoder_num_hidden_layers=len(model.decoder_blocks), decoder_num_attention_heads=dblk.attn.num_heads,
        decoder_intermediate_size=dblk.mlp.fc1.out_features, norm_pix_loss=bool(model.norm_pix_loss))


def _video_blocks(model: VideoMaskedAutoencoderViT):
    """(umae prefix, transformers prefix) of each block, the encoder's then the decoder's."""
    return ([(f"blocks.{i}", f"videomae.encoder.layer.{i}") for i in range(len(model.blocks))]
            + [(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}") for i in range(len(model.decoder_blocks))])


def _video_pairs(model: VideoMaskedAutoencoderViT) -> list[tuple[str, str]]:
    """(umae key, transformers key) of every tensor copied as it is (all but the attention's q, k, v)."""
    pairs = [(f"{u}.{w}", f"{h}.{w}") for u, h in _VIDEO_TOP for w in ("weight", "bias")
             if (u, w) != ("encoder_to_decoder", "bias")] + [("mask_token", "mask_token")]
    return pairs + [(f"{u}.{a}.{w}", f"{h}.{b}.{w}") for u, h in _video_blocks(model) for a, b in _VIDEO_BLOCK
                    for w in ("weight", "bias")]


def video_to_hf(model: VideoMaskedAutoencoderViT):
    """A transformers VideoMAEForPreTraining with `model`'s weights (bitwise) and structure. timm's qkv
    is split into query, key and value; where the installed transformers' VideoMAE has no key bias (as
    MCG-NJU's), it is dropped: it adds the same number to every score of a query, which the softmax
    cancels. transformers builds its decoder norm with eps 1e-5 whatever the config says: the returned
    model gets umae's (MCG-NJU's 1e-6), which a `save_pretrained` folder does not record."""
    from transformers import VideoMAEForPreTraining

    hf = VideoMAEForPreTraining(video_hf_config(model))
    own, sd = hf.state_dict(), model.state_dict()
    out = {h: sd[u] for u, h in _video_pairs(model)}
    for u, h in _video_blocks(model):
        w, b = sd[f"{u}.attn.qkv.weight"].chunk(3), sd[f"{u}.attn.qkv.bias"].chunk(3)
        for name, wi, bi in zip(("query", "key", "value"), w, b):
            out[f"{h}.attention.attention.{name}.weight"] = wi.clone()
            if f"{h}.attention.attention.{name}.bias" in own:
                out[f"{h}.attention.attention.{name}.bias"] = bi.clone()
    hf.load_state_dict(out, strict=True)
    hf.decoder.norm.eps = model.decoder_norm.eps
    return hf.eval() if not model.training else hf


def video_from_hf(hf_model, **model_kwargs) -> VideoMaskedAutoencoderViT:
    """An umae video model from a VideoMAEForPreTraining (the key's bias 0 where it has none);
    `model_kwargs` (fused, lamb, mask_ratio, ...) go to the model. Refuses what umae's structure cannot
    hold."""
    cfg = hf_model.config
    if cfg.use_mean_pooling or cfg.hidden_act != "gelu":
        raise ValueError(f"umae's video models have the encoder's final norm and exact GELU (MCG-NJU's); the config "
                         f"has use_mean_pooling={cfg.use_mean_pooling}, hidden_act={cfg.hidden_act!r}")
    if cfg.decoder_intermediate_size * cfg.hidden_size != cfg.intermediate_size * cfg.decoder_hidden_size:
        raise ValueError("the encoder's and the decoder's MLP widths differ in ratio; umae's models share one")
    model = VideoMaskedAutoencoderViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size,
        in_chans=cfg.num_channels, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, decoder_embed_dim=cfg.decoder_hidden_size,
        decoder_depth=cfg.decoder_num_hidden_layers, decoder_num_heads=cfg.decoder_num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size, norm_pix_loss=bool(cfg.norm_pix_loss),
        norm_layer=functools.partial(nn.LayerNorm, eps=cfg.layer_norm_eps), **model_kwargs)
    sd = hf_model.state_dict()
    out = {u: sd[h] for u, h in _video_pairs(model)}
    for u, h in _video_blocks(model):
        a = f"{h}.attention.attention"
        out[f"{u}.attn.qkv.weight"] = torch.cat([sd[f"{a}.{x}.weight"] for x in ("query", "key", "value")])
        q = sd[f"{a}.query.bias"]
        out[f"{u}.attn.qkv.bias"] = torch.cat([q, sd.get(f"{a}.key.bias", torch.zeros_like(q)), sd[f"{a}.value.bias"]])
    model.load_state_dict(out, strict=True)
    return model


def _mcg_model(ck: dict) -> tuple[str | None, dict]:
    """(umae's config name, its overrides) of an MCG-NJU checkpoint, from the run arguments it pickles
    (`args.model` pretrain_videomae_<size>_patch16_224, --decoder_depth, --num_frames, --input_size)."""
    args = ck.get("args")
    name = getattr(args, "model", None)
    if not isinstance(name, str) or not name.startswith("pretrain_videomae_"):
        return None, {}
    kw = {k: getattr(args, a) for k, a in (("decoder_depth", "decoder_depth"), ("num_frames", "num_frames"),
                                          ("img_size", "input_size")) if isinstance(getattr(args, a, None), int)}
    return "umae_videomae_" + name[len("pretrain_videomae_"):], kw


def load_video(path, model: str | None = None, what: str = "src", *, ck: dict | None = None,
               **model_kwargs) -> VideoMaskedAutoencoderViT:
    """An umae video model from an umae checkpoint or MCG-NJU/VideoMAE's `.pth` (`{"model": state_dict,
    "args": ...}`: its run arguments name the model); `model` names umae's config where the file records
    none. `ck`: the file, already read."""
    path = os.fspath(path)
    ck = read_checkpoint(path, what) if ck is None else ck
    run, config = ck.get("run"), ck.get("config")
    name = model or (run.get("model") if isinstance(run, dict) else None)
    extra = {}
    if model is None and isinstance(config, dict):
        try:
            m = VideoMaskedAutoencoderViT.from_config(config, **model_kwargs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} {path!r}: its recorded config does not make a model: {e}") from None
        name = "its recorded config"
    else:
        if name is None:
            name, extra = _mcg_model(ck)
        if name is None:
            raise ValueError(f"{what} {path!r}: name the model's config (--model, one of {', '.join(VIDEO_CONFIGS)}): "
                             "the file records none")
        label = "--model" if model else f"{what} {path!r}'s recorded model"
        check_name(name, label)
        if not is_video(name):
            raise ValueError(f"{label} {name} is an image model; {what} {path!r} holds a video model's weights "
                             f"(video models: {', '.join(VIDEO_CONFIGS)})")
        m = build_video(name, **{**extra, **model_kwargs})
        check_recorded_config(m, ck, path, what, name)
    load_weights(m, ck, path, what, name)  # unwraps {"model": ...}, reads MCG-NJU's names
    return m


def save_videomae(model: VideoMaskedAutoencoderViT, path) -> None:
    """MCG-NJU/VideoMAE's checkpoint layout, {"model": state_dict in its names} (its loaders read
    "model"), with umae's architecture beside it ("config"), so the file loads back without --model."""
    with open(path, "wb") as f:
        torch.save({"model": to_videomae_state_dict(model.state_dict()), "config": model.arch_config()}, f)
