"""What an op is: its fused implementations (`Impl`) and its registry entry (`Op`). Each op module
(umae/ops/<op>_op.py) builds its own entry from these, by reference; umae/ops/registry.py lists
the entries. What the benchmarks and tests do with an op lives with them (umae/bench/cases.py,
umae/bench/jit.py, tests/).
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Callable

import torch

from ._checks import FLOATS
from ._tolerance import Parity

F32, BF16, F16, F64 = FLOATS
HALF_AND_FP32 = frozenset({F32, BF16, F16})
ALL_FLOATS = HALF_AND_FP32 | {F64}


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class Impl:
    """A fused implementation: `name` as `backend_info` reports it, the device type it runs on,
    the dtypes it takes, and its `kind`: a C++/CUDA kernel of the extension, or Triton
    (natively on CUDA, interpreted on CPU)."""
    name: str  # "cpp-cpu" | "cuda" | "triton" | "triton-interpreter"
    device: str
    dtypes: frozenset
    kind: str  # "cpp" | "triton"


CPP = (Impl("cpp-cpu", "cpu", ALL_FLOATS, "cpp"), Impl("cuda", "cuda", ALL_FLOATS, "cpp"))
CPP_CUDA_NO_FP64 = (CPP[0], Impl("cuda", "cuda", HALF_AND_FP32, "cpp"))
# Triton kernels compute in fp32 at most: float64 runs the reference, which is its fp64 path. On CPU
# the C++ kernel comes first; the interpreted Triton kernel runs under `umae.ops.use_impl`.
CPP_CPU_TRITON_CUDA = (CPP[0], Impl("triton", "cuda", HALF_AND_FP32, "triton"),
                       Impl("triton-interpreter", "cpu", HALF_AND_FP32, "triton"))


_KERNELS_FOUND: dict = {}


@torch.compiler.assume_constant_result  # asked while tracing: a constant of the process (a plain function:
def _has_kernel(schema: str, device: str) -> bool:  # Dynamo traces into an lru_cache wrapper's query)
    """A dispatcher query, once per (schema, device), at first use: not at import."""
    key = (schema, device)
    if key not in _KERNELS_FOUND:
        try:
            _KERNELS_FOUND[key] = torch._C._dispatch_has_kernel_for_dispatch_key(
                schema, {"cpu": "CPU", "cuda": "CUDA"}[device])
        except RuntimeError:  # no such op: the extension is not loaded
            _KERNELS_FOUND[key] = False
    return _KERNELS_FOUND[key]


@dataclasses.dataclass(frozen=True)
class Op:
    """What an op is, by reference: the public function (checks, then fused or reference), the
    reference (the semantics), the fused function (calls the custom op `schema`, whose dispatcher
    picks the device's kernel), the implementations per device, and for Triton ops the kernel
    module and the launchers registered at the CUDA key ({op name: launcher}); `parity`: the
    tolerances its fused outputs and gradients meet against the reference (`umae check`, the
    parity tests)."""
    name: str
    schema: str
    public: Callable
    reference: Callable
    fused: Callable
    impls: tuple[Impl, ...]
    kernels: ModuleType | None = None
    triton_kernels: dict | None = None
    parity: Parity | None = None

    @property
    def cpp_devices(self) -> frozenset:
        """The devices whose C++/CUDA kernel of `schema` the extension registered (asked of the
        dispatcher at first use, once: see _has_kernel)."""
        return frozenset(i.device for i in self.impls if i.kind == "cpp" and _has_kernel(self.schema, i.device))

    def impls_for(self, device: str) -> tuple[Impl, ...]:
        """The implementations for `device`, in the order `choose` prefers them."""
        return tuple(i for i in self.impls if i.device == device)
