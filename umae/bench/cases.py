"""The named shape sets and each op's benchmark case: the inputs at a shape set, the call, and the
bytes and FLOPs it must move and do: `case(op, shape, dtype, device)`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..ops import registry
from ..ops._checks import acc_dtype
from ..ops.masked_mse_op import mae_loss, masked_mse_loss
from ..ops.patchify_op import patchify, patchify_reference, unpatchify
from ..ops.random_masking_op import len_keep_for, random_masking
from ..ops.restore_tokens_op import restore_tokens
from ..ops.uniformity_op import uniformity_loss


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
    if "img" not in s:
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
    B, D = s.get("B", s.get("N")), s["D"]
    f = rand(B, D, dtype=dtype, device=device, grad=True)
    e = elt(dtype)
    # must move: F once (norms may re-read it); backward reads F, writes dF (+ B x D fp32 temporaries)
    # FLOPs of the fused algorithm over its contraction dim m (Triton: the D x D Gram; C++ CPU: the
    # smaller of S = Z Z^T and G = Z^T Z): the symmetric product B*D*m forward, 3 B D m backward
    m = min(B, D) if device == "cpu" else D
    return Case(uniformity_loss.__name__, dtype, lambda: uniformity_loss(f), [f], B * D * e, 2 * B * D * e,
                flops_fwd=B * D * m, flops_bwd=3 * B * D * m)


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
    "tiny": dict(N=3, img=32, p=8, C=3, D=64, Dd=48), "unif_tiny": dict(B=70, D=96),  # D % 16 == 0, as encoder widths are
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
QUICK_SHAPES = {"cuda": ["vit_b16", "unif_b16384"], "cpu": ["cpu_small"]}
QUICK_DTYPES = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}
DEFAULT_SHAPES = {"cuda": ["vit_b16", "vit_l16", "vit_tiny32", "unif_b1024", "unif_b4096", "unif_b16384"],
                  "cpu": ["cpu_small", "cpu_large"]}
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
    (uniformity_loss, bench_uniformity_loss))}
assert set(CASES) == set(registry.OPS), "every op has a benchmark case"
