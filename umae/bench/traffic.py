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
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import _backend, registry
from .. import ops
from .._table import Col, format_table
from . import jit
from . import cases

TRAFFIC_SHAPES = ("vit_b16", "vit_tiny32")
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
    c = _case(op, shape, "meta")
    m = _AtenBytes()
    with _backend.use_backend("reference"):
        _fwd_bwd(c, lambda: m)
    return m.bytes


def fused_bytes(op: str, shape) -> dict | None:
    """{requested, unique} bytes of the Triton path (kernels in the interpreter + aten glue) and
    `formula`: the kernels' requested bytes derived from their launches' grids and block shapes
    (each kernel module's `requested_bytes`), to equal the interpreter's count of them (`kernels`).
    None for an op without Triton kernels."""
    spec = registry.get(op)
    if not spec.kernels:
        return None
    c = _case(op, shape, "cpu")
    m = _AtenBytes()
    module = spec.kernels
    with (_backend.use_backend("fused"), ops.use_impl("triton-interpreter"), counting_interpreter() as k,
          jit.recording(jit.kernels_of(module), run=True) as launches):
        _fwd_bwd(c, lambda: m)
    formula = sum(module.requested_bytes(fn.__name__, dict(zip(fn.arg_names, args), **kwargs), grid)
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
