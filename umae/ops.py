"""The public ops: the one place that chooses fused kernel or reference.

Each op checks its arguments (errors name the argument), asks `_backend.implementation`
which implementation runs for its inputs' device and dtypes, and calls the registry's
reference or fused entry (umae/registry.py; they live in umae/<op>_op.py). `backend=`
("fused" / "reference") overrides the global switch for one call.

Double backward (create_graph=True, then a gradient of the gradient): the references support it
everywhere. Fused, the linear ops support it (patchify / unpatchify through each other's
kernels; random_masking / restore_tokens by a backward in torch ops when the backward is
recorded); the losses (mae_loss, masked_mse_loss, uniformity_loss) compute their gradient in a
kernel and refuse it: create_graph=True works while the gradient is only read, and taking a
gradient of it raises a RuntimeError that names the op and the reference as the way out.
"""
from __future__ import annotations

import numbers
import operator

import torch

from . import _backend, _checks, registry, uniformity_op

registry.load_all()


def _run(op: str, tensors: tuple, backend: str | None, *args, **kwargs):
    spec = registry.OPS[op]
    impl = _backend.implementation(op, *tensors, backend=backend)
    return (spec.reference_fn if impl == "reference" else spec.entry_fn(impl))(*args, **kwargs)


def _is_bool(v) -> bool:
    return isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"))


def _as_int(v):
    """v as a Python int if it is an integer (int, numpy integer: operator.index), not a bool (numpy's
    may have __index__) nor a tensor (whose value may live on a GPU); else None."""
    if _is_bool(v) or isinstance(v, torch.Tensor):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _as_float(v):
    """v as a Python float if it is a real number (int, float, numpy scalar), not a bool nor a tensor;
    else None."""
    if _is_bool(v) or isinstance(v, torch.Tensor):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    return None


def _pair(v, name: str) -> tuple[int, int]:
    """image_size: a positive int H or a pair (H, W) of positive ints (numpy integers too)."""
    vals = (v, v) if _as_int(v) is not None else tuple(v) if isinstance(v, (tuple, list)) else ()
    ints = tuple(_as_int(i) for i in vals)
    if len(ints) != 2 or any(i is None for i in ints):
        raise TypeError(f"{name} must be an int or a pair (H, W) of ints, got {v!r}")
    if min(ints) <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return ints


def _check_patch_size(p) -> int:
    """patch_size as a Python int (numpy integers accepted), or a ValueError naming it."""
    q = _as_int(p)
    if q is None or q <= 0:
        raise ValueError(f"patch_size must be a positive int, got {p!r}")
    return q


def _check_images(imgs: torch.Tensor, p, name: str = "imgs") -> int:
    _checks.tensor(imgs, name, dims=4)
    p = _check_patch_size(p)
    H, W = imgs.shape[2:]
    if H % p or W % p:
        raise ValueError(f"{name} height and width ({H}, {W}) must be divisible by patch_size {p}")
    return p


# ---- patchify / unpatchify -----------------------------------------------------------

def patchify(imgs: torch.Tensor, patch_size: int, *, backend: str | None = None) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), ordered as facebookresearch/mae's `patchify`.

    Any strides are accepted (no copy); the output is contiguous.
    """
    patch_size = _check_images(imgs, patch_size)
    return _run("patchify", (imgs,), backend, imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, image_size, channels: int = 3, *,
               backend: str | None = None) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), the exact inverse of `patchify`; image_size is H or (H, W)."""
    _checks.tensor(x, "x", dims=3)
    p = _check_patch_size(patch_size)
    H, W = _pair(image_size, "image_size")
    if H % p or W % p:
        raise ValueError(f"image_size ({H}, {W}) must be divisible by patch_size {p}")
    c = _as_int(channels)
    if c is None or c <= 0:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    channels = c
    h, w = H // p, W // p
    if x.shape[1] != h * w or x.shape[2] != p * p * channels:
        raise ValueError(f"x must have shape (N, {h * w}, {p * p * channels}) for image_size ({H}, {W}), "
                         f"patch_size {p}, channels {channels}; got {tuple(x.shape)}")
    return _run("unpatchify", (x,), backend, x, p, h, w, channels)


# ---- reconstruction loss -------------------------------------------------------------

