"""Each op's inputs: its benchmark case (the inputs at a named shape set, the call, and the bytes and
FLOPs it must move and do: `case(op, shape, dtype, device)`) and its parity grid (the shapes, flags
and memory layouts `umae check` and the tests compare it on: GRIDS, rows made by umae/verify/grid.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..ops import registry
from ..ops._common import acc_dtype
from ..ops.masked_mse_op import mae_loss, masked_mse_loss
from ..ops.patchify_op import patchify, patchify_reference, unpatchify
from ..ops.random_masking_op import len_keep_for, random_masking
from ..ops.restore_tokens_op import restore_tokens
from ..ops.tube_mask_op import tube_mask
from ..ops.tubelet_patchify_op import tubelet_patchify, tubelet_unpatchify
from ..ops.uniformity_op import uniformity_loss
from ..ops.videomae_loss_op import videomae_loss


@dataclasses.dataclass
class Case:
    """One op at one shape: `forward()` calls the public op (the backend is set around it), the
    tensors that receive gradients, bytes the op must move and FLOPs of forward and backward."""
    op: str
    dtype: torch.dtype
    forward: Callable[[], object]
    grad_inputs: list
    bytes_fwd: float
    bytes_bwd: float
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    shape: str = ""


class NotApplicable(Exception):
    """A shape set that does not describe this op's inputs."""


