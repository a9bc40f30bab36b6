"""One call on the MAE a trainer already has: `umae.patch(model)` routes its glue through umae's
ops (fused kernels, or the references under `umae.use_backend("reference")`), `umae.unpatch`
undoes it.

Recognised models:
- transformers' `ViTMAEForPreTraining` (and `ViTMAEModel`, the encoder part): the embeddings'
  pos-embed add + random masking + cls prepend become `random_masking`; the decoder's mask
  tokens + unshuffle + cls + decoder pos embed become `restore_tokens`; the loss (inline in
  the model's forward) becomes `mae_loss`.
- facebookresearch/mae-style models (models_mae.py and its forks, U-MAE's among them), found by
  their attributes and methods: `forward_encoder`, `forward_decoder` and `forward_loss` get the
  same three swaps.
- transformers' `VideoMAEForPreTraining` (and `VideoMAEModel`, the encoder part): the embeddings'
  position add + `x[~mask]` become `visible_tokens`; the decoder input (positions gathered by ~mask
  and mask, the mask token, the cat) becomes `decoder_tokens`; the loss (unnormalize, tubelet
  patchify, per-channel norm, the masked labels, the MSE) becomes `videomae_loss`. VideoMAE has no
  cls token: `lamb > 0` puts U-MAE's term on the mean of the encoder's visible tokens (its output,
  as VideoMAE's classifier pools it).

Patching is per instance: the patched methods are instance attributes bound to the module (the
class and its other instances are untouched), so `unpatch` deletes them; parameters and
`state_dict()` are not touched. `lamb > 0` adds U-MAE's uniformity term on the encoder's cls
feature (the final norm applied twice, as U-MAE's official forward) to the returned loss, over the global batch when
torch.distributed is initialised with more than one rank (as umae's own model under DDP).
"""
from __future__ import annotations

import inspect
import sys
import warnings

import torch

from . import ops
from ._mae import cls_feature, conv_tokens, decode, encode

_STATE = "_umae_patch"  # the patched module's record: {"methods": {module: [names]}, "lamb": ..., ...}

MAE_STYLE = ("patch_embed", "pos_embed", "cls_token", "blocks", "norm", "decoder_embed", "mask_token",
             "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm_pix_loss",
             "forward_encoder", "forward_decoder", "forward_loss")


def _kind(model) -> str:
    names = [c.__name__ for c in type(model).__mro__]
    if "ViTMAEForPreTraining" in names:
        return "hf_pretraining"
    if "ViTMAEModel" in names:
        return "hf_model"
    if "VideoMAEForPreTraining" in names:
        return "hf_video_pretraining"
    if "VideoMAEModel" in names:
        return "hf_video_model"
    missing = [a for a in MAE_STYLE if not hasattr(model, a)]
    if not missing:
        return "mae_style"
    raise TypeError(f"umae.patch does not recognise {type(model).__name__}: not a transformers ViTMAEForPreTraining / "
                    f"ViTMAEModel / VideoMAEForPreTraining / VideoMAEModel, and as a facebookresearch/mae-style "
                    f"model it lacks {', '.join(missing)}")


def _global_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _uniformity(state, latent, norm, fc_norm=None):
    """U-MAE's term on the encoder's feature. With fc_norm (an official U-MAE model built with
    global_pool=True), that model's pooled feature: fc_norm of the mean patch token, as its forward."""
    if fc_norm is not None:
        feat = fc_norm(latent[:, 1:, :].mean(dim=1))
    else:
        feat = cls_feature(latent, norm if state["cls_double_norm"] else None)
    return ops.uniformity_loss(feat, exclude_diagonal=state["exclude_diagonal"], process_group=_global_group(),
                               exact_ddp_grad=state["exact_ddp_grad"])


_warned_interpolate = False


def _fallback_interpolate():
    global _warned_interpolate
    if not _warned_interpolate:
        warnings.warn("umae.patch: interpolate_pos_encoding=True runs the model's own (unpatched) embeddings and "
                      "decoder for those calls; umae's ops need the model's own grid", stacklevel=3)
        _warned_interpolate = True


