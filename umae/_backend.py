"""The one switch between fused kernels and their pure-PyTorch references.

`UMAE_BACKEND` is read once, at import; `set_backend` / `use_backend` change it later, and a
per-call `backend=` argument of the public ops overrides it for that call (a `fused=False`
model passes "reference"). Every public op asks `choose(op, device, dtypes)` which
implementation runs, from the registry's declarations (umae/registry.py), and
`backend_info()` reports those same decisions with their reasons.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re

import torch

from . import registry
from .kernels import interpreted

BACKENDS = ("fused", "reference")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


# A process-wide global (not thread-local): autograd runs backward on its own threads. An invalid
# UMAE_BACKEND is refused at first use, not at import: `import umae` stays clean, and the CLI can
# answer it with one line.
_ENV = os.environ.get("UMAE_BACKEND", "fused").strip().lower() or "fused"
_backend = _ENV if _ENV in BACKENDS else None


def get_backend() -> str:
    if _backend is None:
        raise ValueError(f"UMAE_BACKEND={os.environ.get('UMAE_BACKEND')!r} is not a backend; "
                         f"set it to one of {', '.join(BACKENDS)} or unset it")
    return _backend


def set_backend(name: str) -> None:
    """Route every umae op to its fused kernel ("fused") or its reference ("reference")."""
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of `set_backend`; restores the previous backend on exit."""
    prev = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


# ---- what this process can run --------------------------------------------------------

def triton_interpreted() -> bool:
    """Whether Triton kernels run under the interpreter (decided in umae.kernels)."""
    return interpreted()


def _load_ext():
    try:
        from . import _C  # noqa: F401  (registers torch.ops.umae.* kernels; torch is loaded first)
        return True, "C++ extension umae._C loaded"
    except ImportError as e:  # not built: references only, said plainly
        return False, f"C++ extension not built ({e}); run `pip install -e . --no-build-isolation`"


EXT_LOADED, EXT_REASON = _load_ext()