def _check_loss_args(pred, target, mask, target_name: str, expected_target_shape=None):
    _checks.tensor(pred, "pred", dims=3)
    _checks.tensor(target, target_name)  # floating: an int, uint8 or complex target has no MSE here
    _checks.tensor(mask, "mask", dims=2, floating=False)
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a floating or bool tensor (1 = removed), got {mask.dtype}")
    _checks.same_device(pred=pred, **{target_name: target}, mask=mask)
    _checks.nonempty_batch(pred, "pred")
    if expected_target_shape is not None:
        _checks.shape(target, target_name, expected_target_shape, "(the shape of pred)")
    _checks.shape(mask, "mask", pred.shape[:2], "(N, L of pred)")
    if (pred.dtype == torch.float64) != (target.dtype == torch.float64):
        raise TypeError(f"pred ({pred.dtype}) and {target_name} ({target.dtype}): float64 goes with float64 only")


def _check_norm_pix(norm_pix: bool, K: int) -> None:
    if norm_pix and K < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch (unbiased variance), pred has K={K}")


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    norm_pix: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """MAE's `forward_loss` on a patchified target (N, L, K); fp32 scalar.

    With norm_pix, each target patch is normalized by its mean and unbiased variance
    (eps NORM_PIX_EPS = 1e-6). The squared error is averaged over K, then over the removed
    patches (mask == 1). A mask with no removed patch gives 0 (and zero gradient), not NaN.
    NaN in pred or target propagates to the loss, as in the reference.
    """
    _check_loss_args(pred, target, mask, "target", pred.shape)
    _check_norm_pix(norm_pix, pred.shape[2])
    return _run("masked_mse_loss", (pred, target), backend, pred, target, mask, norm_pix=norm_pix)


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """`masked_mse_loss(pred, patchify(imgs, patch_size), mask, norm_pix)` with patchify fused in:
    the (normalized) target is never written to memory."""
    p = _check_images(imgs, patch_size)
    N, C, H, W = imgs.shape
    _check_loss_args(pred, imgs, mask, "imgs")
    if pred.shape != (N, (H // p) * (W // p), p * p * C):
        raise ValueError(f"pred must have shape (N, L, p*p*C) = {(N, (H // p) * (W // p), p * p * C)} "
                         f"for imgs {tuple(imgs.shape)} and patch_size {p}, got {tuple(pred.shape)}")
    _check_norm_pix(norm_pix, pred.shape[2])
    return _run("mae_loss", (pred, imgs), backend, pred, imgs, mask, p, norm_pix=norm_pix)


# ---- masking and restore -------------------------------------------------------------

def _check_param(t, name: str, shape: tuple, ref: torch.Tensor) -> None:
    if t is None:
        return
    _checks.tensor(t, name)
    _checks.shape(t, name, shape)
    _checks.same_device(x=ref, **{name: t})


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                   pos_embed: torch.Tensor | None = None, cls_token: torch.Tensor | None = None, *,
                   backend: str | None = None):
    """MAE's per-sample random masking -> (x_masked, mask, ids_restore).

    len_keep = int(L * (1 - mask_ratio)) tokens with the smallest noise are kept, in ascending
    noise order (ties by index: a stable argsort). mask (N, L) fp32 is 1 for removed patches, in
    the original order; ids_restore (N, L) int64 is the inverse permutation. pos_embed (1, L, D)
    is added to the kept tokens (the fused kernel never forms x + pos_embed for removed ones);
    cls_token (1, 1, D), its own positional embedding already added, is prepended. Output dtype
    follows type promotion of x, pos_embed and cls_token, as in the reference. Without noise,
    noise = torch.rand(N, L) from torch's default generator (same seed, same mask; no host sync).
    len_keep may round to 0 (x_masked then holds only the cls token, or no token).
    """
    _checks.tensor(x, "x", dims=3)
    r = _as_float(mask_ratio)
    if r is None or not 0 <= r < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    mask_ratio = r
    N, L, D = x.shape
    if noise is not None:
        _checks.tensor(noise, "noise", dims=2)
        _checks.shape(noise, "noise", (N, L), "(N, L of x)")
        _checks.same_device(x=x, noise=noise)
    _check_param(pos_embed, "pos_embed", (1, L, D), x)
    _check_param(cls_token, "cls_token", (1, 1, D), x)
    return _run("random_masking", (x, pos_embed, cls_token), backend, x, mask_ratio, noise, pos_embed, cls_token)


def restore_tokens(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor | None = None, has_cls: bool = True, *,
                   backend: str | None = None) -> torch.Tensor:
    """MAE's decoder input: x (N, [1 +] len_keep, D) -> (N, [1 +] L, D).

    Kept tokens go back to their original positions (ids_restore (N, L) int64 from
    `random_masking`), mask_token (1, 1, D) fills the removed ones, the cls token (x[:, 0] when
    has_cls) stays in front, and pos_embed (1, [1 +] L, D) is added, in one pass.
    ids_restore must be a permutation per row: the C++ CPU kernel checks it on the host; the Triton
    kernel never addresses memory by a bad id, and its launcher checks the ids on the device (on
    CUDA a device-side assert, no host sync: kernels/restore_tokens.py check_ids says why).
    """
    _checks.tensor(x, "x", dims=3)
    _checks.tensor(ids_restore, "ids_restore", dims=2, floating=False)
    if ids_restore.dtype != torch.int64:
        raise TypeError(f"ids_restore must be int64, got {ids_restore.dtype}")
    N, L = ids_restore.shape
    c = int(bool(has_cls))
    D = x.shape[2]
    if x.shape[0] != N:
        raise ValueError(f"x has batch {x.shape[0]} but ids_restore has batch {N}")
    if not c <= x.shape[1] <= L + c:
        raise ValueError(f"x must have between {c} and {L + c} tokens for ids_restore with L={L}"
                         f"{' and a cls token' if c else ''}, got {x.shape[1]}")
    _checks.same_device(x=x, ids_restore=ids_restore)
    _check_param(mask_token, "mask_token", (1, 1, D), x)
    _check_param(pos_embed, "pos_embed", (1, L + c, D), x)
    return _run("restore_tokens", (x, mask_token, pos_embed), backend, x, ids_restore, mask_token, pos_embed,
                has_cls=bool(has_cls))


# ---- uniformity ----------------------------------------------------------------------

def _world_size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


def uniformity_loss(features: torch.Tensor, normalize: bool = True, exclude_diagonal: bool = False,
                    process_group=None, exact_ddp_grad: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """U-MAE's uniformity loss: mean over pairs (i, j) of (z_i . z_j)^2, z_i = features_i / |features_i|.

    Default semantics equal the official code (zhangq327/U-MAE): normalize, diagonal included,
    mean over B^2 entries. exclude_diagonal=True averages the B(B-1) off-diagonal pairs (the
    paper's E_{x, x-} form). Returns an fp32 scalar (fp64 for fp64 features on the reference
    path); the gradient flows to `features`. A NaN in a row makes the loss NaN (as the
    reference); an all-zero row normalizes to zero (F.normalize's eps) and adds nothing.

    process_group (a torch.distributed group, or torch.distributed.group.WORLD): the loss over
    the global batch (every rank's rows; equal batch sizes per rank, checked at a group's first
    call only), the same scalar on every rank. Gradients: with exact_ddp_grad=True (default)
    each rank receives world_size x the gradient of the global loss for its own rows, so that after DDP averages gradients over
    ranks the parameters get exactly the gradient of the global loss. exact_ddp_grad=False
    reproduces the official GatherLayer, which returns only the local slice of the gradient
    without an all-reduce, so DDP's averaging scales the uniformity gradient by 1/world_size.
    """
    _checks.tensor(features, "features", dims=2)
    _checks.nonempty_batch(features, "features")
    if features.shape[1] == 0:
        raise ValueError(f"features must have at least one column (D >= 1): a 0-dimensional feature has no "
                         f"{'direction to normalize' if normalize else 'similarity'}, got shape {tuple(features.shape)}")
    if exclude_diagonal and features.shape[0] * _world_size(process_group) < 2:
        raise ValueError("exclude_diagonal needs at least 2 rows in features"
                         + (" (over the global batch)" if process_group is not None else ""))
    if process_group is not None:
        uniformity_op.check_equal_batches_once(features, process_group)
    return _run("uniformity_loss", (features,), backend, features, normalize=bool(normalize),
                exclude_diagonal=bool(exclude_diagonal), process_group=process_group,
                exact_ddp_grad=bool(exact_ddp_grad))
