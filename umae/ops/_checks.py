"""Argument checks shared by the public ops: clear errors that name the argument."""
from __future__ import annotations

import numbers
import operator

import torch

from ..kernels._env import promoted as result_dtype  # noqa: F401  (one rule for kernels and references)

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # the floating dtypes umae's ops take


# On the way of every call: the checks cost attribute reads when the arguments are right, and build
# their messages only when they are not.
_FLOAT_SET = frozenset(FLOATS)


def tensor(x, name: str, dims: int | tuple[int, ...] | None = None, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and (x.dim() != dims if type(dims) is int else x.dim() not in dims):
        dims_t = (dims,) if isinstance(dims, int) else dims
        raise ValueError(f"{name} must have {' or '.join(map(str, dims_t))} dims, got shape {tuple(x.shape)}")
    if floating and x.dtype not in _FLOAT_SET:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def same_device(a, a_name: str, b, b_name: str) -> None:
    """b (skipped when None) on a's device."""
    if b is None:
        return
    if a.is_cpu:
        same = b.is_cpu
    elif a.is_cuda:
        same = b.is_cuda and a.get_device() == b.get_device()
    else:
        same = a.device == b.device
    if not same:
        raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")


def shape(x, name: str, expected: tuple, what: str = "") -> None:
    if x.shape != expected:
        raise ValueError(f"{name} must have shape {tuple(expected)}{' ' + what if what else ''}, got {tuple(x.shape)}")


def nonempty_batch(x, name: str) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (size 0 on dim 0)")


def acc_dtype(dtype):
    """The dtype the references and kernels accumulate in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# ---- scalars and images (numpy scalars accepted: they are what a config loader gives) ----

def _is_bool(v) -> bool:
    return isinstance(v, bool) or (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"))


def as_int(v):
    """v as a Python int if it is an integer (int, numpy integer: operator.index), not a bool (numpy's
    may have __index__) nor a tensor (whose value may live on a GPU); else None."""
    if type(v) is int:
        return v
    if _is_bool(v) or isinstance(v, torch.Tensor):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def as_float(v):
    """v as a Python float if it is a real number (int, float, numpy scalar), not a bool nor a tensor;
    else None."""
    if type(v) is float:
        return v
    if _is_bool(v) or isinstance(v, torch.Tensor):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    return None


def pair(v, name: str) -> tuple[int, int]:
    """image_size: a positive int H or a pair (H, W) of positive ints (numpy integers too)."""
    if type(v) is int and v > 0:
        return v, v
    vals = (v, v) if as_int(v) is not None else tuple(v) if isinstance(v, (tuple, list)) else ()
    ints = tuple(as_int(i) for i in vals)
    if len(ints) != 2 or any(i is None for i in ints):
        raise TypeError(f"{name} must be an int or a pair (H, W) of ints, got {v!r}")
    if min(ints) <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return ints


def patch_size_int(p) -> int:
    """patch_size as a Python int (numpy integers accepted), or a ValueError naming it."""
    q = as_int(p)
    if q is None or q <= 0:
        raise ValueError(f"patch_size must be a positive int, got {p!r}")
    return q


def images(imgs: torch.Tensor, p, name: str = "imgs") -> int:
    tensor(imgs, name, dims=4)
    p = patch_size_int(p)
    C, H, W = imgs.shape[1:]
    if 0 in (C, H, W):  # no patch, or patches of no values: nothing unpatchify (its backward) could invert
        raise ValueError(f"{name} must have at least one channel, row and column, got shape {tuple(imgs.shape)}")
    if H % p or W % p:
        raise ValueError(f"{name} height and width ({H}, {W}) must be divisible by patch_size {p}")
    return p


def param(t, name: str, expected: tuple, ref: torch.Tensor) -> None:
    """An optional parameter tensor (pos_embed, cls_token, mask_token): floating, of `expected` shape,
    on ref's device."""
    if t is None:
        return
    tensor(t, name)
    shape(t, name, expected)
    same_device(ref, "x", t, name)
