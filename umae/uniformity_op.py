"""U-MAE's uniformity loss: the reference (zhangq327/U-MAE `loss_func.py`: L2-normalize the
rows, sim = F F^T, mean of sim^2, diagonal included; math in fp32), the fused entries (a
torch.library custom op around the Triton kernels, kernels/uniformity.py, one around the C++ CPU
kernel, csrc/cpu/uniformity.cpp, and their global-batch version across ranks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import acc_dtype, first_order_only

NORM_EPS = 1e-12  # F.normalize's; the kernels take it as an argument


def uniformity_loss_reference(features, normalize=True, exclude_diagonal=False, process_group=None,
                              exact_ddp_grad=True):
    if process_group is not None:  # the global batch: all-gather the rows, then the same math
        features = GatherRows.apply(features, process_group, ddp_grad_scale(process_group, exact_ddp_grad))
    f = features.to(acc_dtype(features.dtype))
    z = F.normalize(f, dim=1, eps=NORM_EPS) if normalize else f
    sim = z @ z.T
    B = sim.shape[0]
    if exclude_diagonal:
        sim = sim - torch.diag_embed(torch.diagonal(sim))
        return sim.pow(2).sum() / (B * (B - 1))
    return sim.pow(2).mean()


def _denominator(B: int, exclude_diagonal: bool) -> int:
    return B * (B - 1) if exclude_diagonal else B * B


def uniformity_loss_fused(features, normalize=True, exclude_diagonal=False, process_group=None,
                          exact_ddp_grad=True):
    """The Triton kernels (CUDA; CPU under the interpreter)."""
    if process_group is None:
        return uniformity_loss_kernel(features, normalize, exclude_diagonal)
    return DistributedFused.apply(features, normalize, exclude_diagonal, process_group,
                                  ddp_grad_scale(process_group, exact_ddp_grad), _k)


def uniformity_loss_cpp(features, normalize=True, exclude_diagonal=False, process_group=None,
                        exact_ddp_grad=True):
    """The C++ CPU kernel (csrc/cpu/uniformity.cpp); across ranks, the same Gram all-reduce as
    the Triton path, its D x D products by BLAS."""
    if process_group is None:
        return torch.ops.umae.uniformity_loss_cpp(features, normalize, exclude_diagonal, NORM_EPS)
    return DistributedFused.apply(features, normalize, exclude_diagonal, process_group,
                                  ddp_grad_scale(process_group, exact_ddp_grad), TorchGram)


class TorchGram:
    """The Gram products of the global-batch path by torch (BLAS on CPU), in the reference's
    accumulation dtype: what the C++ CPU path uses across ranks. Same interface as the Triton
    module's gram / z_times_gram / rounding_dtype / gram_scale."""

    @staticmethod
    def rounding_dtype(dtype):
        return acc_dtype(dtype)

    @staticmethod
    def gram(f, rinv):
        z = f.to(rinv.dtype) * rinv[:, None]
        return z.T @ z

    @staticmethod
    def gram_scale(g, dtype):
        return None  # G is not rounded below fp32

    @staticmethod
    def z_times_gram(f, rinv, g):
        return (f.to(rinv.dtype) * rinv[:, None]) @ g


def _prep(features, *, normalize: bool):
    """(norms, rinv) in fp32 (fp64 for fp64): the row norms are computed once, by one read of F."""
    norms = torch.linalg.vector_norm(features, dim=1, dtype=acc_dtype(features.dtype))
    rinv = 1.0 / norms.clamp_min(NORM_EPS) if normalize else torch.ones_like(norms)
    return norms, rinv


def _rounded_z(gram_ops, features, rinv):
    # z as the kernels multiply it (rounded to the dtype of the products), so that the
    # diagonal terms subtracted below cancel the kernel's own diagonal exactly.
    return (features.to(rinv.dtype) * rinv[:, None]).to(gram_ops.rounding_dtype(features.dtype)).to(rinv.dtype)


def _diag_sum(gram_ops, features, rinv):
    sq = _rounded_z(gram_ops, features, rinv).pow(2).sum(1)
    return (sq * sq).sum()


