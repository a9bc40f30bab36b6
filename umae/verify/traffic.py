"""Counted memory traffic: for each op at the ViT-B/16 and ViT-Tiny/32 shapes, forward
plus backward, bf16 activations (images fp32):

- minimum: what the op must move (each input read once, each output written once: the bench
  case's `bytes_fwd + bytes_bwd`);
- eager: every aten op the reference runs, its tensor inputs plus outputs (a TorchDispatchMode
  over meta tensors: nothing is computed; views move nothing and are skipped);
- fused: the Triton kernels run in the interpreter with their global loads and stores counted,
  each program's masked-in elements (`requested`, what the programs ask the memory system for,
  re-reads of a shared row included) and the distinct bytes touched (`unique`, what DRAM must
  serve if those re-reads hit in L2), plus the aten ops around the kernels. The C++/CUDA ops
  (patchify, masked MSE) are not interpretable: their strip kernels read each input and write
  each output once by construction (csrc/cuda/patch_strip.cuh), so fused = minimum, marked `=`.

Counted bytes, not measured time: `eager / fused` is the speedup a memory-bound op would see on
any GPU if both ran at the same bandwidth.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import _common, registry
from .. import ops
from .._table import Col, format_table
from . import jit
from ..bench import cases

TRAFFIC_SHAPES = ("vit_b16", "vit_tiny32", "cpu_video")
DTYPE = torch.bfloat16


class _AtenBytes(TorchDispatchMode):
    """Bytes of every aten op's tensor inputs and outputs (views skipped; umae's own ops skipped:
    their kernels are counted by the interpreter)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace != "umae" and not func.is_view:
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        return out


@contextlib.contextmanager
def counting_interpreter():
    """Counts the Triton interpreter's global loads and stores: yields a dict whose `requested`
    and `unique` (bytes) fill as kernels run. Needs TRITON_INTERPRET=1 before triton is imported."""
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    seen = dict(requested=0, addresses=[])

    def record(ptrs, mask):
        itemsize = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        addr = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()
        seen["requested"] += addr.size * itemsize
        # each element's bytes, as byte addresses, so that mixed-width accesses count right
        seen["addresses"].append((addr.astype(np.uint64)[:, None] + np.arange(itemsize, dtype=np.uint64)).ravel())

    def masked_load(self, ptrs, mask, other, *a):
        record(ptrs, mask)
        return load(self, ptrs, mask, other, *a)

    def masked_store(self, ptrs, value, mask, *a):
        record(ptrs, mask)
        return store(self, ptrs, value, mask, *a)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    result = dict(requested=0, unique=0)
    try:
        yield result
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store
        result["requested"] = seen["requested"]
        result["unique"] = int(np.unique(np.concatenate(seen["addresses"])).size) if seen["addresses"] else 0