def vit_shape(s: dict) -> dict:
    """A ViT shape set with its patch count L and patch length K = p*p*C; NotApplicable otherwise."""
    if "img" not in s or "N" not in s:
        raise NotApplicable
    return dict(s, L=(s["img"] // s["p"]) ** 2, K=s["p"] ** 2 * s["C"])


def elt(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rand(*shape, dtype, device, grad=False):
    """Fresh random values made in fp32 and rounded once to dtype (never zeros)."""
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


# ---- each op's case ----------------------------------------------------------------

def bench_patchify(s, dtype, device):
    s = vit_shape(s)
    imgs = rand(s["N"], s["C"], s["img"], s["img"], dtype=dtype, device=device, grad=True)
    nbytes = 2 * imgs.numel() * elt(dtype)  # one read, one write
    return Case(patchify.__name__, dtype, lambda: patchify(imgs, s["p"]), [imgs], nbytes, nbytes)


def bench_unpatchify(s, dtype, device):
    s = vit_shape(s)
    x = rand(s["N"], s["L"], s["K"], dtype=dtype, device=device, grad=True)
    nbytes = 2 * x.numel() * elt(dtype)
    return Case(unpatchify.__name__, dtype, lambda: unpatchify(x, s["p"], s["img"], s["C"]), [x], nbytes, nbytes)



def _loss_inputs(s, dtype, device):
    s = vit_shape(s)
    img_dtype = acc_dtype(dtype)  # fp64 goes with fp64 only
    imgs = rand(s["N"], s["C"], s["img"], s["img"], dtype=img_dtype, device=device)
    pred = rand(s["N"], s["L"], s["K"], dtype=dtype, device=device, grad=True)
    mask = (torch.rand(s["N"], s["L"], device=device) < 0.75).float()
    return s, imgs, pred, mask


def bench_mae_loss(s, dtype, device):
    s, imgs, pred, mask = _loss_inputs(s, dtype, device)
    # forward reads pred and imgs; backward reads them again and writes grad pred
    fwd = pred.numel() * elt(dtype) + imgs.numel() * imgs.element_size()
    return Case(mae_loss.__name__, dtype, lambda: mae_loss(pred, imgs, mask, s["p"]), [pred], fwd,
                fwd + pred.numel() * elt(dtype))


def bench_masked_mse_loss(s, dtype, device):
    s, imgs, pred, mask = _loss_inputs(s, dtype, device)
    target = patchify_reference(imgs, s["p"]).contiguous()
    fwd = pred.numel() * elt(dtype) + target.numel() * target.element_size()
    return Case(masked_mse_loss.__name__, dtype, lambda: masked_mse_loss(pred, target, mask), [pred], fwd,
                fwd + pred.numel() * elt(dtype))



def bench_random_masking(s, dtype, device):
    s = vit_shape(s)
    N, L, D = s["N"], s["L"], s["D"]
    x = rand(N, L, D, dtype=dtype, device=device, grad=True)
    pos = rand(1, L, D, dtype=dtype, device=device)
    cls = rand(1, 1, D, dtype=dtype, device=device, grad=True)
    noise = torch.rand(N, L, device=device)
    keep, e = len_keep_for(L, 0.75), elt(dtype)
    # must move: noise, kept rows of x, pos once, outputs (tokens, mask, ids_restore)
    fwd = N * L * 4 + N * keep * D * e + L * D * e + N * (keep + 1) * D * e + N * L * (4 + 8)
    bwd = N * (keep + 1) * D * e + N * L * 8 + N * L * D * e  # grad in, ids, grad x out
    return Case(random_masking.__name__, dtype, lambda: random_masking(x, 0.75, noise, pos, cls), [x, cls], fwd, bwd)



def bench_restore_tokens(s, dtype, device):
    s = vit_shape(s)
    N, L, D = s["N"], s["L"], s["Dd"]
    keep, e = len_keep_for(L, 0.75), elt(dtype)
    ids = torch.argsort(torch.rand(N, L, device=device), dim=1)
    x = rand(N, keep + 1, D, dtype=dtype, device=device, grad=True)
    tok = rand(1, 1, D, dtype=dtype, device=device, grad=True)
    pos = rand(1, L + 1, D, dtype=dtype, device=device)
    fwd = N * (keep + 1) * D * e + N * L * 8 + (L + 1) * D * e + N * (L + 1) * D * e
    bwd = N * (L + 1) * D * e + N * L * 8 + N * (keep + 1) * D * e
    return Case(restore_tokens.__name__, dtype, lambda: restore_tokens(x, ids, tok, pos), [x, tok], fwd, bwd)



def bench_uniformity_loss(s, dtype, device):
    if "D" not in s:
        raise NotApplicable
    B, D = s.get("B", s.get("N")), s["D"]
    f = rand(B, D, dtype=dtype, device=device, grad=True)
    e = elt(dtype)
    # must move: F once (norms may re-read it); backward reads F, writes dF (+ B x D fp32 temporaries)
    # FLOPs of the fused algorithm over its contraction dim m (Triton: the D x D Gram; C++ CPU: the
    # smaller of S = Z Z^T and G = Z^T Z): the symmetric product B*D*m forward, 3 B D m backward
    m = min(B, D) if device == "cpu" else D
    return Case(uniformity_loss.__name__, dtype, lambda: uniformity_loss(f), [f], B * D * e, 2 * B * D * e,
                flops_fwd=B * D * m, flops_bwd=3 * B * D * m)


def video_shape(s: dict) -> dict:
    """A video shape set (`clips` of `frames` x img x img; a set may describe images too) with its
    tubelet grid (t, h), its tokens, masked tokens Nm and token length K; NotApplicable otherwise."""
    if "frames" not in s:
        raise NotApplicable
    t, h = s["frames"] // s["ts"], s["img"] // s["p"]
    return dict(s, t=t, h=h, tokens=t * h * h, Nm=t * int(s["ratio"] * h * h), K=s["ts"] * s["p"] ** 2 * s["C"])


def bench_tubelet_patchify(s, dtype, device):
    s = video_shape(s)
    v = rand(s["clips"], s["C"], s["frames"], s["img"], s["img"], dtype=dtype, device=device, grad=True)
    nbytes = 2 * v.numel() * elt(dtype)  # one read, one write
    return Case(tubelet_patchify.__name__, dtype, lambda: tubelet_patchify(v, s["p"], s["ts"]), [v], nbytes, nbytes)


def bench_tubelet_unpatchify(s, dtype, device):
    s = video_shape(s)
    x = rand(s["clips"], s["tokens"], s["K"], dtype=dtype, device=device, grad=True)
    nbytes = 2 * x.numel() * elt(dtype)
    return Case(tubelet_unpatchify.__name__, dtype,
                lambda: tubelet_unpatchify(x, s["p"], s["ts"], s["frames"], s["img"], s["img"]), [x], nbytes, nbytes)


def bench_videomae_loss(s, dtype, device):
    s = video_shape(s)
    B, e = s["clips"], elt(dtype)
    videos = rand(B, s["C"], s["frames"], s["img"], s["img"], dtype=acc_dtype(dtype), device=device)
    mask = tube_mask(B, s["t"], s["h"], s["h"], s["ratio"], device=device)
    pred = rand(B, s["Nm"], s["K"], dtype=dtype, device=device, grad=True)
    # must move: the masked tokens' pixels (the visible ones are never labels), pred, the mask
    fwd = B * s["Nm"] * s["K"] * (videos.element_size() + e) + B * s["tokens"]
    return Case(videomae_loss.__name__, dtype, lambda: videomae_loss(pred, videos, mask, s["p"], s["ts"]), [pred],
                fwd, fwd + pred.numel() * e)


# ---- each op's parity grid (umae/verify/grid.py makes its rows; umae check and the tests run them) ----

LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


@dataclasses.dataclass
class Inputs:
    """A variant's call: `forward()` calls the public op (the backend is set around it) and the
    leaves whose gradients are compared."""
    forward: Callable[[], object]
    grad_inputs: list


def laid_out(values: torch.Tensor, layout: str, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, leaf): x holds `values` in `layout` (expanded: the first sample, repeated); leaf is what
    takes the gradient (x itself, or the one sample x expands)."""
    if layout == "expanded":
        leaf = values[:1].clone().requires_grad_(grad)
        return leaf.expand(values.shape), leaf
    if layout == "contiguous":
        x = values.clone()
    elif layout == "transposed":  # images: channels-last; else the last two dims swapped in memory
        x = (values.contiguous(memory_format=torch.channels_last) if values.dim() == 4
             else values.transpose(-1, -2).contiguous().transpose(-1, -2))
    elif layout == "strided":
        x = values.new_empty(*values.shape[:-1], 2 * values.shape[-1])[..., ::2]
        x.copy_(values)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return x.requires_grad_(grad), x


def _rand(*shape, dtype, device, scale=1.0, shift=0.0):
    """Fresh random values made in fp32 and rounded once to dtype (never zeros)."""
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype)


# ---- each op's inputs: (sizes, flags, layout, dtype, device) -> Inputs ---------------------------

def _patchify(s, f, layout, dtype, device):
    imgs, leaf = laid_out(_rand(s["N"], s["C"], s["H"], s["W"], dtype=dtype, device=device), layout, grad=True)
    return Inputs(lambda: patchify(imgs, s["p"]), [leaf])


def _unpatchify(s, f, layout, dtype, device):
    L, K = (s["H"] // s["p"]) * (s["W"] // s["p"]), s["p"] ** 2 * s["C"]
    x, leaf = laid_out(_rand(s["N"], L, K, dtype=dtype, device=device), layout, grad=True)
    return Inputs(lambda: unpatchify(x, s["p"], (s["H"], s["W"]), s["C"]), [leaf])


def _loss_values(s, dtype, device):
    L, K = (s["H"] // s["p"]) * (s["W"] // s["p"]), s["p"] ** 2 * s["C"]
    pred = _rand(s["N"], L, K, dtype=dtype, device=device)
    imgs = _rand(s["N"], s["C"], s["H"], s["W"], dtype=acc_dtype(dtype), device=device)  # fp64 with fp64 only
    mask = (torch.rand(s["N"], L, device=device) < 0.75).float()
    return pred, imgs, mask


def _mae_loss(s, f, layout, dtype, device):
    pred, imgs, mask = _loss_values(s, dtype, device)
    pred, leaf = laid_out(pred, layout, grad=True)
    imgs, _ = laid_out(imgs, layout)
    return Inputs(lambda: mae_loss(pred, imgs, mask, s["p"], norm_pix=f["norm_pix"]), [leaf])


def _masked_mse_loss(s, f, layout, dtype, device):
    pred, imgs, mask = _loss_values(s, dtype, device)
    pred, leaf = laid_out(pred, layout, grad=True)
    target, _ = laid_out(patchify_reference(imgs, s["p"]), layout)
    return Inputs(lambda: masked_mse_loss(pred, target, mask, norm_pix=f["norm_pix"]), [leaf])


def _random_masking(s, f, layout, dtype, device):
    N, L, D = s["N"], s["L"], s["D"]
    x, leaf = laid_out(_rand(N, L, D, dtype=dtype, device=device), layout, grad=True)
    noise = torch.rand(N, L, device=device)
    pos = _rand(1, L, D, dtype=dtype, device=device).requires_grad_() if f["pos_embed"] else None
    cls = _rand(1, 1, D, dtype=dtype, device=device).requires_grad_() if f["cls_token"] else None
    return Inputs(lambda: random_masking(x, 0.75, noise, pos, cls), [t for t in (leaf, pos, cls) if t is not None])


def _restore_tokens(s, f, layout, dtype, device):
    N, L, D, c = s["N"], s["L"], s["D"], int(f["has_cls"])
    keep = int(L * 0.25)
    x, leaf = laid_out(_rand(N, c + keep, D, dtype=dtype, device=device), layout, grad=True)
    ids = torch.argsort(torch.rand(N, L, device=device), dim=1)
    tok = _rand(1, 1, D, dtype=dtype, device=device).requires_grad_()
    pos = _rand(1, c + L, D, dtype=dtype, device=device).requires_grad_() if f["pos_embed"] else None
    return Inputs(lambda: restore_tokens(x, ids, tok, pos, has_cls=bool(c)),
                  [t for t in (leaf, tok, pos) if t is not None])


def _videos(s, layout, dtype, device, grad=False):
    return laid_out(_rand(s["B"], s["C"], s["T"], s["H"], s["W"], dtype=dtype, device=device), layout, grad=grad)


def _tubelet_patchify(s, f, layout, dtype, device):
    v, leaf = _videos(s, layout, dtype, device, grad=True)
    return Inputs(lambda: tubelet_patchify(v, s["p"], s["ts"]), [leaf])


def _tubelet_unpatchify(s, f, layout, dtype, device):
    N = (s["T"] // s["ts"]) * (s["H"] // s["p"]) * (s["W"] // s["p"])
    x, leaf = laid_out(_rand(s["B"], N, s["ts"] * s["p"] ** 2 * s["C"], dtype=dtype, device=device), layout, grad=True)
    return Inputs(lambda: tubelet_unpatchify(x, s["p"], s["ts"], s["T"], s["H"], s["W"]), [leaf])


def _videomae_loss(s, f, layout, dtype, device):
    t, h, w = s["T"] // s["ts"], s["H"] // s["p"], s["W"] // s["p"]
    mask = tube_mask(s["B"], t, h, w, 0.75, device=device)
    K = s["ts"] * s["p"] ** 2 * s["C"]
    pred, leaf = laid_out(_rand(s["B"], t * int(0.75 * h * w), K, dtype=dtype, device=device), layout, grad=True)
    videos, _ = _videos(s, layout, acc_dtype(dtype), device)  # fp64 with fp64 only
    C = s["C"]  # per-channel constants of any C (ImageNet's are for C = 3)
    stats = (dict(mean=tuple(0.4 + 0.03 * c for c in range(C)), std=tuple(0.22 + 0.01 * c for c in range(C)))
             if f["unnormalize"] else dict(mean=None, std=None))
    return Inputs(lambda: videomae_loss(pred, videos, mask, s["p"], s["ts"], f["norm_pix"], **stats), [leaf])


def _uniformity_loss(s, f, layout, dtype, device):
    # a nonzero mean: the rows are correlated, the loss well above its floor of 1/D. Unnormalized rows
    # of norm ~0.3: the reference's sum of B^2 squared similarities stays finite in fp16 under autocast
    scale = 1.0 if f["normalize"] else 1.0 / s["D"] ** 0.5
    feats, leaf = laid_out(_rand(s["B"], s["D"], dtype=dtype, device=device, scale=0.3 * scale, shift=0.1 * scale),
                           layout, grad=True)
    return Inputs(lambda: uniformity_loss(feats, f["normalize"], f["exclude_diagonal"]), [leaf])


def _expanded_rows_are_not_one_direction(f, layout):
    # one row repeated, normalized: every pair's similarity is 1, the loss constant, its gradient 0
    # (rounding noise, no comparison); unnormalized the loss is |f|^4 with a gradient
    return layout != "expanded" or not f["normalize"]


_IMG = (dict(N=5, C=3, H=24, W=40, p=8), dict(N=4, C=1, H=12, W=12, p=4))
_TOK = (dict(N=5, L=25, D=80), dict(N=6, L=15, D=48))
# odd tubelet counts, H != W, C != 3, ts in {1, 2, 3}
_VID = (dict(B=2, C=3, T=6, H=12, W=8, p=4, ts=3), dict(B=3, C=2, T=4, H=8, W=16, p=8, ts=2),
        dict(B=2, C=1, T=3, H=4, W=12, p=2, ts=1))


@dataclasses.dataclass(frozen=True)
class Grid:
    """An op's grid: its inputs' builder (sizes, flags, layout, dtype, device) -> Inputs, the shapes,
    the flags (each value list crossed), and which (flags, layout) pairs make a row."""
    build: Callable
    shapes: tuple
    flags: dict = dataclasses.field(default_factory=dict)
    valid: Callable = lambda f, layout: True


GRIDS = {f.__name__: g for f, g in (
    (patchify, Grid(_patchify, _IMG)),
    (unpatchify, Grid(_unpatchify, _IMG)),
    (mae_loss, Grid(_mae_loss, _IMG[:1], dict(norm_pix=(True, False)))),
    (masked_mse_loss, Grid(_masked_mse_loss, _IMG[:1], dict(norm_pix=(True, False)))),
    (random_masking, Grid(_random_masking, _TOK, dict(pos_embed=(True, False), cls_token=(True, False)))),
    (restore_tokens, Grid(_restore_tokens, _TOK, dict(pos_embed=(True, False), has_cls=(True, False)))),
    # B < D (the similarity S: C++ by direct dots, then by BLAS blocks; Triton's S tiles) and B > D (the Gram)
    (uniformity_loss, Grid(_uniformity_loss, (dict(B=19, D=48), dict(B=80, D=96), dict(B=70, D=16)),
                           dict(normalize=(True, False), exclude_diagonal=(False, True)),
                           _expanded_rows_are_not_one_direction)),
    (tubelet_patchify, Grid(_tubelet_patchify, _VID)),
    (tubelet_unpatchify, Grid(_tubelet_unpatchify, _VID)),
    (videomae_loss, Grid(_videomae_loss, _VID[:2], dict(norm_pix=(True, False), unnormalize=(True, False)))))}


# name -> (N, image size, patch, channels, encoder dim, decoder dim); unif_*: B rows of D features
SHAPES = {
    "vit_b16": dict(N=256, img=224, p=16, C=3, D=768, Dd=512),
    "vit_l16": dict(N=128, img=224, p=16, C=3, D=1024, Dd=512),
    "vit_tiny32": dict(N=512, img=32, p=4, C=3, D=192, Dd=128),
    "cpu_small": dict(N=16, img=224, p=16, C=3, D=768, Dd=512),  # the CPU report and pytest-benchmark
    "cpu_large": dict(N=64, img=224, p=16, C=3, D=768, Dd=512),  # images 38.5 MB: beyond a 32 MB L3
    "unif_b256": dict(B=256, D=768), "unif_b1024": dict(B=1024, D=768),
    "unif_b4096": dict(B=4096, D=768), "unif_b16384": dict(B=16384, D=768),
    # eager's B x B fp32 similarity: 17 GB at 65,536 rows, 69 GB at 131,072; the fused Gram is D x D
    "unif_b65536": dict(B=65536, D=768), "unif_b131072": dict(B=131072, D=768),
    # scripts/gpu_check.sh --dry-run: every stage's code at sizes a CPU runs in seconds
    "tiny": dict(N=3, img=32, p=8, C=3, D=64, Dd=48, clips=2, frames=4, ts=2, ratio=0.75),  # D % 16 == 0, as widths are
    "unif_tiny": dict(B=70, D=96),
    # VideoMAE-B's clips (16 x 224 x 224, tubelet 2, patch 16: 1,568 tokens, 90% tube masking) and a CPU
    # size (16 x 112 x 112: 392 tokens)
    "videomae_b": dict(clips=8, frames=16, img=224, p=16, ts=2, C=3, ratio=0.9),
    "cpu_video": dict(clips=2, frames=16, img=112, p=16, ts=2, C=3, ratio=0.9),
}
# the ViT-B/16 training step at batch 256 (runner.E2E; the ops at this name are vit_b16's)
SHAPES["vit_b16_b256"] = dict(SHAPES["vit_b16"])
# the batch sweep: how cost grows with N at ViT-B/16 shapes
SWEEP = ()
for _n in (32, 64, 128, 256, 512):
    SWEEP += (f"vit_b16_n{_n}",)
    SHAPES[SWEEP[-1]] = dict(SHAPES["vit_b16"], N=_n)

# `umae bench` without --full: each op fwd+bwd at one shape set (the uniformity loss also at a batch
# where its Gram is the cost), and the U-MAE training step; --full: DEFAULT_SHAPES, every mode
QUICK_SHAPES = {"cuda": ["vit_b16", "unif_b16384", "videomae_b"], "cpu": ["cpu_small", "cpu_video"]}
QUICK_DTYPES = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}
DEFAULT_SHAPES = {"cuda": ["vit_b16", "vit_l16", "vit_tiny32", "unif_b1024", "unif_b4096", "unif_b16384",
                           "videomae_b"],
                  "cpu": ["cpu_small", "cpu_large", "cpu_video"]}
DEFAULT_DTYPES = {"cuda": [torch.bfloat16, torch.float32], "cpu": [torch.float32]}


def case(op: str, shape: str | dict, dtype, device) -> Case:
    """The registry's case for `op` at a named shape set (or a shape dict); NotApplicable if
    the shape set does not describe the op's inputs."""
    s = SHAPES[shape] if isinstance(shape, str) else shape
    c = CASES[op](s, dtype, device)
    c.shape = shape if isinstance(shape, str) else "custom"
    return c


# each op's case, by its public function's name
CASES = {f.__name__: bench for f, bench in (
    (patchify, bench_patchify), (unpatchify, bench_unpatchify), (masked_mse_loss, bench_masked_mse_loss),
    (mae_loss, bench_mae_loss), (random_masking, bench_random_masking), (restore_tokens, bench_restore_tokens),
    (uniformity_loss, bench_uniformity_loss), (tubelet_patchify, bench_tubelet_patchify),
    (tubelet_unpatchify, bench_tubelet_unpatchify), (videomae_loss, bench_videomae_loss))}
assert set(CASES) == set(registry.OPS), "every op has a benchmark case"
assert set(GRIDS) == set(registry.OPS), "every op has a parity grid"
