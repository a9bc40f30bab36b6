"""umae: fused kernels for Masked Autoencoder and U-MAE training.

Every op has a fused implementation (C++/CUDA or Triton) and a pure-PyTorch reference
that defines its semantics; `set_backend` / `use_backend` / UMAE_BACKEND choose. The ops
are listed once, in umae/ops/registry.py.
"""
from .ops._common import get_backend, set_backend, use_backend
from .ops import (backend_info, decoder_tokens, format_backend_info, mae_loss, masked_mse_loss, patchify,
                  random_masking, restore_tokens, tube_mask, tubelet_patchify, tubelet_unpatchify, uniformity_loss, unpatchify, videomae_loss,
                  visible_tokens)
from . import models  # noqa: F401  (registers umae's models with timm: timm.create_model("umae_vit_..."))
from .patching import patch, unpatch

__version__ = "0.1.0"

__all__ = ["backend_info", "format_backend_info", "get_backend", "set_backend", "use_backend", "patch", "unpatch",
           "tube_mask", "visible_tokens", "decoder_tokens"] + [
    f.__name__ for f in (patchify, unpatchify, masked_mse_loss, mae_loss, random_masking, restore_tokens, uniformity_loss,
                         tubelet_patchify, tubelet_unpatchify, videomae_loss)]
