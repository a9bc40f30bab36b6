"""What this process can run, and where the kernels register: the C++ extension (`umae._C`: every
op's schema, the C++ CPU and CUDA kernels) and Triton, whose launchers register here at the CUDA
key of the same ops (`register_kernels`). The switch (umae/ops/_backend.py) sits beside it, the op
modules (umae/ops/<op>_op.py) above both, and the reports of what runs (umae/ops/__init__.py) above those.
"""
from __future__ import annotations


import torch

from ..kernels._env import interpreted


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
    """Whether Triton kernels run under the interpreter (decided in umae.kernels)."""
    return interpreted()


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
