"""umae: fused kernels for Masked Autoencoder and U-MAE training.

Every op has a fused implementation (C++/CUDA or Triton) and a pure-PyTorch reference
that defines its semantics; `set_backend` / `use_backend` / UMAE_BACKEND choose. The ops
are listed once, in umae/registry.py.
"""
import os as _os
import sys as _sys


def _source_kernels():
    """In a source checkout used without an install (`python setup.py build_ext --inplace` and
    PYTHONPATH; old setuptools' `develop`), `umae.kernels` is the repo's kernels/ folder, as
    setup.py's package_dir maps it: load it from there when no installed copy is found."""
    import importlib.util

    if "umae.kernels" in _sys.modules or importlib.util.find_spec("umae.kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if _os.path.isfile(_os.path.join(src, "__init__.py")):
        spec = importlib.util.spec_from_file_location("umae.kernels", _os.path.join(src, "__init__.py"),
                                                      submodule_search_locations=[src])
        mod = importlib.util.module_from_spec(spec)
        _sys.modules["umae.kernels"] = mod
        spec.loader.exec_module(mod)


_source_kernels()

from . import ops as _ops  # noqa: E402
from ._backend import backend_info, format_backend_info, get_backend, set_backend, use_backend  # noqa: E402
from .patching import patch, unpatch  # noqa: E402
from .registry import OPS as _OPS  # noqa: E402

__version__ = "0.1.0"

globals().update({name: getattr(_ops, name) for name in _OPS})

__all__ = ["backend_info", "format_backend_info", "get_backend", "set_backend", "use_backend", "patch", "unpatch",
           *_OPS]