# ---- transformers ViTMAE ---------------------------------------------------------------

def _hf_module(module):
    """The transformers module defining `module`'s class (its output classes live there), found
    through the MRO: FSDP2's fully_shard gives the instance a subclass defined in torch."""
    cls = next(c for c in type(module).__mro__ if c.__module__.startswith("transformers."))
    return sys.modules[cls.__module__]


def _hf_embeddings_forward(self, pixel_values, noise=None, interpolate_pos_encoding=False):
    if interpolate_pos_encoding:
        _fallback_interpolate()
        return type(self).forward(self, pixel_values, noise=noise, interpolate_pos_encoding=True)
    H, W = pixel_values.shape[2:]
    if (H, W) != tuple(self.image_size):
        raise ValueError(f"pixel_values are {H}x{W}, the model's image_size is {tuple(self.image_size)}")
    if pixel_values.shape[1] != self.config.num_channels:
        raise ValueError(f"pixel_values have {pixel_values.shape[1]} channels, the model's num_channels is "
                         f"{self.config.num_channels}")
    x = conv_tokens(self.patch_embeddings.projection, pixel_values)  # contiguous tokens for the gather
    pos = self.position_embeddings
    return ops.random_masking(x, self.config.mask_ratio, noise, pos_embed=pos[:, 1:, :],
                              cls_token=self.cls_token + pos[:, :1, :])


def _hf_decoder_forward(self, hidden_states, ids_restore, interpolate_pos_encoding=False):
    if interpolate_pos_encoding:
        _fallback_interpolate()
        return type(self).forward(self, hidden_states, ids_restore, interpolate_pos_encoding=True)
    x = ops.restore_tokens(self.decoder_embed(hidden_states), ids_restore, self.mask_token,
                           pos_embed=self.decoder_pos_embed, has_cls=True)
    for layer in self.decoder_layers:
        x = layer(x)
    logits = self.decoder_pred(self.decoder_norm(x))
    return _hf_module(self).ViTMAEDecoderOutput(logits=logits[:, 1:, :])


def _hf_pretraining_forward(self, pixel_values=None, noise=None, interpolate_pos_encoding=None, attention_mask=None,
                            **kwargs):
    state = getattr(self, _STATE)
    return_dict = kwargs.pop("return_dict", None)
    out = self.vit(pixel_values, noise=noise, interpolate_pos_encoding=interpolate_pos_encoding,
                   attention_mask=attention_mask, **kwargs)
    latent, mask, ids_restore = out.last_hidden_state, out.mask, out.ids_restore
    logits = self.decoder(latent, ids_restore, interpolate_pos_encoding=bool(interpolate_pos_encoding)).logits
    cfg = self.config
    # any image size the patch divides (the model's own loss wants square images)
    loss_mae = ops.mae_loss(logits, pixel_values, mask, cfg.patch_size, norm_pix=bool(cfg.norm_pix_loss))
    loss, loss_unif = loss_mae, None
    if state["lamb"] > 0:
        loss_unif = _uniformity(state, latent, self.vit.layernorm)
        loss = loss_mae + state["lamb"] * loss_unif
    result = _hf_module(self).ViTMAEForPreTrainingOutput(
        loss=loss, logits=logits, mask=mask, ids_restore=ids_restore, hidden_states=out.hidden_states,
        attentions=out.attentions)
    return _hf_output(result, loss_mae, loss_unif, cfg, return_dict)


def _hf_output(result, loss_mae, loss_unif, cfg, return_dict):
    """The model's output with the two terms; a tuple where the model's own forward returns one."""
    # not ModelOutput fields: to_tuple() keeps the model's own layout
    object.__setattr__(result, "loss_mae", loss_mae)
    object.__setattr__(result, "loss_unif", loss_unif)
    if return_dict is False or (return_dict is None and not getattr(cfg, "return_dict", True)):
        return result.to_tuple()
    return result