def _grad_from_gram(gram_ops, grad, features, norms, rinv, g, denom, *, exclude_diagonal: bool, normalize: bool):
    """dL/dF for L = c (||G||^2 - [excl] sum_i ||z_i||^4), G = Z^T Z, c = grad / denom."""
    c = grad.to(rinv.dtype) * 4.0 / denom
    scale = gram_ops.gram_scale(g, features.dtype)  # fp16: G scaled to <= 1 before its rounding
    if scale is None:
        dz = gram_ops.z_times_gram(features, rinv, g) * c
    else:
        dz = gram_ops.z_times_gram(features, rinv, g * scale) * (c / scale)
    z = features.to(rinv.dtype) * rinv[:, None]
    if exclude_diagonal or gram_ops.rounding_dtype(features.dtype) != rinv.dtype:
        # The product's own diagonal term |zr_i|^2 zr_i goes (from the same rounded zr: it cancels
        # but for G's rounding); kept, it comes back unrounded as |z_i|^2 z_i. Normalized, that
        # term is radial and the projection below removes it, but from the rounded zr it would
        # leave zr_i's rounding error, at small B the largest part of the gradient (B=2 bf16: 3%
        # of its max on an H200).
        zr = _rounded_z(gram_ops, features, rinv)
        dz = dz - c * zr.pow(2).sum(1, keepdim=True) * zr
        if not exclude_diagonal:
            dz = dz + c * z.pow(2).sum(1, keepdim=True) * z
    if not normalize:
        return dz
    # Jacobian of z = f / max(|f|, eps): (I - z z^T) / |f| above eps, I / eps below.
    radial = (z * dz).sum(1, keepdim=True) * (norms > NORM_EPS)[:, None]
    return rinv[:, None] * (dz - z * radial)


class DistributedFused(torch.autograd.Function):
    """Global-batch loss across ranks: each rank forms its Gram Z_r^T Z_r (D x D), one
    all-reduce sums them (with the diagonal terms and row counts), and the backward needs
    no communication: dL/dZ_r = 4 c Z_r G_global, exact for the rank's own rows.
    `gram_ops` forms the products: the Triton kernels or TorchGram."""

    @staticmethod
    def forward(ctx, features, normalize, exclude_diagonal, group, grad_scale, gram_ops):
        import torch.distributed as dist

        norms, rinv = _prep(features, normalize=normalize)
        g = gram_ops.gram(features, rinv)
        extra = torch.stack([_diag_sum(gram_ops, features, rinv) if exclude_diagonal else g.new_zeros(()),
                             g.new_tensor(float(features.shape[0]))])
        buf = torch.cat([g.flatten(), extra])
        dist.all_reduce(buf, group=group)
        D = g.shape[0]
        g, diag = buf[: D * D].view(D, D), buf[D * D]
        # the global row count stays on the device (exact in fp32 up to 2^24 rows): no host sync
        B = buf[D * D + 1].double()
        denom = (B * (B - 1) if exclude_diagonal else B * B).to(g.dtype)
        loss = (g.pow(2).sum() - diag) / denom
        ctx.save_for_backward(features, norms, rinv, g, denom)
        ctx.args = (exclude_diagonal, normalize, grad_scale, gram_ops)
        return loss

    @staticmethod
    def backward(ctx, grad):
        features, norms, rinv, g, denom = ctx.saved_tensors
        exclude_diagonal, normalize, grad_scale, gram_ops = ctx.args
        # G, the norms and rinv are constants here: differentiated again, this gradient would miss their
        # terms, so a second-order gradient raises instead (umae/_checks.py)
        df = first_order_only("uniformity_loss", lambda grad, features: (_grad_from_gram(
            gram_ops, grad, features, norms, rinv, g, denom, exclude_diagonal=exclude_diagonal,
            normalize=normalize) * grad_scale).to(features.dtype), grad, features)
        return df, None, None, None, None, None


if _backend.EXT_LOADED:

    @torch.library.register_fake("umae::uniformity_loss_cpp")
    def _(features, normalize, exclude_diagonal, eps):
        return features.new_empty((), dtype=acc_dtype(features.dtype))

    @torch.library.register_fake("umae::uniformity_loss_cpp_with_grad")
    def _(features, normalize, exclude_diagonal, eps):
        acc = acc_dtype(features.dtype)
        return features.new_empty((), dtype=acc), features.new_empty(features.shape, dtype=acc)

    # its autograd is registered in C++ (csrc/cpu/uniformity.cpp): a Python wrapper would cost as much as the op


