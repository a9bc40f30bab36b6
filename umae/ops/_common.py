"""What every op module uses, in one file: the argument checks (errors that name the argument), what
this process can run (the C++ extension `umae._C`, which holds every op's schema and its C++ kernels
and autograd, and Triton, whose launchers register here at the CUDA key), what an op is (`Op`, its
implementations per device: `Impl`), and the one switch between fused kernels and references, with
the ops' process-wide state (`STATE`).

The switch: `UMAE_BACKEND` is read at import (an invalid value refused at first use); `set_backend` / `use_backend` change it, and a
per-call `backend=` argument of the public ops overrides it for that call (a `fused=False` model
passes "reference"). Every public op asks `fused(op, tensors, backend)` whether its fused function
runs; `choose` gives the implementation and the reason, which `umae.ops.backend_info` reports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import operator
import os
import re
from types import ModuleType
from typing import Callable

import torch

from ._tolerance import Parity


# ---- argument checks --------------------------------------------------------------------------

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


def videos(videos: torch.Tensor, patch_size, tubelet_size, name: str = "videos") -> tuple[int, int]:
    """(p, ts) checked against videos (B, C, T, H, W): T divisible by ts, H and W by p."""
    tensor(videos, name, dims=5)
    p = patch_size_int(patch_size)
    ts = as_int(tubelet_size)
    if ts is None or ts <= 0:
        raise ValueError(f"tubelet_size must be a positive int, got {tubelet_size!r}")
    C, T, H, W = videos.shape[1:]
    if 0 in (C, T, H, W):
        raise ValueError(f"{name} must have at least one channel, frame, row and column, got shape {tuple(videos.shape)}")
    if T % ts:
        raise ValueError(f"{name} frames ({T}) must be divisible by tubelet_size {ts}")
    if H % p or W % p:
        raise ValueError(f"{name} height and width ({H}, {W}) must be divisible by patch_size {p}")
    return p, ts


def video_mask(mask, size: tuple, ref: torch.Tensor, ref_name: str, num_masked=None, rows: bool = True) -> int:
    """mask: bool of `size` (B, N tokens), on ref's device, True = masked, the same count in every row
    (what the video ops' shapes need); that count. Given num_masked, the rows are checked against it with no
    host sync on CUDA (a device-side assert); without it, the count is read from the first row and
    every row checked on the host. rows=False: the rows are left to a kernel that checks them itself."""
    tensor(mask, "mask", dims=2, floating=False)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = masked), got {mask.dtype}")
    B, N = size
    shape(mask, "mask", (B, N), "(batch, tokens)")
    same_device(ref, ref_name, mask, "mask")
    if not rows and num_masked is not None:
        return as_int(num_masked)
    counts = mask.sum(1)
    if num_masked is None:  # one host read: the counts
        got = counts.tolist()
        n = got[0] if B else 0
        if any(c != n for c in got):
            raise ValueError(f"mask must mask the same number of tokens in every row, got {got}")
        return n
    n = as_int(num_masked)
    if n is None or not 0 <= n <= N:
        raise ValueError(f"num_masked must be an int in [0, {N}], got {num_masked!r}")
    ok = (counts == n).all()
    msg = f"mask must mask the same number of tokens in every row, num_masked={n} tokens in every row"
    if mask.is_cuda or torch.compiler.is_compiling():  # traced: checked in the graph, no break
        torch._assert_async(ok, msg)
    elif not bool(ok):
        raise ValueError(f"{msg}, got {counts.tolist()}")
    return n


def device_constant(cache: dict, key, like: torch.Tensor, make):
    """`make()` (a tensor built from host data for calls like `like`'s), kept in `cache` under `key` for
    later calls: the copy to the device and its build, once. Not kept where it would not be a plain
    tensor later calls can use: while tracing (fake tensors: torch.compile, torch.export), while a CUDA
    graph is being captured (made by fills then: a host-to-device copy is not allowed there), and
    built outside inference mode (an inference tensor cannot be saved for a later backward)."""
    hit = cache.get(key)
    if hit is not None:
        return hit
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or is_fake(like):
        return make()
    if like.is_cuda and torch.cuda.is_current_stream_capturing():
        host = make(torch.device("cpu"))
        out = torch.empty(host.shape, dtype=host.dtype, device=like.device)
        for i, v in enumerate(host.flatten().tolist()):
            out.view(-1)[i].fill_(v)
        return out
    with torch.inference_mode(False):
        out = cache[key] = make()
    return out


def param(t, name: str, expected: tuple, ref: torch.Tensor) -> None:
    """An optional parameter tensor (pos_embed, cls_token, mask_token): floating, of `expected` shape,
    on ref's device."""
    if t is None:
        return
    tensor(t, name)
    shape(t, name, expected)
    same_device(ref, "x", t, name)


def result_dtype(*tensors) -> torch.dtype:
    """torch's type promotion over the given tensors (None skipped): the token ops' output dtype, as
    their references' adds and cats give it."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])


# ---- what this process can run: the extension and Triton ------------------------------------

def _load_ext():
    try:
        from .. import _C  # noqa: F401  (registers the umae:: schemas and kernels; torch is loaded first)
        return True, "C++ extension umae._C loaded"
    except ImportError as e:  # not built: references only, said plainly
        return False, f"C++ extension not built ({e}); run `pip install -e . --no-build-isolation`"


EXT_LOADED, EXT_REASON = _load_ext()


def _triton_available():
    try:
        import triton  # noqa: F401
        return True, ""
    except ImportError as e:
        return False, f"triton not importable ({e})"


TRITON_OK, TRITON_REASON = _triton_available()
# the Triton launchers need the ops' schemas, which the extension defines
TRITON_USABLE = EXT_LOADED and TRITON_OK


def triton_interpreted() -> bool:
    """Whether Triton kernels run under the interpreter: read at each use (a test or the compile
    check switches it on for a while); kernels/_util.py reads the same variable at its import, for
    the kernels' INTERPRETED branches."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_held = []  # the Libraries of the process-wide registrations (a Library's kernels live as long as it)


def register_kernels(kernels: dict, key: str, *, for_process: bool = True) -> torch.library.Library:
    """Register `kernels` ({op name: Python kernel}) at dispatch key `key` of umae's ops, for the
    process's life, or (for_process=False) until the returned Library's `_destroy()`."""
    lib = torch.library.Library("umae", "IMPL")
    for name, fn in kernels.items():
        lib.impl(name, fn, key)
    if for_process:
        _held.append(lib)
    return lib


# ---- what an op is --------------------------------------------------------------------------

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


# ---- the switch and the ops' state ----------------------------------------------------------

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


# ---- which implementation runs ----------------------------------------------------------------

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
    if not TRITON_OK:
        return False, TRITON_REASON
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
    return TRITON_USABLE and (device_type == "cuda" or (device_type == "cpu" and STATE.triton_on_cpu))


@contextlib.contextmanager
def use_triton_on_cpu(kernels: dict):
    """Register `kernels` (Triton launchers) at the CPU key over the C++ kernels while this holds, so
    CPU tensors run them under the interpreter (the parity tests of the Triton kernels on a machine
    without a GPU); on exit the C++ kernels are back."""
    import warnings

    prev = STATE.triton_on_cpu
    with warnings.catch_warnings():  # the override is the point: torch warns about it
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        lib = register_kernels(kernels, "CPU", for_process=False)
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