# ---- transformers VideoMAE -------------------------------------------------------------

_POS_CACHE = "_umae_pos"


def _fixed_table(module, like: torch.Tensor) -> torch.Tensor:
    """module.position_embeddings (VideoMAE's fixed sin-cos table, a plain CPU tensor) on like's device
    and dtype, as the model's `.type_as(...).to(device, copy=True)` gives it each call: made once per
    device and dtype, not copied to the device at every step."""
    table = module.position_embeddings
    # keyed by the table too: a model given another table gets it
    return ops._common.device_constant(module.__dict__[_POS_CACHE], (id(table), like.device, like.dtype), like,
                                       lambda device=like.device: table.detach().to(device=device, dtype=like.dtype,
                                                                                    copy=True))


def _hf_video_embeddings_forward(self, pixel_values, bool_masked_pos):
    x = self.patch_embeddings(pixel_values)
    pos = _fixed_table(self, x)
    if bool_masked_pos is None:
        return x + pos
    # the masked count is read from the mask (one host sync, as the model's boolean index); the decoder
    # input and the loss take it from the shapes
    return ops.visible_tokens(x, bool_masked_pos, pos)


def _hf_video_pretraining_forward(self, pixel_values, bool_masked_pos=None, **kwargs):
    state = getattr(self, _STATE)
    return_dict = kwargs.pop("return_dict", None)
    if bool_masked_pos is None:
        raise ValueError("One must provided a boolean mask ")  # the model's own words
    out = self.videomae(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
    latent = out.last_hidden_state
    x = ops.decoder_tokens(self.encoder_to_decoder(latent), bool_masked_pos, self.mask_token,
                           _fixed_table(self, pixel_values))
    logits = self.decoder(x, x.shape[1] - latent.shape[1]).logits
    cfg = self.config
    if cfg.num_channels != 3 and not cfg.norm_pix_loss:
        raise ValueError("Can't unnormalize non-RGB images. Consider setting config.norm_pix_loss to False.")
    stats = {} if cfg.num_channels == 3 else dict(mean=None, std=None)  # ImageNet's, for RGB only
    # the frames (B, T, C, H, W) as the view (B, C, T, H, W): read by their strides, no copy
    loss_mae = ops.videomae_loss(logits, pixel_values.detach().transpose(1, 2), bool_masked_pos, cfg.patch_size,
                                 cfg.tubelet_size, norm_pix=bool(cfg.norm_pix_loss), **stats)
    loss, loss_unif = loss_mae, None
    if state["lamb"] > 0:  # no cls token: the mean of the encoder's visible tokens
        loss_unif = ops.uniformity_loss(latent.mean(dim=1), exclude_diagonal=state["exclude_diagonal"],
                                        process_group=_global_group(), exact_ddp_grad=state["exact_ddp_grad"])
        loss = loss_mae + state["lamb"] * loss_unif
    result = _hf_module(self).VideoMAEForPreTrainingOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                                           attentions=out.attentions)
    return _hf_output(result, loss_mae, loss_unif, cfg, return_dict)


# ---- facebookresearch/mae-style --------------------------------------------------------

def _patch_size(model) -> int:
    p = model.patch_embed.patch_size
    p = p if isinstance(p, int) else p[0]
    return int(p)


def _global_pool_norm(model):
    """The official U-MAE model's fc_norm when it pools globally (global_pool=True), else None."""
    # its global_pool is a bool; timm's ViTs and umae's models name theirs ('token', 'avg')
    return model.fc_norm if getattr(model, "global_pool", None) is True and hasattr(model, "fc_norm") else None


def _mae_forward_encoder(self, x, mask_ratio, noise=None):
    state = getattr(self, _STATE)
    if noise is None:  # the patched forward's noise=, which the model's own forward does not pass on
        noise = state.get("noise")
    x, mask, ids_restore = encode(self, x, mask_ratio, noise)
    if state["lamb"] > 0:  # picked up by the forward wrapper below
        state["pending_unif"] = _uniformity(state, x, self.norm, _global_pool_norm(self))
    return x, mask, ids_restore


