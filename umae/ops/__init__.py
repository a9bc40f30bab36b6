"""The public ops and what runs them.

Each op lives in its module (umae/ops/<op>_op.py): its public function checks the arguments (errors
name the argument), asks `umae.ops._common.fused` whether the fused function runs for its inputs'
device and dtypes (the one switch; `backend=` "fused" / "reference" overrides it for one call),
and calls its fused function (the op's custom op, whose dispatcher picks the device's kernel: C++
on CPU, CUDA or Triton on GPU) or its reference. This module gives them by name from the registry,
with the reports of what runs: `choose`, `backend_info`, `format_backend_info`, and `use_impl`.

Double backward (create_graph=True, then a gradient of the gradient): the references support it
everywhere. Fused, the linear ops support it (patchify / unpatchify through each other's
kernels; random_masking / restore_tokens by a backward in torch ops when the backward is
recorded); the losses (mae_loss, masked_mse_loss, uniformity_loss) compute their gradient in a
kernel and refuse it: create_graph=True works while the gradient is only read, and taking a
gradient of it raises a RuntimeError that names the op and the reference as the way out.
"""
from __future__ import annotations

import contextlib

import torch

from . import _common, registry
from ._common import FLOATS, dtype_name, get_backend
# the public ops, each defined in its module (checks, then its fused function or its reference)
from .masked_mse_op import mae_loss, masked_mse_loss
from .patchify_op import patchify, unpatchify
from .random_masking_op import random_masking
from .restore_tokens_op import restore_tokens
from .tube_mask_op import tube_mask
from .tubelet_patchify_op import tubelet_patchify, tubelet_unpatchify
from .videomae_loss_op import videomae_loss
from .visible_tokens_op import visible_tokens
from .decoder_tokens_op import decoder_tokens
from .uniformity_op import uniformity_loss


def choose(op: str, device_type: str, dtypes=(torch.float32,), backend: str | None = None) -> tuple[str, str]:
    """(implementation, reason) for op `op` on tensors of `device_type` with floating `dtypes`
    (umae.ops._common.choose: "cpp-cpu", "cuda", "triton", "triton-interpreter" or "reference")."""
    return _common.choose(registry.get(op), device_type, dtypes, backend)


def implementation(op: str, *tensors, backend: str | None = None) -> str:
    """The implementation a call of `op` on `tensors` runs."""
    return _common.implementation(registry.get(op), *tensors, backend=backend)


@contextlib.contextmanager
def use_impl(name: str):
    """Prefer implementation `name` (e.g. "triton-interpreter") on devices that have it, over the
    registry's default order; `backend_info` reports it while it holds. "triton-interpreter"
    registers every op's Triton launchers at the CPU key, over the C++ kernels, so that the one
    custom op of each runs them (the parity tests of the Triton kernels on CPU)."""
    names = {i.name for op in registry.OPS.values() for i in op.impls}
    if name not in names:
        raise ValueError(f"use_impl takes one of {sorted(names)}, got {name!r}")
    on_cpu = name == "triton-interpreter" and _common.TRITON_USABLE
    kernels = {k: fn for op in registry.OPS.values() if op.triton_kernels for k, fn in op.triton_kernels.items()}
    with _common.prefer(name), (_common.use_triton_on_cpu(kernels) if on_cpu else contextlib.nullcontext()):
        yield


def default_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_info(devices=None, dtype=torch.float32) -> dict:
    """{op: {device: "implementation: reason"}} for the current backend and inputs of `dtype`.

    devices defaults to cpu, plus cuda when a GPU is visible.
    """
    devices = devices or default_devices()
    return {op: {d: "{}: {}".format(*choose(op, d, (dtype,))) for d in devices} for op in registry.OPS}


def format_backend_info(devices=None) -> str:
    """Per op and device, which implementation runs for which input dtypes, and why."""
    if isinstance(devices, dict):
        raise TypeError("format_backend_info takes a list of devices (it asks choose() per dtype), not a dict")
    devices = devices or default_devices()
    lines = [f"backend = {get_backend()!r}"]
    w = max(len(op) for op in registry.OPS)
    for op in registry.OPS:
        for d in devices:
            groups: dict = {}
            for dt in FLOATS:
                groups.setdefault(choose(op, d, (dt,)), []).append(dtype_name(dt))
            parts = [f"{impl} [{' '.join(dts)}]: {why}" for (impl, why), dts in groups.items()]
            lines.append(f"  {op:<{w}}  {d:<4}  " + "; ".join(parts))
    return "\n".join(lines)


__all__ = ["choose", "implementation", "use_impl", "backend_info", "format_backend_info", "tube_mask", "visible_tokens",
           "decoder_tokens"] + [
    f.__name__ for f in (patchify, unpatchify, masked_mse_loss, mae_loss, random_masking, restore_tokens, uniformity_loss,
                         tubelet_patchify, tubelet_unpatchify, videomae_loss)]