def _case(op, shape, device):
    # at a ViT shape set the uniformity loss's case takes the batch's cls features (B = N)
    s = dict(cases.SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    return cases.case(op, s, DTYPE, device)


def _fwd_bwd(c, counting):
    """Forward and backward of case `c`, each inside `counting()` (the incoming gradients are
    made outside it: the harness's writes are not the op's)."""
    with counting():
        out = c.forward()
    outs = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = [torch.randn_like(t) for t in outs]
    with counting():
        torch.autograd.grad(outs, c.grad_inputs, grads, allow_unused=True)


def eager_bytes(op: str, shape) -> int:
    try:
        return _eager_bytes(op, shape, "meta")
    except (RuntimeError, NotImplementedError):  # a reference that reads its data (a boolean index): on CPU
        return _eager_bytes(op, shape, "cpu")


def _eager_bytes(op: str, shape, device) -> int:
    c = _case(op, shape, device)
    m = _AtenBytes()
    with _common.use_backend("reference"):
        _fwd_bwd(c, lambda: m)
    return m.bytes


def fused_bytes(op: str, shape) -> dict | None:
    """{requested, unique} bytes of the Triton path (kernels in the interpreter + aten glue) and
    `formula`: the kernels' requested bytes derived from their launches' grids and block shapes
    (REQUESTED_BYTES), to equal the interpreter's count of them (`kernels`).
    None for an op without Triton kernels."""
    spec = registry.get(op)
    if not spec.kernels:
        return None
    c = _case(op, shape, "cpu")
    m = _AtenBytes()
    module = spec.kernels
    with (_common.use_backend("fused"), ops.use_impl("triton-interpreter"), counting_interpreter() as k,
          jit.recording(jit.kernels_of(module), run=True) as launches):
        _fwd_bwd(c, lambda: m)
    formula = sum(REQUESTED_BYTES[fn.__name__](dict(zip(fn.arg_names, args), **kwargs), grid)
                  for fn, args, kwargs, grid in launches)
    return dict(requested=k["requested"] + m.bytes, unique=k["unique"] + m.bytes, kernels=k["requested"],
                formula=formula)


def minimum_bytes(op: str, shape) -> int:
    c = _case(op, shape, "meta")
    return int(c.bytes_fwd + c.bytes_bwd)


def rows(shapes=TRAFFIC_SHAPES, ops=None):
    for shape in shapes:
        for op in ops or registry.OPS:
            try:
                low = minimum_bytes(op, shape)
            except cases.NotApplicable:
                continue
            eager, fused = eager_bytes(op, shape), fused_bytes(op, shape)
            yield dict(op=op, shape=shape, minimum=low, eager=eager, fused=fused)


def _mb(b) -> str:
    return f"{b / 1e6:.1f}"


def _unique(r):
    """The fused path's distinct bytes (the minimum for an op without Triton kernels)."""
    return r["minimum"] if r["fused"] is None else r["fused"]["unique"]


def _check(f) -> str:
    return "-" if f is None else f"{_mb(f['formula'])} " + ("=" if f["formula"] == f["kernels"] else "≠") + \
        f" {_mb(f['kernels'])}"


COLUMNS = [Col("op", "op"), Col("shape", "shape"), Col("minimum MB", lambda r: _mb(r["minimum"])),
           Col("eager MB", lambda r: _mb(r["eager"])),
           Col("fused MB requested / unique", lambda r: f"= {_mb(r['minimum'])}" if r["fused"] is None
               else f"{_mb(r['fused']['requested'])} / {_mb(r['fused']['unique'])}"),
           Col("eager / fused", lambda r: f"{r['eager'] / _unique(r):.2f}x"),
           Col("fused / minimum", lambda r: _unique(r) / r["minimum"], ".2f"),
           Col("kernels MB: formula vs counted", lambda r: _check(r["fused"]))]


def format_rows(rs) -> str:
    return format_table(rs, COLUMNS, markdown=True)


# ---- each Triton kernel's requested bytes, from its launch: the formula `fused_bytes` checks ----

def _e(a, name) -> int:
    return a[name].element_size()


def _rank_gather(a, grid) -> int:  # kernels/random_masking.py
    e = lambda name: _e(a, name)  # noqa: E731
    N, n_i = grid[0], grid[1]
    L, D, K = a["L"], a["D"], a["len_keep"]
    ranks = e("noise_ptr") * N * L * (1 + n_i)  # own noise, then the whole row per program
    ranks += (e("ids_ptr") + e("mask_ptr")) * N * L
    rows = N * K * D * (e("x_ptr") + e("out_ptr") + (e("pos_ptr") if a["HAS_POS"] else 0))
    return ranks + rows + (N * D * (e("cls_ptr") + e("out_ptr")) if a["HAS_CLS"] else 0)


def _scatter_grad(a, grid) -> int:
    N, L, D, K = grid[0], a["L"], a["D"], a["len_keep"]
    return _e(a, "ids_ptr") * N * L + _e(a, "grad_ptr") * N * K * D + _e(a, "gx_ptr") * N * L * D


def _restore(a, grid) -> int:  # kernels/restore_tokens.py; ids a permutation
    e = lambda name: _e(a, name)  # noqa: E731
    c, L, D, K = int(a["HAS_CLS"]), a["L"], a["D"], a["len_keep"]
    N, n_r, R = grid[0], grid[1], L + int(a["HAS_CLS"])
    out = e("ids_ptr") * N * L + e("x_ptr") * N * (K + c) * D + e("out_ptr") * N * R * D
    out += e("tok_ptr") * N * n_r * D  # the mask token, once per program
    return out + (e("pos_ptr") * N * R * D if a["HAS_POS"] else 0)


def _restore_bwd(a, grid) -> int:
    e = lambda name: _e(a, name)  # noqa: E731
    c, L, D, K = int(a["HAS_CLS"]), a["L"], a["D"], a["len_keep"]
    N, n_d, R = grid[0], grid[1], L + int(a["HAS_CLS"])  # each column-block program reads the sample's ids
    return (e("ids_ptr") * N * n_d * L + e("g_ptr") * N * R * D + e("gx_ptr") * N * (K + c) * D
            + e("part_ptr") * N * D)


def _tiles(n_t, block, total):
    w = [min(block, total - t * block) for t in range(n_t)]
    return w, [(i, j) for i in range(n_t) for j in range(i, n_t)]  # the upper triangle: the rest return


def _gram(a, grid) -> int:  # kernels/uniformity.py
    e = lambda name: _e(a, name)  # noqa: E731
    B, D = a["B"], a["D"]
    n_split = grid[2]
    w, tiles = _tiles(grid[0], a["BLOCK_D"], D)
    out = sum(B * (w[i] + w[j]) * e("f_ptr") + 2 * B * e("rinv_ptr") for i, j in tiles)
    if a["STORE_GRAM"]:
        out += n_split * sum(w[i] * w[j] * e("gram_ptr") * (1 if i == j else 2) for i, j in tiles)
    return out + (grid[0] ** 2 * e("sq_ptr") if a["SQUARE"] else 0)


def _sim(a, grid) -> int:
    e = lambda name: _e(a, name)  # noqa: E731
    B, D = a["B"], a["D"]
    w, tiles = _tiles(grid[0], a["BLOCK_B"], B)
    out = sum(D * (w[i] + w[j]) * e("f_ptr") + (w[i] + w[j]) * triton.cdiv(D, a["BLOCK_K"]) * e("rinv_ptr")
              for i, j in tiles)
    if a["STORE_SIM"]:
        out += sum(w[i] * w[j] * e("sim_ptr") * (1 if i == j else 2) for i, j in tiles)
    return out + grid[0] ** 2 * e("sq_ptr")


def _sim_times_z(a, grid) -> int:  # each row block of S once per column block, z once per row block
    B, D = a["B"], a["D"]
    return grid[1] * B * B * _e(a, "s_ptr") + grid[0] * B * D * _e(a, "z_ptr") + B * D * _e(a, "out_ptr")


def _grad_rows(a, grid) -> int:  # f, zg in, out; rinv (and norms) per row
    B, D = a["B"], a["D"]
    return (B * D * (_e(a, "f_ptr") + _e(a, "zg_ptr") + _e(a, "out_ptr")) + B * _e(a, "rinv_ptr")
            + (B * _e(a, "norms_ptr") if a["NORMALIZE"] else 0) + (_e(a, "scale_ptr") * grid[0] if a["HAS_SCALE"] else 0))


def _z_times_gram(a, grid) -> int:
    B, D = a["B"], a["D"]
    n_m, n_n, n_k = grid[0], grid[1], triton.cdiv(D, a["BLOCK_K"])
    return n_n * B * (D * _e(a, "f_ptr") + n_k * _e(a, "rinv_ptr")) + n_m * D * D * _e(a, "g_ptr") + B * D * _e(a, "out_ptr")


def _tubelets(a, grid, src: str) -> int:  # kernels/tubelet_patchify.py: each program one token, read and written
    return grid[0] * a["TS"] * a["P"] ** 2 * a["C"] * (_e(a, src) + _e(a, "out_ptr"))


def _video_loss(a, grid) -> int:  # kernels/videomae_loss.py: one program per token
    mask = a["mask_ptr"].bool()
    n_tok, masked = grid[0], int(mask.sum())
    before = int((mask * torch.arange(mask.shape[1], device=mask.device)).sum())  # the rank counts' mask bytes
    K = a["TS"] * a["P"] ** 2 * a["C"]
    per_masked = K * (_e(a, "v_ptr") + _e(a, "pred_ptr")) + (2 * a["C"] * _e(a, "stats_ptr") if a["UNNORM"] else 0)
    if a["BACKWARD"]:
        per_masked += _e(a, "grad_ptr") + K * _e(a, "out_ptr")
    return n_tok * _e(a, "mask_ptr") + before + masked * per_masked + (0 if a["BACKWARD"] else n_tok * _e(a, "out_ptr"))


# kernel name -> bytes its masked loads and stores request, from its launch's grid and arguments (by name)
REQUESTED_BYTES = {"_rank_gather_kernel": _rank_gather, "_scatter_grad_kernel": _scatter_grad,
                   "_restore_kernel": _restore, "_restore_bwd_kernel": _restore_bwd, "_gram_kernel": _gram,
                   "_sim_kernel": _sim, "_sim_times_z_kernel": _sim_times_z, "_grad_rows_kernel": _grad_rows,
                   "_z_times_gram_kernel": _z_times_gram,
                   "_patchify_kernel": lambda a, g: _tubelets(a, g, "v_ptr"),
                   "_unpatchify_kernel": lambda a, g: _tubelets(a, g, "x_ptr"), "_loss_kernel": _video_loss}