def _mae_forward_decoder(self, x, ids_restore):
    return decode(self, x, ids_restore)


def _mae_forward_loss(self, imgs, pred, mask):
    return ops.mae_loss(pred, imgs, mask, _patch_size(self), norm_pix=bool(self.norm_pix_loss))


def _mae_forward(self, *args, noise=None, **kwargs):
    """The model's own forward ((loss, pred, mask) in models_mae.py), with `noise=` (MAE's per-patch
    noise, passed to forward_encoder) and, for lamb > 0, its loss plus lamb * L_unif. The two terms
    are kept (detached) in `model.umae_losses`."""
    state = getattr(self, _STATE)
    state["pending_unif"], state["noise"] = None, noise
    try:
        out = type(self).forward(self, *args, **kwargs)
    finally:
        state["noise"] = None
    unif = state.pop("pending_unif", None)
    if state["lamb"] == 0:
        return out
    if unif is None:
        raise RuntimeError("umae.patch(lamb > 0): the model's forward did not call forward_encoder")
    if len(out) > 3 and not state.get("warned_double"):
        # U-MAE's official forward returns (loss, pred, mask, cls_feats, outputs) for its loop to add the term
        warnings.warn(_DOUBLE_COUNT, stacklevel=2)
        state["warned_double"] = True
    loss_mae = out[0]
    self.umae_losses = {"loss_mae": loss_mae.detach(), "loss_unif": unif.detach()}
    return (loss_mae + state["lamb"] * unif, *out[1:])


_DOUBLE_COUNT = ("umae.patch(lamb > 0): the model's forward returns its cls features besides (loss, pred, mask), "
                 "as U-MAE's official models_mae.py does for a training loop (engine_pretrain.py) that adds the "
                 "uniformity term itself; the returned loss already holds lamb * L_unif, so such a loop counts it "
                 "twice. Patch with lamb=0 and keep the loop's term (umae.uniformity_loss(cls_feats) is its fused "
                 "form), or drop the loop's term")


# ---- patch / unpatch --------------------------------------------------------------------

class _Bound:
    """A patched method: `fn` bound to `module`, as types.MethodType, but picklable. A bound
    method pickles as getattr(module, fn.__name__), a name the loaded module lacks; this pickles
    as the function by its module-level name and the module, so torch.save(model) of a patched
    model loads back patched."""

    def __init__(self, fn, module):
        self.__func__, self.__self__ = fn, module
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        params = list(inspect.signature(fn).parameters.values())[1:]  # as a bound method's: no self
        self.__signature__ = inspect.Signature(params)

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return _Bound, (self.__func__, self.__self__)


def _bind(module, name: str, fn, record: dict) -> None:
    setattr(module, name, _Bound(fn, module))
    record.setdefault(id(module), (module, []))[1].append(name)


def _cache(module, record: dict) -> None:
    """An empty cache of the fixed position table (_fixed_table), removed by unpatch as the methods are."""
    module.__dict__[_POS_CACHE] = {}
    record.setdefault(id(module), (module, []))[1].append(_POS_CACHE)


