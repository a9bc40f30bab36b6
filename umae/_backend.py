"""The one switch between fused kernels and their pure-PyTorch references.

`UMAE_BACKEND` is read once, at import; `set_backend` / `use_backend` change it later.
Every public op asks `choose(op, device)` which implementation runs, and
`backend_info()` reports the same decisions with their reasons.
"""
from __future__ import annotations

import contextlib
import os

BACKENDS = ("fused", "reference")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


# A process-wide global (not thread-local): autograd runs backward on its own threads.
_backend = _check(os.environ.get("UMAE_BACKEND", "fused").strip().lower() or "fused")


def get_backend() -> str:
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


# ---- what can run where -------------------------------------------------------------

def _load_ext():
    import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

    try:
        from . import _C  # noqa: F401  (registers torch.ops.umae.* kernels)
        return True, "C++ extension umae._C loaded"
    except ImportError as e:  # not built: references only, said plainly
        return False, f"C++ extension not built ({e}); run `pip install -e . --no-build-isolation`"


EXT_LOADED, EXT_REASON = _load_ext()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available():
    try:
        import triton  # noqa: F401
        return True, ""
    except ImportError as e:
        return False, f"triton not importable ({e})"


TRITON_OK, TRITON_REASON = _triton_available()

# Which fused implementation each op has.
CPP_OPS = ("patchify", "unpatchify", "masked_mse_loss", "mae_loss")
TRITON_OPS = ("random_masking", "restore_tokens", "uniformity_loss")
OPS = CPP_OPS + TRITON_OPS

_CPP_SCHEMA = {"patchify": "umae::patchify", "unpatchify": "umae::unpatchify",
               "masked_mse_loss": "umae::patch_mse", "mae_loss": "umae::patch_mse"}


def _cpp_kernels() -> dict:
    # Asked once: torch.compile cannot trace the dispatcher query itself.
    if not EXT_LOADED:
        return {}
    import torch

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {(op, dev): has(schema, key) for op, schema in _CPP_SCHEMA.items()
            for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_CPP_KERNELS = _cpp_kernels()


def choose(op: str, device_type: str) -> tuple[str, str]:
    """(implementation, reason) for `op` on a tensor of `device_type` ('cpu', 'cuda', ...).

    implementation is one of: "cpp-cpu", "cuda", "triton", "triton-interpreter", "reference".
    """
    if get_backend() == "reference":
        return "reference", "backend is 'reference'"
    if op in CPP_OPS:
        if not EXT_LOADED:
            return "reference", EXT_REASON
        if not _CPP_KERNELS.get((op, device_type), False):
            return "reference", f"umae._C has no {device_type} kernel (built without it)"
        return ("cpp-cpu", "C++ CPU kernel") if device_type == "cpu" else ("cuda", "CUDA kernel")
    if op in TRITON_OPS:
        if not TRITON_OK:
            return "reference", TRITON_REASON
        if device_type == "cuda":
            if triton_interpreted():
                return "triton-interpreter", "TRITON_INTERPRET=1 (slow; for tests)"
            return "triton", "Triton kernel"
        if device_type == "cpu":
            if triton_interpreted():
                return "triton-interpreter", "Triton kernel under TRITON_INTERPRET=1 (slow; for tests)"
            return "reference", "Triton needs a GPU; set TRITON_INTERPRET=1 to run the kernel on CPU"
        return "reference", f"no fused kernel for device {device_type!r}"
    raise KeyError(f"unknown op {op!r}")


def backend_info(devices=None) -> dict:
    """{op: {device: "implementation: reason"}} for the current backend.

    devices defaults to cpu, plus cuda when a GPU is visible.
    """
    import torch

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {op: {d: "{}: {}".format(*choose(op, d)) for d in devices} for op in OPS}


def format_backend_info(info: dict | None = None) -> str:
    info = info or backend_info()
    devices = list(next(iter(info.values())).keys())
    lines = [f"backend = {get_backend()!r}"]
    w = max(len(op) for op in info)
    for op, per_dev in info.items():
        lines.append(f"  {op:<{w}}  " + " | ".join(f"{d}: {per_dev[d]}" for d in devices))
    return "\n".join(lines)
