"""Triton kernels, installed as `umae.kernels` (the folder is `kernels/` in the repo).

One op per file. Each file holds the @triton.jit kernels and the launchers that allocate
outputs and pick block sizes by a rule (no autotuning: the same rule runs under the
interpreter). umae/bench/jit.py compiles, for sm_90 and without a GPU, exactly what Triton's JIT
compiles for the launches the launchers make (tests/test_triton_compile.py). Nothing here imports
umae: the kernels are the bottom layer.
"""
import functools as _functools
import os as _os
import sys as _sys

if __name__ == "kernels":
    # This folder is umae.kernels. Imported as a top-level `kernels` (a process whose sys.path holds
    # the repo root: `python -m ...` or `python -c` run there, PYTHONPATH=<repo>) it would shadow
    # PyPI's `kernels`, which transformers imports when installed: hand the name over to that one.
    import importlib.machinery as _machinery
    import importlib.util as _util

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    # by real path: the repo root may stand on sys.path under several spellings (a symlink)
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.realpath(p or ".") != _root])
    if _spec is not None and _spec.origin and _os.path.realpath(_spec.origin) != _os.path.realpath(__file__):
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_real)

import torch as _torch  # noqa: E402


def interpreted() -> bool:
    """The one place that decides whether Triton kernels run under the interpreter (importing
    umae.kernels loads no Triton: umae.ops._backend asks this on machines without it)."""
    return _os.environ.get("TRITON_INTERPRET", "0") == "1"


def promoted(*tensors) -> _torch.dtype:
    """torch's type promotion over the given tensors (None skipped): the token ops' output dtype,
    as their references' adds and cats give it (umae.ops._checks.result_dtype is this)."""
    return _functools.reduce(_torch.promote_types, [t.dtype for t in tensors if t is not None])