def patch(model: torch.nn.Module, *, lamb: float = 0.0, exclude_diagonal: bool = False,
          cls_double_norm: bool = True, exact_ddp_grad: bool = True) -> torch.nn.Module:
    """Route `model`'s masking, decoder restore and reconstruction loss through umae's ops (in
    place; returns `model`). Idempotent: patching a patched model re-applies it with the new
    settings. `lamb > 0`: the returned loss gains lamb * U-MAE's uniformity term on the
    encoder's cls feature: after the final norm and, as U-MAE's official forward
    (cls_double_norm=True), that norm applied once more; the terms are on the output
    (transformers: `out.loss_mae`, `out.loss_unif`) or in `model.umae_losses` (MAE-style).
    An official U-MAE model built with global_pool=True gets the term on its own pooled feature
    (fc_norm of the mean patch token), as its forward computes it; a transformers VideoMAE (no cls
    token) gets it on the mean of its encoder's visible tokens.

    Under DDP the term is over the global batch. exact_ddp_grad=True (default): after DDP averages
    the ranks' gradients, the parameters get exactly the gradient of the global-batch loss.
    exact_ddp_grad=False: U-MAE's official GatherLayer, whose backward keeps only the rank's own
    slice, so DDP's averaging scales the term's gradient by 1 / world size (0.5 at 2 ranks): what a
    reproduction of the paper's runs needs. The loss value is the same either way.

    The patched forward of a facebookresearch/mae-style model takes `noise=` (MAE's per-patch noise,
    (N, L): the same noise gives the same mask) and passes it to forward_encoder.
    Raises TypeError, patching nothing, for a model it does not recognise. A torch.compile'd or
    DDP-wrapped model is patched underneath its wrapper (dynamo recompiles at the next call)."""
    wrapper, model = model, _unwrap(model)
    kind = _kind(model)
    lamb = float(lamb)
    if lamb < 0:
        raise ValueError(f"lamb must be >= 0, got {lamb}")
    if lamb > 0 and kind in ("hf_model", "hf_video_model"):
        raise ValueError("lamb > 0 needs a model that returns a loss: patch the ViTMAEForPreTraining or "
                         "VideoMAEForPreTraining")
    if kind == "mae_style" and lamb > 0 and type(model).__name__ == "MaskedAutoencoderViT" and \
            type(model).__module__.startswith("umae."):
        raise ValueError("umae's own models have the uniformity term built in: set their `lamb` instead")
    unpatch(model)
    record: dict = {}
    if kind in ("hf_pretraining", "hf_model"):
        vit = model.vit if kind == "hf_pretraining" else model
        _bind(vit.embeddings, "forward", _hf_embeddings_forward, record)
        if kind == "hf_pretraining":
            _bind(model.decoder, "forward", _hf_decoder_forward, record)
            _bind(model, "forward", _hf_pretraining_forward, record)
    elif kind in ("hf_video_pretraining", "hf_video_model"):
        videomae = model.videomae if kind == "hf_video_pretraining" else model
        _bind(videomae.embeddings, "forward", _hf_video_embeddings_forward, record)
        _cache(videomae.embeddings, record)
        if kind == "hf_video_pretraining":
            _bind(model, "forward", _hf_video_pretraining_forward, record)
            _cache(model, record)
    else:
        _bind(model, "forward_encoder", _mae_forward_encoder, record)
        _bind(model, "forward_decoder", _mae_forward_decoder, record)
        _bind(model, "forward_loss", _mae_forward_loss, record)
        _bind(model, "forward", _mae_forward, record)
    # a plain dict attribute (not a Module / Parameter): invisible to state_dict and .to()
    object.__setattr__(model, _STATE, dict(kind=kind, lamb=lamb, exclude_diagonal=bool(exclude_diagonal),
                                           cls_double_norm=bool(cls_double_norm),
                                           exact_ddp_grad=bool(exact_ddp_grad), methods=list(record.values())))
    return wrapper


def _unwrap(model):
    """The module under torch.compile's OptimizedModule and (Distributed)DataParallel wrappers:
    methods bound on a compiled wrapper would be mutations dynamo refuses at the next call."""
    from torch._dynamo.eval_frame import OptimizedModule

    while True:
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch` (a no-op on a model that is not patched); returns `model`."""
    wrapper, model = model, _unwrap(model)
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return wrapper
    for module, names in state["methods"]:
        for name in names:
            module.__dict__.pop(name, None)
    model.__dict__.pop("umae_losses", None)
    return wrapper


def is_patched(model: torch.nn.Module) -> bool:
    return _STATE in _unwrap(model).__dict__
