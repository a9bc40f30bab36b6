"""What an op declares: its fused implementations (`Impl`), its registry entry (`Op`), and its
benchmark case (`Case`). Each op module (umae/ops/<op>_op.py) builds its own entry from these, by
reference; umae/ops/registry.py lists the entries.
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


def _has_kernel(schema: str, device: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(schema, {"cpu": "CPU", "cuda": "CUDA"}[device])
    except RuntimeError:  # no such op: the extension is not loaded
        return False


@dataclasses.dataclass(frozen=True)
class Op:
    """An op's every face, by reference: the public function (checks, then fused or reference),
    the reference (the semantics), the fused function (calls the custom op `schema`, whose
    dispatcher picks the device's kernel), the implementations per device, the benchmark case
    `bench(shape_set, dtype, device) -> Case`, the parity test file, and for Triton ops the
    kernel module, the launchers registered at the CUDA key ({op name: launcher}), the (L, D)
    test shapes of their sm_90 compile check, and whether the static audit holds their tile
    loads / stores to 128-bit accesses (`memory_bound`: row copies); `parity`: the tolerances its
    fused outputs and gradients meet against the reference (`umae check`, the parity tests);
    `launch_variants`: a function making the launches its cases do not (other flags), for the
    compile check."""
    name: str
    schema: str
    public: Callable
    reference: Callable
    fused: Callable
    impls: tuple[Impl, ...]
    bench: Callable
    tests: str
    kernels: ModuleType | None = None
    triton_kernels: dict | None = None
    token_shapes: tuple = ()
    memory_bound: bool = False
    parity: Parity | None = None
    # launches beyond its benchmark cases that the sm_90 compile check must see (flags the cases do not set)
    launch_variants: Callable | None = None
    # the devices whose C++/CUDA kernel of `schema` the extension registered, read once here (a
    # dispatcher query cannot be traced by torch.compile; the entry is built after the extension loads)
    cpp_devices: frozenset = dataclasses.field(init=False, default=frozenset())

    def __post_init__(self):
        object.__setattr__(self, "cpp_devices", frozenset(
            i.device for i in self.impls if i.kind == "cpp" and _has_kernel(self.schema, i.device)))

    def impls_for(self, device: str) -> tuple[Impl, ...]:
        """The implementations for `device`, in the order `choose` prefers them."""
        return tuple(i for i in self.impls if i.device == device)


# ---- benchmark cases ---------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One op at one shape: `forward()` calls the public op (the backend is set around it), the
    tensors that receive gradients, bytes the op must move and FLOPs of forward and backward."""
    op: str
    dtype: torch.dtype
    forward: Callable[[], object]
    grad_inputs: list
    bytes_fwd: float
    bytes_bwd: float
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    shape: str = ""


class NotApplicable(Exception):
    """A shape set that does not describe this op's inputs."""


def vit_shape(s: dict) -> dict:
    """A ViT shape set with its patch count L and patch length K = p*p*C; NotApplicable otherwise."""
    if "img" not in s:
        raise NotApplicable
    return dict(s, L=(s["img"] // s["p"]) ** 2, K=s["p"] ** 2 * s["C"])


def elt(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rand(*shape, dtype, device, grad=False):
    """Fresh random values made in fp32 and rounded once to dtype (never zeros)."""
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)
