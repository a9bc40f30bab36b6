"""The one switch between fused kernels and their pure-PyTorch references.

`UMAE_BACKEND` is read once, at import; `set_backend` / `use_backend` change it later, and a
per-call `backend=` argument of the public ops overrides it for that call (a `fused=False`
model passes "reference"). Every public op asks `fused(op, tensors, backend)` whether its fused
function runs, from its entry's declarations (umae/ops/_spec.py `Op`); `choose` gives the
implementation and the reason, which `umae.ops.backend_info` reports.
"""
from __future__ import annotations

import contextlib
import os
import re

import torch

from . import _library
from ._spec import Impl, Op, dtype_name

BACKENDS = ("fused", "reference")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


class _State:
    """The ops' process-wide state, all of it, in one place (not thread-local: autograd runs backward
    on its own threads): `backend`, the switch; `preferred`, the implementation `use_impl` puts first
    where a device has several; `triton_on_cpu`, whether Triton's launchers hold the CPU key (under
    use_impl("triton-interpreter")); `decided`, the fused-or-reference answer per call key (`fused`)."""

    def __init__(self):
        # an invalid UMAE_BACKEND is refused at first use, not at import: `import umae` stays clean, and
        # the CLI can answer it with one line
        env = os.environ.get("UMAE_BACKEND", "fused").strip().lower() or "fused"
        self.backend: str | None = env if env in BACKENDS else None
        self.preferred: str | None = None
        self.triton_on_cpu = False
        self.decided: dict = {}


STATE = _State()


def get_backend() -> str:
    if STATE.backend is None:
        raise ValueError(f"UMAE_BACKEND={os.environ.get('UMAE_BACKEND')!r} is not a backend; "
                         f"set it to one of {', '.join(BACKENDS)} or unset it")
    return STATE.backend


def set_backend(name: str) -> None:
    """Route every umae op to its fused kernel ("fused") or its reference ("reference")."""
    STATE.backend = _check(name)


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

EXT_LOADED, EXT_REASON = _library.EXT_LOADED, _library.EXT_REASON
triton_interpreted = _library.triton_interpreted


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


_ARCH_REASON: list = []


@torch.compiler.assume_constant_result  # asked while tracing: a constant of the process (a plain function:
def _cuda_arch_reason() -> str:  # Dynamo traces into an lru_cache wrapper's body)
    """'' if the extension holds CUDA code for the current GPU, else why not (asked on first CUDA use:
    reading the capability initializes CUDA, which importing umae must not do; read once)."""
    if not _ARCH_REASON:
        _ARCH_REASON.append(_arch_reason())
    return _ARCH_REASON[0]


def _arch_reason() -> str:
    try:
        from ._build import CUDA_ARCHS
    except ImportError:
        return ""  # a build without the record: nothing to check against
    cap = torch.cuda.get_device_capability()
    if cuda_arch_ok(cap, CUDA_ARCHS):
        return ""
    return (f"umae._C holds CUDA code for {', '.join(CUDA_ARCHS) or 'no arch'}, not this GPU's sm_{cap[0]}{cap[1]}; "
            f"rebuild with TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")


def _runnable(op: Op, impl: Impl) -> tuple[bool, str]:
    """Whether this process can run `op`'s implementation `impl` at all (any dtype), and why not."""
    if not EXT_LOADED:  # it holds every op's schema
        return False, EXT_REASON
    if impl.kind == "cpp":
        if impl.device not in op.cpp_devices:
            return False, f"umae._C has no {impl.device} kernel (built without it)"
        if impl.device == "cuda" and torch.cuda.is_available() and (why := _cuda_arch_reason()):
            return False, why
        return True, "C++ CPU kernel" if impl.device == "cpu" else "CUDA kernel"
    if not _library.TRITON_OK:
        return False, _library.TRITON_REASON
    if impl.name == "triton-interpreter":
        if not triton_interpreted():
            return False, "Triton needs a GPU; set TRITON_INTERPRET=1 to run the kernel on CPU"
        return True, "Triton kernel under TRITON_INTERPRET=1 (slow; for tests)"
    if triton_interpreted():  # a CUDA tensor with the interpreter on: the interpreter runs it
        return True, "TRITON_INTERPRET=1 (slow; for tests)"
    return True, "Triton kernel"