if _backend.TRITON_OK:
    from .kernels import uniformity as _k

    @torch.library.custom_op("umae::uniformity_loss", mutates_args=())
    def uniformity_loss_forward(features: torch.Tensor, normalize: bool, exclude_diagonal: bool,
                                keep_gram: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, norms, rinv, G): the row norms and, if keep_gram, G = Z^T Z (else an empty
        (0, 0) tensor) are what the backward needs, stored by the same launch instead of recomputed."""
        norms, rinv = _prep(features, normalize=normalize)
        total, g = _k.gram_square_sum(features, rinv, keep_gram=keep_gram)
        if exclude_diagonal:
            total = total - _diag_sum(_k, features, rinv)
        loss = total / _denominator(features.shape[0], exclude_diagonal)
        return loss, norms, rinv, (g if g is not None else features.new_empty((0, 0), dtype=torch.float32))

    @uniformity_loss_forward.register_fake
    def _(features, normalize, exclude_diagonal, keep_gram):
        B, D = features.shape
        D = D if keep_gram else 0
        return (features.new_empty((), dtype=torch.float32), features.new_empty((B,), dtype=torch.float32),
                features.new_empty((B,), dtype=torch.float32), features.new_empty((D, D), dtype=torch.float32))

    def uniformity_loss_kernel(features, normalize, exclude_diagonal):
        # G is kept only when a backward will follow (plain MAE reports the term detached)
        keep = torch.is_grad_enabled() and features.requires_grad
        return uniformity_loss_forward(features, normalize, exclude_diagonal, keep)[0]

    @torch.library.custom_op("umae::uniformity_loss_backward", mutates_args=())
    def uniformity_loss_backward(grad: torch.Tensor, features: torch.Tensor, norms: torch.Tensor,
                                 rinv: torch.Tensor, gram: torch.Tensor, normalize: bool,
                                 exclude_diagonal: bool) -> torch.Tensor:
        if gram.numel() == 0:  # the forward ran without keeping G: form it now
            gram = _k.gram(features, rinv)
        denom = _denominator(features.shape[0], exclude_diagonal)
        return _grad_from_gram(_k, grad, features, norms, rinv, gram, denom, exclude_diagonal=exclude_diagonal,
                               normalize=normalize).to(features.dtype)

    @uniformity_loss_backward.register_fake
    def _(grad, features, norms, rinv, gram, normalize, exclude_diagonal):
        return torch.empty_like(features, memory_format=torch.contiguous_format)

    def _setup(ctx, inputs, output):
        features, ctx.normalize, ctx.exclude_diagonal, _ = inputs
        _, norms, rinv, gram = output
        ctx.save_for_backward(features, norms, rinv, gram)

    def _backward(ctx, grad, *_aux):  # norms, rinv and G are not differentiated
        features, norms, rinv, gram = ctx.saved_tensors
        # a second-order gradient raises (umae/_checks.py): the kernel's gradient is not differentiable again
        df = first_order_only("uniformity_loss", uniformity_loss_backward, grad, features, norms, rinv, gram,
                              ctx.normalize, ctx.exclude_diagonal)
        return df, None, None, None

    uniformity_loss_forward.register_autograd(_backward, setup_context=_setup)


class GatherRows(torch.autograd.Function):
    """all_gather of the rows of equal-sized per-rank batches. Backward returns the rank's own
    slice of the gradient times `grad_scale` (1 reproduces the official GatherLayer)."""

    @staticmethod
    def forward(ctx, x, group, grad_scale):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.B, ctx.grad_scale = dist.get_rank(group), x.shape[0], grad_scale
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank * ctx.B:(ctx.rank + 1) * ctx.B] * ctx.grad_scale, None, None


def ddp_grad_scale(group, exact_ddp_grad: bool) -> float:
    """world_size for the exact global gradient under DDP's averaging; 1 for the official GatherLayer."""
    import torch.distributed as dist

    return float(dist.get_world_size(group)) if exact_ddp_grad else 1.0


_checked_groups: set = set()


@torch.compiler.disable  # host-side bookkeeping and a collective: never traced
def check_equal_batches_once(features, group):
    """The reference's all_gather needs equal batch sizes on every rank (the fused path sums the
    row counts in its all-reduce and needs none). Checked, with one all_gather and a host sync,
    at a group's first call only: a training loop keeps its batch size (drop_last)."""
    import torch.distributed as dist

    key = (id(group), dist.get_world_size(group))  # a group's identity for this process's life
    if key in _checked_groups:
        return

    sizes = [torch.zeros(1, dtype=torch.int64, device=features.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device), group=group)
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"features must have the same batch size on every rank, got {[int(s) for s in sizes]}")
    _checked_groups.add(key)
