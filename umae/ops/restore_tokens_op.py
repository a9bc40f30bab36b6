"""The decoder's restore: the public op, the reference (facebookresearch/mae `forward_decoder`,
from the mask-token cat to the positional embedding add), the fused function, the fakes and the
output's shape rule, the Triton launchers' registration and the registry entry.

Where it runs: csrc/cpu/restore_tokens.cpp holds the schemas, the CPU kernel and the autograd, in C++
for every device, Triton's too: a call is one dispatcher entry and the backward runs no Python
autograd (the host time of a small op on a GPU); kernels/restore_tokens.py holds the Triton kernels,
whose launchers register below at the CUDA key and write into `_output`'s allocation.
"""
from __future__ import annotations

import torch

from . import _common
from ._tolerance import EXACT, TOL, Parity
from ._common import CPP_CPU_TRITON_CUDA, Op, acc_dtype, result_dtype


def restore_tokens(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor | None = None, has_cls: bool = True, *,
                   backend: str | None = None) -> torch.Tensor:
    """MAE's decoder input: x (N, [1 +] len_keep, D) -> (N, [1 +] L, D).

    Kept tokens go back to their original positions (ids_restore (N, L) int64 from
    `random_masking`), mask_token (1, 1, D) fills the removed ones, the cls token (x[:, 0] when
    has_cls) stays in front, and pos_embed (1, [1 +] L, D) is added, in one pass. Gradients reach
    x, mask_token and pos_embed; the mask token's is a deterministic two-level sum (no atomics).
    ids_restore must be a permutation per row: the C++ CPU kernel checks it on the host; the Triton
    kernel never addresses memory by a bad id, and its launcher checks the ids on the device (on
    CUDA a device-side assert, no host sync: kernels/restore_tokens.py check_ids says why).
    """
    _common.tensor(x, "x", dims=3)
    _common.tensor(ids_restore, "ids_restore", dims=2, floating=False)
    if ids_restore.dtype != torch.int64:
        raise TypeError(f"ids_restore must be int64, got {ids_restore.dtype}")
    N, L = ids_restore.shape
    c = int(bool(has_cls))
    D = x.shape[2]
    if x.shape[0] != N:
        raise ValueError(f"x has batch {x.shape[0]} but ids_restore has batch {N}")
    if not c <= x.shape[1] <= L + c:
        raise ValueError(f"x must have between {c} and {L + c} tokens for ids_restore with L={L}"
                         f"{' and a cls token' if c else ''}, got {x.shape[1]}")
    _common.same_device(x, "x", ids_restore, "ids_restore")
    _common.param(mask_token, "mask_token", (1, 1, D), x)
    _common.param(pos_embed, "pos_embed", (1, L + c, D), x)
    has_cls = bool(has_cls)
    if _common.fused(RESTORE_TOKENS, (x, mask_token, pos_embed), backend):
        return restore_tokens_fused(x, ids_restore, mask_token, pos_embed, has_cls)
    return restore_tokens_reference(x, ids_restore, mask_token, pos_embed, has_cls)


def restore_tokens_reference(x, ids_restore, mask_token, pos_embed=None, has_cls=True):
    N, L = ids_restore.shape
    c = int(has_cls)
    mask_tokens = mask_token.repeat(N, L + c - x.shape[1], 1)
    x_ = torch.cat([x[:, c:, :], mask_tokens], dim=1)  # no cls token
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
    if has_cls:
        x_ = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
    if pos_embed is not None:
        x_ = x_ + pos_embed
    return x_


def restore_tokens_fused(x, ids_restore, mask_token, pos_embed=None, has_cls=True):
    """umae::restore_tokens: the C++ kernel on CPU (csrc/cpu/restore_tokens.cpp), the Triton kernel on
    CUDA (kernels/restore_tokens.py)."""
    return _RESTORE_TOKENS(x, ids_restore, mask_token, pos_embed, has_cls)


def _output(x, ids_restore, mask_token, pos_embed, has_cls):
    """The output allocated: the one shape and dtype rule, for the fake and the Triton launcher (the C++
    kernel keeps its own checks)."""
    N, L = ids_restore.shape
    return x.new_empty((N, L + int(has_cls), x.shape[2]), dtype=result_dtype(x, mask_token, pos_embed))


_restore_fake = _output


def _backward_fake(grad_out, ids_restore, len_x, has_cls, need_pos, x_dtype, tok_dtype, pos_dtype):
    N, L = ids_restore.shape
    D = grad_out.shape[2]
    return (grad_out.new_empty((N, len_x, D), dtype=x_dtype), grad_out.new_empty((1, 1, D), dtype=tok_dtype),
            grad_out.new_empty((1, L + int(has_cls), D) if need_pos else (0,), dtype=pos_dtype))


_RESTORE_TOKENS = None
if _common.EXT_LOADED:  # the autograd is C++ (csrc/cpu/restore_tokens.cpp), for every device
    _RESTORE_TOKENS = torch.ops.umae.restore_tokens.default
    torch.library.register_fake("umae::restore_tokens")(_restore_fake)
    torch.library.register_fake("umae::restore_tokens_backward")(_backward_fake)

# the Triton kernel module and its launchers ({op name: launcher}) for the CUDA key; None without Triton
KERNELS = TRITON_KERNELS = None
if _common.TRITON_USABLE:
    from ..kernels import restore_tokens as KERNELS

    def _triton_backward(grad_out, ids_restore, len_x, has_cls, need_pos, x_dtype, tok_dtype, pos_dtype):
        # x's gradient is stored in x's dtype by the kernel: no fp32 copy to convert under autocast
        N, D = ids_restore.shape[0], grad_out.shape[2]
        gx = grad_out.new_empty((N, len_x, D), dtype=x_dtype)
        gtok = KERNELS.backward(grad_out, ids_restore, gx, has_cls=has_cls)
        gpos = grad_out.new_empty((0,), dtype=pos_dtype)
        if need_pos:  # accumulated in fp32 as it reads (sum's dtype=): no fp32 copy of the gradient
            gpos = grad_out.sum(0, keepdim=True, dtype=acc_dtype(grad_out.dtype))
            gpos = gpos if gpos.dtype == pos_dtype else gpos.to(pos_dtype)
        return gx, (gtok if gtok.dtype == tok_dtype else gtok.to(tok_dtype)).view(1, 1, D), gpos

    def _triton_forward(x, ids_restore, mask_token, pos_embed, has_cls):
        out = _output(x, ids_restore, mask_token, pos_embed, has_cls)
        KERNELS.forward(x, ids_restore, mask_token, pos_embed, out, has_cls=has_cls)
        return out

    TRITON_KERNELS = {"restore_tokens": _triton_forward, "restore_tokens_backward": _triton_backward}
    _common.register_kernels(TRITON_KERNELS, "CUDA")


RESTORE_TOKENS = Op("restore_tokens", "umae::restore_tokens", restore_tokens, restore_tokens_reference,
                    restore_tokens_fused, CPP_CPU_TRITON_CUDA,
                    kernels=KERNELS, triton_kernels=TRITON_KERNELS,
                    parity=Parity(EXACT, TOL))
