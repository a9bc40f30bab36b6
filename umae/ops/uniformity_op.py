"""U-MAE's uniformity loss: the public op, the reference (zhangq327/U-MAE `loss_func.py`: L2-normalize the
rows, sim = F F^T, mean of sim^2, diagonal included; math in fp32), the fused function, the fakes, the
Triton launchers' registration, the global-batch version across ranks and the registry entry.

Where it runs: csrc/cpu/uniformity.cpp holds the schemas, the CPU kernel and the autograd, in C++
for every device (no Python autograd on the way: the host time of a small op on a GPU);
kernels/uniformity.py holds the Triton kernels, whose launchers register below at the CUDA key.
Across ranks the Gram reduction needs collectives between its kernels: that one path
(`DistributedFused`) is a Python autograd Function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _common
from ._tolerance import MATMUL_TOL, Parity
from ._common import CPP_CPU_TRITON_CUDA, Op, acc_dtype

NORM_EPS = 1e-12  # F.normalize's; the kernels take it as an argument


def _world_size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


def uniformity_loss(features: torch.Tensor, normalize: bool = True, exclude_diagonal: bool = False,
                    process_group=None, exact_ddp_grad: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """U-MAE's uniformity loss: mean over pairs (i, j) of (z_i . z_j)^2, z_i = features_i / |features_i|.

    Default semantics equal the official code (zhangq327/U-MAE): normalize, diagonal included,
    mean over B^2 entries. exclude_diagonal=True averages the B(B-1) off-diagonal pairs (the
    paper's E_{x, x-} form). Returns an fp32 scalar (fp64 for fp64 features on the reference
    path); the gradient flows to `features`. A NaN in a row makes the loss NaN (as the
    reference); an all-zero row normalizes to zero (F.normalize's eps) and adds nothing.

    process_group (a torch.distributed group, or torch.distributed.group.WORLD): the loss over
    the global batch (every rank's rows; equal batch sizes per rank, checked at a group's first
    call only), the same scalar on every rank. Gradients: with exact_ddp_grad=True (default)
    each rank receives world_size x the gradient of the global loss for its own rows, so that after DDP averages gradients over
    ranks the parameters get exactly the gradient of the global loss. exact_ddp_grad=False
    reproduces the official GatherLayer, which returns only the local slice of the gradient
    without an all-reduce, so DDP's averaging scales the uniformity gradient by 1/world_size.
    """
    _common.tensor(features, "features", dims=2)
    _common.nonempty_batch(features, "features")
    if features.shape[1] == 0:
        raise ValueError(f"features must have at least one column (D >= 1): a 0-dimensional feature has no "
                         f"{'direction to normalize' if normalize else 'similarity'}, got shape {tuple(features.shape)}")
    if exclude_diagonal and features.shape[0] * _world_size(process_group) < 2:
        raise ValueError("exclude_diagonal needs at least 2 rows in features"
                         + (" (over the global batch)" if process_group is not None else ""))
    if process_group is not None:
        check_equal_batches_once(features, process_group)
    args = (features, bool(normalize), bool(exclude_diagonal), process_group, bool(exact_ddp_grad))
    if _common.fused(UNIFORMITY_LOSS, (features,), backend):
        return uniformity_loss_fused(*args)
    return uniformity_loss_reference(*args)


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
    """One process: umae::uniformity_loss, the C++ kernel on CPU (csrc/cpu/uniformity.cpp), the Triton
    kernels on CUDA (kernels/uniformity.py), its autograd in C++. Across ranks: DistributedFused, an
    autograd.Function in Python (it holds the process group and one all-reduce of the D x D Gram),
    its products by the same device's kernels (TorchGram on CPU)."""
    if process_group is None:
        return _UNIFORMITY_LOSS(features, normalize, exclude_diagonal, NORM_EPS)
    if exclude_diagonal and not normalize:
        # the global Gram's diagonal subtraction cancels for unnormalized rows (one dominant norm: 40x off);
        # the exact pairs need every rank's rows: the all-gather of the reference
        return uniformity_loss_reference(features, normalize, exclude_diagonal, process_group, exact_ddp_grad)
    device = features.device.type
    gram_ops = KERNELS if _common.triton_runs_on(device) else TorchGram
    if not torch.is_autocast_enabled(device):
        return DistributedFused.apply(features, normalize, exclude_diagonal, process_group,
                                      ddp_grad_scale(process_group, exact_ddp_grad), gram_ops)
    # as the single-process op's autocast kernel (csrc/cpu/uniformity.cpp): the features in the autocast
    # dtype, as the reference's matmul takes them (fp64 stays), and no autocast inside
    if features.dtype != torch.float64:
        features = features.to(torch.get_autocast_dtype(device))
    with torch.autocast(device, enabled=False):
        return DistributedFused.apply(features, normalize, exclude_diagonal, process_group,
                                      ddp_grad_scale(process_group, exact_ddp_grad), gram_ops)


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


def _prep(features, *, normalize: bool, eps: float = NORM_EPS):
    """(norms, rinv) in fp32 (fp64 for fp64): the row norms are computed once, by one read of F."""
    norms = torch.linalg.vector_norm(features, dim=1, dtype=acc_dtype(features.dtype))
    rinv = 1.0 / norms.clamp_min(eps) if normalize else torch.ones_like(norms)
    return norms, rinv


def _rounded_z(gram_ops, features, rinv):
    # z as the kernels multiply it (rounded to the dtype of the products), so that the
    # diagonal terms subtracted below cancel the kernel's own diagonal exactly.
    return (features.to(rinv.dtype) * rinv[:, None]).to(gram_ops.rounding_dtype(features.dtype)).to(rinv.dtype)


def _diag_sum(gram_ops, features, rinv):
    sq = _rounded_z(gram_ops, features, rinv).pow(2).sum(1)
    return (sq * sq).sum()


def _grad_from_gram(gram_ops, grad, features, norms, rinv, g, denom, *, exclude_diagonal: bool, normalize: bool,
                    eps: float = NORM_EPS):
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
    radial = (z * dz).sum(1, keepdim=True) * (norms > eps)[:, None]
    return rinv[:, None] * (dz - z * radial)


def first_order_only(op: str, backward, *args):
    """`backward(*args)`, a fused kernel's gradient (a tensor, or a tuple of tensors or None), for an
    autograd backward written in Python. With create_graph=True (grad mode on inside the backward)
    the kernel's result would be a constant to autograd, and a gradient of it (a gradient penalty)
    silently 0: it comes back as a function of the tensor arguments requiring grad whose backward
    raises, as the C++ autograd's do (umae::first_order_only, csrc/common.h)."""
    if not torch.is_grad_enabled():
        return backward(*args)
    with torch.no_grad():
        out = backward(*args)
    single = not isinstance(out, tuple)
    outs = list((out,) if single else out)
    live = [i for i, g in enumerate(outs) if g is not None]
    deps = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    for i, g in zip(live, torch.ops.umae.first_order_only(op, [outs[i] for i in live], deps)):
        outs[i] = g
    return outs[0] if single else tuple(outs)


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
        # terms, so a second-order gradient raises instead (first_order_only). No autocast inside, as in
        # the forward (a backward() called under autocast would re-cast the products)
        with torch.autocast(features.device.type, enabled=False):
            df = first_order_only("uniformity_loss", lambda grad, features: (_grad_from_gram(
                gram_ops, grad, features, norms, rinv, g, denom, exclude_diagonal=exclude_diagonal,
                normalize=normalize) * grad_scale).to(features.dtype), grad, features)
        return df, None, None, None, None, None


def _loss_fake(features, normalize, exclude_diagonal, eps):
    return features.new_empty((), dtype=acc_dtype(features.dtype))


def _with_grad_fake(features, normalize, exclude_diagonal, eps):
    acc = acc_dtype(features.dtype)
    return features.new_empty((), dtype=acc), features.new_empty(features.shape, dtype=acc)


_UNIFORMITY_LOSS = None
if _common.EXT_LOADED:
    # the autograd is registered in C++ (csrc/cpu/uniformity.cpp): a Python wrapper would cost as much as the op
    _UNIFORMITY_LOSS = torch.ops.umae.uniformity_loss.default
    torch.library.register_fake("umae::uniformity_loss")(_loss_fake)
    torch.library.register_fake("umae::uniformity_loss_with_grad")(_with_grad_fake)

# the Triton kernel module and its launchers ({op name: launcher}) for the CUDA key; None without Triton
KERNELS = TRITON_KERNELS = None
if _common.TRITON_USABLE:
    from ..kernels import uniformity as KERNELS

    def _triton_loss_and_gram(features, normalize, exclude_diagonal, eps, keep_gram):
        norms, rinv = _prep(features, normalize=normalize, eps=eps)
        exact = exclude_diagonal and not normalize  # unnormalized rows: S drops its diagonal (no cancellation)
        total, g = KERNELS.square_sum(features, rinv, keep=keep_gram, exact_offdiagonal=exact)  # G, or S
        if exclude_diagonal and not exact:
            total = total - _diag_sum(KERNELS, features, rinv)
        return total / _denominator(features.shape[0], exclude_diagonal), norms, rinv, g

    def _triton_loss(features, normalize, exclude_diagonal, eps):
        return _triton_loss_and_gram(features, normalize, exclude_diagonal, eps, keep_gram=False)[0]

    def _triton_with_grad(features, normalize, exclude_diagonal, eps):
        # G = Z^T Z (D x D; or S = Z Z^T, B x B, where B < D) comes from the same launch as the loss; dL/dF =
        # 4c Z G = 4c S Z through the normalization: _grad_from_gram's math in two launches (the product, then
        # the rows' epilogue)
        loss, norms, rinv, g = _triton_loss_and_gram(features, normalize, exclude_diagonal, eps, keep_gram=True)
        c = 4.0 / _denominator(features.shape[0], exclude_diagonal)
        df = KERNELS.grad_rows(features, rinv, norms, g, c, exclude_diagonal=exclude_diagonal, normalize=normalize,
                               eps=eps, exact_offdiagonal=exclude_diagonal and not normalize)
        return loss, df

    TRITON_KERNELS = {"uniformity_loss": _triton_loss, "uniformity_loss_with_grad": _triton_with_grad}
    _common.register_kernels(TRITON_KERNELS, "CUDA")


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


UNIFORMITY_LOSS = Op("uniformity_loss", "umae::uniformity_loss", uniformity_loss, uniformity_loss_reference,
                     uniformity_loss_fused, CPP_CPU_TRITON_CUDA,
                     kernels=KERNELS, triton_kernels=TRITON_KERNELS,
                     parity=Parity(MATMUL_TOL, MATMUL_TOL, out_scaled=True, grad_scaled=True, autocast=True))
