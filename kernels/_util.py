"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import contextlib
import functools

import torch
import triton

from .._backend import triton_interpreted as interpreted  # noqa: F401  (decided in one place)

H100_SM_COUNT = 132  # the target GPU's, where no GPU is visible (the interpreter, compile checks)

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int64: "i64", torch.int32: "i32"}


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of `device`'s GPU; the H100's where none is visible."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return H100_SM_COUNT


def on_device(t: torch.Tensor):
    """The device guard every launch needs: Triton launches on the current CUDA device, so a tensor
    on cuda:1 needs cuda:1 current (`umae train --device cuda:1` does not make it so)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def signature(fn, **ptr_types) -> dict:
    """The AOT signature of a kernel: each `*_ptr` argument typed as given (e.g. x_ptr="*bf16"),
    every other runtime argument (sizes, strides) "i32", as the launcher's small ints specialize."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = ptr_types[p.name]
        else:
            sig[p.name] = "i32"
    return sig


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    """Compile one kernel configuration for an H100 (sm_90) without a GPU. Needs a process where
    TRITON_INTERPRET is unset (the interpreter patches triton.language)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    # constexprs keyed by (argument index,): the form both triton 3.6 and 3.8 accept
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