@contextlib.contextmanager
def prefer(name: str):
    """Pick implementation `name` on devices that have it (umae.ops.use_impl, which checks the name)."""
    prev, STATE.preferred = STATE.preferred, name
    try:
        yield
    finally:
        STATE.preferred = prev


def triton_runs_on(device_type: str) -> bool:
    """Whether umae's token ops run their Triton kernels for tensors of `device_type`."""
    return _library.TRITON_USABLE and (device_type == "cuda" or (device_type == "cpu" and STATE.triton_on_cpu))


@contextlib.contextmanager
def use_triton_on_cpu(kernels: dict):
    """Register `kernels` (Triton launchers) at the CPU key over the C++ kernels while this holds, so
    CPU tensors run them under the interpreter (the parity tests of the Triton kernels on a machine
    without a GPU); on exit the C++ kernels are back."""
    import warnings

    prev = STATE.triton_on_cpu
    with warnings.catch_warnings():  # the override is the point: torch warns about it
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        lib = _library.register_kernels(kernels, "CPU", for_process=False)
    STATE.triton_on_cpu = True
    try:
        yield
    finally:
        lib._destroy()
        STATE.triton_on_cpu = prev


def choose(spec: Op, device_type: str, dtypes=(torch.float32,), backend: str | None = None) -> tuple[str, str]:
    """(implementation, reason) for op `spec` on tensors of `device_type` ('cpu', 'cuda', ...) with
    floating `dtypes` (every floating input of the call); `backend` overrides the global switch.

    implementation is one of: "cpp-cpu", "cuda", "triton", "triton-interpreter", "reference".
    The first of the device's implementations (the entry's order; `umae.ops.use_impl` puts one
    first) that this process can run and that takes the dtypes wins.
    """
    if (_check(backend) if backend is not None else get_backend()) == "reference":
        return "reference", "backend is 'reference'"
    impls = spec.impls_for(device_type)
    if not impls:
        return "reference", f"no fused kernel for device {device_type!r}"
    if STATE.preferred is not None and any(i.name == STATE.preferred for i in impls):
        impls = tuple(i for i in impls if i.name == STATE.preferred)
    refusal = None
    for impl in impls:
        ok, why = _runnable(spec, impl)
        if not ok:
            refusal = refusal or why
            continue
        impl_name = "triton-interpreter" if impl.name == "triton" and triton_interpreted() else impl.name
        bad = [dt for dt in dtypes if dt not in impl.dtypes]
        if bad:
            refusal = refusal or (f"the {impl_name} kernel takes {', '.join(sorted(map(dtype_name, impl.dtypes)))}, "
                                  f"not {dtype_name(bad[0])} (the reference is that dtype's path)")
            continue
        return impl_name, why
    return "reference", refusal


def implementation(spec: Op, *tensors, backend: str | None = None) -> str:
    """`choose` for a call: the device of the first tensor, the dtypes of all floating ones."""
    first = next(t for t in tensors if t is not None)
    dtypes = tuple({t.dtype for t in tensors if t is not None and t.is_floating_point()})
    return choose(spec, first.device.type, dtypes, backend)[0]


# STATE.decided: (op, backend argument, global backend, preferred implementation, device type, the
# tensors' dtypes) -> whether the fused function runs: `choose` walks the registry, which costs more
# than a small op's kernel; the answer changes only with what the key holds (set_backend and prefer
# change the key).


def fused(spec: Op, tensors: tuple, backend: str | None) -> bool:
    """Whether a call of op `spec` on `tensors` (the first one not None; None for an absent optional
    tensor) runs its fused function (else its reference)."""
    x = tensors[0]
    dev = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None
    if dev is None or torch.compiler.is_compiling():  # a trace reads the registry itself, not this cache
        return implementation(spec, *tensors, backend=backend) != "reference"
    key = (spec.name, backend, STATE.backend, STATE.preferred, dev, *[t.dtype if t is not None else None for t in tensors])
    hit = STATE.decided.get(key)
    if hit is None:
        hit = STATE.decided[key] = implementation(spec, *tensors, backend=backend) != "reference"
    return hit
