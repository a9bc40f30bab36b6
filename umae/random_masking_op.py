"""Random masking: the reference (facebookresearch/mae `random_masking`, with the positional
embedding add and cls prepend that surround it in `forward_encoder`), the fused entries (torch.library
custom ops around the Triton kernel, kernels/random_masking.py, and the C++ CPU kernel,
csrc/cpu/random_masking.cpp)."""
from __future__ import annotations

import torch

from . import _backend
from ._checks import acc_dtype, result_dtype


def len_keep_for(L: int, mask_ratio: float) -> int:
    return int(L * (1 - mask_ratio))


def random_masking_reference(x, mask_ratio, noise=None, pos_embed=None, cls_token=None):
    N, L, D = x.shape
    len_keep = len_keep_for(L, mask_ratio)
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    if pos_embed is not None:
        x = x + pos_embed
    # stable: ties (equal noise) keep index order, which defines the result for every input
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    if cls_token is not None:
        x_masked = torch.cat([cls_token.expand(N, -1, -1), x_masked], dim=1)  # cat promotes dtypes
    return x_masked, mask, ids_restore


def _noise(x, noise):
    # torch's generator, as the reference: same seed, same mask
    return torch.rand(x.shape[0], x.shape[1], device=x.device) if noise is None else noise


def random_masking_fused(x, mask_ratio, noise=None, pos_embed=None, cls_token=None):
    """The Triton kernel (CUDA; CPU under the interpreter)."""
    return random_masking_kernel(x, _noise(x, noise), pos_embed, cls_token, len_keep_for(x.shape[1], mask_ratio))


def random_masking_cpp(x, mask_ratio, noise=None, pos_embed=None, cls_token=None):
    """The C++ CPU kernel (csrc/cpu/random_masking.cpp)."""
    return torch.ops.umae.random_masking_cpp(x, _noise(x, noise), pos_embed, cls_token,
                                             len_keep_for(x.shape[1], mask_ratio))


def _masking_fake(x, noise, pos_embed, cls_token, len_keep):
    N, L, D = x.shape
    out = x.new_empty((N, len_keep + int(cls_token is not None), D), dtype=result_dtype(x, pos_embed, cls_token))
    return out, x.new_empty((N, L), dtype=torch.float32), x.new_empty((N, L), dtype=torch.int64)


def _masking_setup(ctx, inputs, output):
    x, noise, pos_embed, cls_token, len_keep = inputs
    ctx.save_for_backward(output[2])
    ctx.x_dtype = x.dtype
    ctx.has_cls = cls_token is not None
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None
    ctx.cls_dtype = cls_token.dtype if cls_token is not None else None
    ctx.mark_non_differentiable(output[1], output[2])


def _cls_grad(ctx, grad_out):
    # sums in fp32 from the unrounded gradient, as autograd of the reference does
    return grad_out[:, :1].to(acc_dtype(grad_out.dtype)).sum(0, keepdim=True).to(ctx.cls_dtype)


def _backward_differentiable(ctx, grad_out):
    """The backward by differentiable torch ops, run when the backward itself is recorded
    (create_graph=True): the op is linear, so its gradient's own gradient (double backward, a
    gradient penalty through it) is a gather again, and autograd derives it from these ops."""
    (ids_restore,) = ctx.saved_tensors
    need_x, _, need_pos, need_cls, _ = ctx.needs_input_grad
    N, L = ids_restore.shape
    D = grad_out.shape[2]
    body = grad_out[:, int(ctx.has_cls):]  # row j: the gradient of the token of rank j
    padded = torch.cat([body, body.new_zeros((N, L - body.shape[1], D))], dim=1)  # removed ranks: 0
    g = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(N, L, D))  # back to positions
    gx = g.to(ctx.x_dtype) if need_x else None
    gpos = g.to(acc_dtype(g.dtype)).sum(0, keepdim=True).to(ctx.pos_dtype) if need_pos else None
    gcls = _cls_grad(ctx, grad_out) if need_cls else None
    return gx, None, gpos, gcls, None


if _backend.TRITON_OK:
    from .kernels import random_masking as _k

    @torch.library.custom_op("umae::random_masking", mutates_args=())
    def random_masking_kernel(x: torch.Tensor, noise: torch.Tensor, pos_embed: torch.Tensor | None,
                             cls_token: torch.Tensor | None, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _k.forward(x, noise, pos_embed, cls_token, len_keep)

    random_masking_kernel.register_fake(_masking_fake)

    @torch.library.custom_op("umae::random_masking_backward", mutates_args=())
    def random_masking_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, has_cls: bool,
                                dtype: torch.dtype) -> torch.Tensor:
        """Gradient of x + pos_embed (N, L, D), stored in `dtype` by the kernel."""
        return _k.backward(grad_out, ids_restore, has_cls=has_cls, dtype=dtype)

    @random_masking_backward.register_fake
    def _(grad_out, ids_restore, has_cls, dtype):
        N, L = ids_restore.shape
        return grad_out.new_empty((N, L, grad_out.shape[2]), dtype=dtype)

    def _backward(ctx, grad_out, _grad_mask, _grad_ids):
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            return _backward_differentiable(ctx, grad_out)
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_pos, need_cls, _ = ctx.needs_input_grad
        g = gpos = None
        if need_x or need_pos:
            # pos's gradient sums the unrounded gradient; without it (MAE's fixed pos_embed) the kernel
            # stores x's dtype directly (no fp32 copy to convert under autocast)
            g = random_masking_backward(grad_out, ids_restore, ctx.has_cls, grad_out.dtype if need_pos else ctx.x_dtype)
            gpos = g.float().sum(0, keepdim=True).to(ctx.pos_dtype) if need_pos else None
        gcls = _cls_grad(ctx, grad_out) if need_cls else None
        return (g.to(ctx.x_dtype) if need_x else None), None, gpos, gcls, None

    random_masking_kernel.register_autograd(_backward, setup_context=_masking_setup)


if _backend.EXT_LOADED:
    torch.library.register_fake("umae::random_masking_cpp")(_masking_fake)

    @torch.library.register_fake("umae::random_masking_cpp_backward")
    def _(grad_out, ids_restore, has_cls, need_pos):
        N, L = ids_restore.shape
        D = grad_out.shape[2]
        return grad_out.new_empty((N, L, D)), grad_out.new_empty((L if need_pos else 0, D), dtype=acc_dtype(grad_out.dtype))

    def _cpp_backward(ctx, grad_out, _grad_mask, _grad_ids):
        if torch.is_grad_enabled():  # create_graph=True: a gradient that can be differentiated again
            return _backward_differentiable(ctx, grad_out)
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_pos, need_cls, _ = ctx.needs_input_grad
        gx = gpos = None
        if need_x or need_pos:  # the pos sum rides along the scatter of grad x
            gx, gpos = torch.ops.umae.random_masking_cpp_backward(grad_out, ids_restore, ctx.has_cls, need_pos)
            gx = gx.to(ctx.x_dtype) if need_x else None
            gpos = gpos.unsqueeze(0).to(ctx.pos_dtype) if need_pos else None
        gcls = _cls_grad(ctx, grad_out) if need_cls else None
        return gx, None, gpos, gcls, None

    torch.library.register_autograd("umae::random_masking_cpp", _cpp_backward, setup_context=_masking_setup)
