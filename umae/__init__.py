"""umae: fused kernels for Masked Autoencoder and U-MAE training.

Every op has a fused implementation (C++/CUDA or Triton) and a pure-PyTorch reference
that defines its semantics; `set_backend` / `use_backend` / UMAE_BACKEND choose. The ops
are listed once, in umae/registry.py.
"""
from ._backend import get_backend, set_backend, use_backend
from .ops import backend_info, format_backend_info
from . import models  # noqa: F401  (registers umae's models with timm: timm.create_model("umae_vit_..."))
from .patching import patch, unpatch
from .registry import OPS as _OPS

__version__ = "0.1.0"

globals().update({name: op.public for name, op in _OPS.items()})

__all__ = ["backend_info", "format_backend_info", "get_backend", "set_backend", "use_backend", "patch", "unpatch",
           *_OPS]
