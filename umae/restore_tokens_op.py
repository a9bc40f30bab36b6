"""The decoder's restore: the reference (facebookresearch/mae `forward_decoder`, from the
mask-token cat to the positional embedding add), the fused entries (torch.library custom ops
around the Triton kernel, kernels/restore_tokens.py, and the C++ CPU kernel,
csrc/cpu/restore_tokens.cpp)."""
from __future__ import annotations

import torch

from . import _backend
from ._checks import acc_dtype, result_dtype


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


def restore_tokens_cpp(x, ids_restore, mask_token, pos_embed=None, has_cls=True):
    """The C++ CPU kernel (csrc/cpu/restore_tokens.cpp)."""
    return torch.ops.umae.restore_tokens_cpp(x, ids_restore, mask_token, pos_embed, has_cls)


def _restore_fake(x, ids_restore, mask_token, pos_embed, has_cls):
    N, L = ids_restore.shape
    return x.new_empty((N, L + int(has_cls), x.shape[2]), dtype=result_dtype(x, mask_token, pos_embed))


def _restore_setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed, has_cls = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_x, ctx.x_dtype, ctx.has_cls = x.shape[1], x.dtype, has_cls
    ctx.tok_dtype = mask_token.dtype
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None


def _backward_differentiable(ctx, grad_out):
    """The backward by differentiable torch ops, run when the backward itself is recorded
    (create_graph=True): the op is linear, so its gradient's own gradient (double backward, a
    gradient penalty through it) is a gather again, and autograd derives it from these ops.
    ids_restore is a permutation (both kernels check it in the forward)."""
    (ids_restore,) = ctx.saved_tensors
    need_x, _, need_tok, need_pos, _ = ctx.needs_input_grad
    N, L = ids_restore.shape
    D = grad_out.shape[2]
    c = int(ctx.has_cls)
    keep = ctx.len_x - c
    acc = acc_dtype(grad_out.dtype)
    # output row c + l came from row ids_restore[l] of (x[:, c:] ++ mask tokens): scatter it back there
    src = torch.zeros_like(grad_out[:, c:]).scatter(1, ids_restore.unsqueeze(-1).expand(N, L, D), grad_out[:, c:])
    gx = torch.cat([grad_out[:, :c], src[:, :keep]], dim=1).to(ctx.x_dtype) if need_x else None
    gtok = src[:, keep:].to(acc).sum((0, 1)).view(1, 1, D).to(ctx.tok_dtype) if need_tok else None
    gpos = grad_out.to(acc).sum(0, keepdim=True).to(ctx.pos_dtype) if need_pos else None
    return gx, None, gtok, gpos, None


if _backend.TRITON_OK:
    from .kernels import restore_tokens as _k

    @torch.library.custom_op("umae::restore_tokens", mutates_args=())
    def restore_tokens_fused(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                             pos_embed: torch.Tensor | None, has_cls: bool) -> torch.Tensor:
        return _k.forward(x, ids_restore, mask_token, pos_embed, has_cls=has_cls)

    restore_tokens_fused.register_fake(_restore_fake)

    @torch.library.custom_op("umae::restore_tokens_backward", mutates_args=())
    def restore_tokens_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, len_x: int,
                                has_cls: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gradient of x stored in `dtype` by the kernel (x's: no fp32 copy to convert under autocast),
        gradient of the mask token as fp32 (D,))."""
        N = ids_restore.shape[0]
        return _k.backward(grad_out, ids_restore, (N, len_x, grad_out.shape[2]), dtype, has_cls=has_cls)

    @restore_tokens_backward.register_fake
    def _(grad_out, ids_restore, len_x, has_cls, dtype):
        D = grad_out.shape[2]
        return (grad_out.new_empty((ids_restore.shape[0], len_x, D), dtype=dtype),
                grad_out.new_empty((D,), dtype=torch.float32))

    def _backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            return _backward_differentiable(ctx, grad_out)
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_tok, need_pos, _ = ctx.needs_input_grad
        gx = gtok = gpos = None
        if need_x or need_tok:
            gx, gt = restore_tokens_backward(grad_out, ids_restore, ctx.len_x, ctx.has_cls, ctx.x_dtype)
            gx = gx.to(ctx.x_dtype) if need_x else None
            gtok = gt.to(ctx.tok_dtype).view(1, 1, -1) if need_tok else None
        if need_pos:
            gpos = grad_out.float().sum(0, keepdim=True).to(ctx.pos_dtype)
        return gx, None, gtok, gpos, None

    restore_tokens_fused.register_autograd(_backward, setup_context=_restore_setup)


if _backend.EXT_LOADED:
    torch.library.register_fake("umae::restore_tokens_cpp")(_restore_fake)

    @torch.library.register_fake("umae::restore_tokens_cpp_backward")
    def _(grad_out, ids_restore, len_x, has_cls, need_pos):
        N, L = ids_restore.shape
        D = grad_out.shape[2]
        acc = acc_dtype(grad_out.dtype)
        return (grad_out.new_empty((N, len_x, D)), grad_out.new_empty((D,), dtype=acc),
                grad_out.new_empty((L + int(has_cls) if need_pos else 0, D), dtype=acc))

    def _cpp_backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            return _backward_differentiable(ctx, grad_out)
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_tok, need_pos, _ = ctx.needs_input_grad
        if not (need_x or need_tok or need_pos):
            return None, None, None, None, None
        gx, gtok, gpos = torch.ops.umae.restore_tokens_cpp_backward(grad_out, ids_restore, ctx.len_x, ctx.has_cls,
                                                                     need_pos)
        return (gx.to(ctx.x_dtype) if need_x else None, None,
                gtok.to(ctx.tok_dtype).view(1, 1, -1) if need_tok else None,
                gpos.unsqueeze(0).to(ctx.pos_dtype) if need_pos else None, None)

    torch.library.register_autograd("umae::restore_tokens_cpp", _cpp_backward, setup_context=_restore_setup)
