"""The one list of umae's ops. Every face of an op is found from its entry here:

- `module` (umae/<op>_op.py): the reference, the fused entry (same signature) and the
  torch.library glue of the fused kernels (the op's benchmark case: umae/bench/cases.py);
- `impls`: the fused implementations, per device, with the dtypes each one runs;
- `kernels` (umae.kernels.<name>, kernels/ in the repo) and `token_shapes`: the Triton
  kernels and the (L, D) test shapes their sm_90 compile check launches at, besides every
  benchmark shape set and every model's training step (umae.bench.jit);
- `tests`: the op's parity test file.

`umae._backend.choose` / `backend_info`, the public ops in `umae.ops`, `umae.__all__`,
`umae bench` and the tests read this table. What adding an op touches: docs/design.md,
"How to add an op".
"""
from __future__ import annotations

import dataclasses
import importlib

import torch

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
FLOAT_DTYPES = (F32, BF16, F16, F64)  # the floating dtypes umae's ops take (references: all)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")
HALF_AND_FP32 = frozenset({F32, BF16, F16})
ALL_FLOATS = HALF_AND_FP32 | {F64}


@dataclasses.dataclass(frozen=True)
class Impl:
    """A fused implementation: `name` as `backend_info` reports it, the device type it runs on,
    the dtypes it takes, and what it needs: the C++ extension's kernel for `schema` at the
    dispatch key of `device`, or Triton (natively on CUDA, interpreted on CPU). `entry` names
    the function of the op's module that runs it (default: the op's `fused`)."""
    name: str  # "cpp-cpu" | "cuda" | "triton" | "triton-interpreter"
    device: str
    dtypes: frozenset
    schema: str | None = None  # C++ ops: the torch.ops name whose kernel must be registered
    entry: str | None = None


def cpp(schema: str, cuda_dtypes=ALL_FLOATS) -> tuple[Impl, ...]:
    return (Impl("cpp-cpu", "cpu", ALL_FLOATS, schema), Impl("cuda", "cuda", frozenset(cuda_dtypes), schema))


# Triton kernels compute in fp32 at most: float64 runs the reference, which is its fp64 path.
TRITON = (Impl("triton", "cuda", HALF_AND_FP32), Impl("triton-interpreter", "cpu", HALF_AND_FP32))


def cpp_cpu_then_triton(schema: str, entry: str) -> tuple[Impl, ...]:
    """A C++ CPU kernel (`entry` in the op's module calls `schema`), Triton on CUDA. On CPU the
    C++ kernel comes first; the interpreted Triton kernel runs under `_backend.use_impl`
    (the parity tests of the Triton kernels on CPU)."""
    return (Impl("cpp-cpu", "cpu", ALL_FLOATS, schema, entry),) + TRITON


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    module: str  # under umae: holds `reference` and `fused`
    reference: str
    fused: str
    impls: tuple[Impl, ...]
    kernels: str | None = None  # umae.kernels.<kernels>: the @triton.jit kernels and their launchers
    token_shapes: tuple = ()
    tests: str = ""

    def _attr(self, name):
        # looked up at call time (the op modules import this one, and tests may patch them),
        # through a dict torch.compile traces: umae.ops loads every module at import
        return getattr(_module(self.module), name)

    @property
    def reference_fn(self):
        return self._attr(self.reference)

    @property
    def fused_fn(self):
        return self._attr(self.fused)

    def kernel_module(self):
        return importlib.import_module(f"umae.kernels.{self.kernels}") if self.kernels else None

    def impls_for(self, device: str) -> tuple[Impl, ...]:
        """The implementations for `device`, in the order `choose` prefers them."""
        return tuple(i for i in self.impls if i.device == device)

    def entry_fn(self, impl_name: str):
        """The function of the op's module that runs implementation `impl_name`."""
        impl = next((i for i in self.impls if i.name == impl_name), None)
        return self._attr(impl.entry if impl is not None and impl.entry else self.fused)


# (L, D) of the masking / restore tests (tests/test_masking.py), as the compile check launches them
# (the models' and benchmarks' shapes it takes from their own launches).
TOKEN_SHAPES = ((49, 64), (196, 768), (197, 384), (256, 192), (1024, 1000), (64, 192), (196, 512), (64, 128),
                (256, 1024))

_ENTRIES = (
    Op("patchify", "patchify_op", "patchify_reference", "patchify_fused", cpp("umae::patchify"),
       tests="tests/test_patchify.py"),
    Op("unpatchify", "patchify_op", "unpatchify_reference", "unpatchify_fused", cpp("umae::unpatchify"),
       tests="tests/test_patchify.py"),
    Op("masked_mse_loss", "masked_mse_op", "masked_mse_loss_reference", "masked_mse_loss_fused",
       cpp("umae::patch_mse", cuda_dtypes=HALF_AND_FP32), tests="tests/test_masked_mse.py"),
    Op("mae_loss", "masked_mse_op", "mae_loss_reference", "mae_loss_fused",
       cpp("umae::patch_mse", cuda_dtypes=HALF_AND_FP32), tests="tests/test_masked_mse.py"),
    Op("random_masking", "random_masking_op", "random_masking_reference", "random_masking_fused",
       cpp_cpu_then_triton("umae::random_masking_cpp", "random_masking_cpp"),
       kernels="random_masking", token_shapes=TOKEN_SHAPES, tests="tests/test_masking.py"),
    Op("restore_tokens", "restore_tokens_op", "restore_tokens_reference", "restore_tokens_fused",
       cpp_cpu_then_triton("umae::restore_tokens_cpp", "restore_tokens_cpp"),
       kernels="restore_tokens", token_shapes=TOKEN_SHAPES, tests="tests/test_masking.py"),
    Op("uniformity_loss", "uniformity_op", "uniformity_loss_reference", "uniformity_loss_fused",
       cpp_cpu_then_triton("umae::uniformity_loss_cpp", "uniformity_loss_cpp"),
       kernels="uniformity", tests="tests/test_uniformity.py"),
)

OPS: dict[str, Op] = {op.name: op for op in _ENTRIES}
_modules: dict = {}


def _module(name: str):
    m = _modules.get(name)
    if m is None:
        m = _modules[name] = importlib.import_module(f"umae.{name}")
    return m


def load_all() -> None:
    """Import every op module (registers their torch.library glue)."""
    for op in _ENTRIES:
        _module(op.module)


def get(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; umae's ops: {', '.join(OPS)}") from None