def cuda_arch_ok(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether code built for `archs` (TORCH_CUDA_ARCH_LIST entries, "9.0", "8.6+PTX") runs on a GPU
    of `capability`: SASS of the same major at a minor <= the GPU's, or PTX of an arch <= it."""
    for a in archs:
        ptx = a.endswith("+PTX")
        m = re.match(r"(\d+)\.(\d+)", a)
        if not m:
            continue
        major, minor = int(m.group(1)), int(m.group(2))
        if (major == capability[0] and minor <= capability[1]) or (ptx and (major, minor) <= tuple(capability)):
            return True
    return False


@torch.compiler.assume_constant_result  # asked while tracing: a constant of the process
@functools.lru_cache(maxsize=None)  # and asked by every CUDA op call: read once
def _cuda_arch_reason() -> str:
    """'' if the extension holds CUDA code for the current GPU, else why not (asked on first CUDA use:
    reading the capability initializes CUDA, which importing umae must not do)."""
    try:
        from ._build import CUDA_ARCHS
    except ImportError:
        return ""  # a build without the record: nothing to check against
    cap = torch.cuda.get_device_capability()
    if cuda_arch_ok(cap, CUDA_ARCHS):
        return ""
    return (f"umae._C holds CUDA code for {', '.join(CUDA_ARCHS) or 'no arch'}, not this GPU's sm_{cap[0]}{cap[1]}; "
            f"rebuild with TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")


def _triton_available():
    try:
        import triton  # noqa: F401
        return True, ""
    except ImportError as e:
        return False, f"triton not importable ({e})"


TRITON_OK, TRITON_REASON = _triton_available()

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def _cpp_kernels() -> dict:
    # Asked once: torch.compile cannot trace the dispatcher query itself.
    if not EXT_LOADED:
        return {}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {(impl.schema, impl.device): has(impl.schema, _DISPATCH_KEY[impl.device])
            for op in registry.OPS.values() for impl in op.impls if impl.schema}


_CPP_KERNELS = _cpp_kernels()


def _runnable(impl: registry.Impl) -> tuple[bool, str]:
    """Whether this process can run `impl` at all (any dtype), and why not."""
    if impl.schema:
        if not EXT_LOADED:
            return False, EXT_REASON
        if not _CPP_KERNELS.get((impl.schema, impl.device), False):
            return False, f"umae._C has no {impl.device} kernel (built without it)"
        if impl.device == "cuda" and torch.cuda.is_available() and (why := _cuda_arch_reason()):
            return False, why
        return True, "C++ CPU kernel" if impl.device == "cpu" else "CUDA kernel"
    if not TRITON_OK:
        return False, TRITON_REASON
    if impl.name == "triton-interpreter":
        if not triton_interpreted():
            return False, "Triton needs a GPU; set TRITON_INTERPRET=1 to run the kernel on CPU"
        return True, "Triton kernel under TRITON_INTERPRET=1 (slow; for tests)"
    if triton_interpreted():  # a CUDA tensor with the interpreter on: the interpreter runs it
        return True, "TRITON_INTERPRET=1 (slow; for tests)"
    return True, "Triton kernel"


_preferred: str | None = None  # use_impl: an implementation name to pick where a device has several


@contextlib.contextmanager
def use_impl(name: str):
    """Prefer implementation `name` (e.g. "triton-interpreter") on devices that have it, over the
    registry's default order. For the parity tests of the Triton kernels on CPU, where the C++
    kernel comes first; `backend_info` reports it while it holds."""
    names = {i.name for op in registry.OPS.values() for i in op.impls}
    if name not in names:
        raise ValueError(f"use_impl takes one of {sorted(names)}, got {name!r}")
    global _preferred
    prev, _preferred = _preferred, name
    try:
        yield
    finally:
        _preferred = prev


def choose(op: str, device_type: str, dtypes=(torch.float32,), backend: str | None = None) -> tuple[str, str]:
    """(implementation, reason) for `op` on tensors of `device_type` ('cpu', 'cuda', ...) with
    floating `dtypes` (every floating input of the call); `backend` overrides the global switch.

    implementation is one of: "cpp-cpu", "cuda", "triton", "triton-interpreter", "reference".
    The first of the device's implementations (registry order; `use_impl` puts one first) that
    this process can run and that takes the dtypes wins.
    """
    spec = registry.get(op)
    if (_check(backend) if backend is not None else get_backend()) == "reference":
        return "reference", "backend is 'reference'"
    impls = spec.impls_for(device_type)
    if not impls:
        return "reference", f"no fused kernel for device {device_type!r}"
    if _preferred is not None and any(i.name == _preferred for i in impls):
        impls = tuple(i for i in impls if i.name == _preferred)
    refusal = None
    for impl in impls:
        ok, why = _runnable(impl)
        if not ok:
            refusal = refusal or why
            continue
        impl_name = "triton-interpreter" if impl.name == "triton" and triton_interpreted() else impl.name
        bad = [dt for dt in dtypes if dt not in impl.dtypes]
        if bad:
            refusal = refusal or (f"the {impl_name} kernel takes {', '.join(sorted(map(registry.dtype_name, impl.dtypes)))}, "
                                  f"not {registry.dtype_name(bad[0])} (the reference is that dtype's path)")
            continue
        return impl_name, why
    return "reference", refusal


def implementation(op: str, *tensors, backend: str | None = None) -> str:
    """`choose` for a call: the device of the first tensor, the dtypes of all floating ones."""
    first = next(t for t in tensors if t is not None)
    dtypes = tuple({t.dtype for t in tensors if t is not None and t.is_floating_point()})
    return choose(op, first.device.type, dtypes, backend)[0]


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
            for dt in registry.FLOAT_DTYPES:
                groups.setdefault(choose(op, d, (dt,)), []).append(registry.dtype_name(dt))
            parts = [f"{impl} [{' '.join(dts)}]: {why}" for (impl, why), dts in groups.items()]
            lines.append(f"  {op:<{w}}  {d:<4}  " + "; ".join(parts))
    return "\n".join(lines)
