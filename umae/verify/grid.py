"""The parity grid: each op's inputs over shapes, flags, memory layouts and autocast, the fused call
against its reference on them. `umae check` runs every row of it on each implementation and dtype;
the tests run the same rows (a sample in the quick tier), so the check a user runs in CI is as
strong as the suite's grids.

What the rows cover, per op: every flag combination; for uniformity_loss B below and above D (and
both C++ contractions); batches past the 3rd sample; inputs row-major, transposed (channels-last
for images), strided (a step of 2 in the last dim) and expanded (the batch dim of stride 0: the first
sample repeated, its gradient summed into one leaf); autocast off, bf16 and fp16. Shapes, flags and
autocast are crossed; the layouts cycle over each shape's rows, so every shape meets every layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools

import torch

from ..bench.cases import GRIDS, LAYOUTS, Inputs

AUTOCASTS = (None, torch.bfloat16, torch.float16)
_SHORT = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of an op's grid."""
    op: str
    shape: tuple  # ((dim, size), ...)
    flags: tuple  # ((flag, value), ...)
    layout: str
    autocast: torch.dtype | None

    @property
    def name(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.shape)
        flags = " ".join(f"{k}={int(v)}" for k, v in self.flags)
        return " ".join(x for x in (dims, flags, self.layout, f"autocast={_SHORT[self.autocast]}") if x)


def variants(op: str) -> list[Variant]:
    """The op's rows: shapes x flag combinations x autocast, each shape's rows cycling through the
    layouts (skipping one its flags cannot take)."""
    g = GRIDS[op]
    names = list(g.flags)
    out = []
    for shape in g.shapes:
        rows = []
        for j, (values, ac) in enumerate(itertools.product(itertools.product(*g.flags.values()), AUTOCASTS)):
            flags = dict(zip(names, values))
            layouts = [LAYOUTS[(j + k) % len(LAYOUTS)] for k in range(len(LAYOUTS))]
            layout = next(lay for lay in layouts if g.valid(flags, lay))
            rows.append(Variant(op, tuple(shape.items()), tuple(flags.items()), layout, ac))
        for layout in LAYOUTS:  # fewer rows than layouts: the missing ones, with autocast off
            if all(r.layout != layout for r in rows):
                flags = next((r.flags for r in rows if g.valid(dict(r.flags), layout)), None)
                if flags is not None:
                    rows.append(Variant(op, tuple(shape.items()), flags, layout, None))
        out += rows
    return out


def applies(v: Variant, dtype) -> bool:
    """Whether the row runs at input `dtype`: half inputs meet autocast to their own dtype only (torch's
    autocast refuses to promote bf16 with fp16: the reference's torch.cat raises; a model under fp16
    autocast makes no bf16 activations)."""
    return v.autocast is None or dtype not in (torch.bfloat16, torch.float16) or v.autocast == dtype


def inputs(v: Variant, dtype, device) -> Inputs:
    """The row's inputs at `dtype` on `device`: fresh random values (the caller seeds)."""
    return GRIDS[v.op].build(dict(v.shape), dict(v.flags), v.layout, dtype, device)


def autocast(v: Variant, device):
    """The variant's autocast region (a null context when off)."""
    if v.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=v.autocast)


def tolerance_dtype(op, v: Variant, dtype):
    """The dtype whose tolerances the comparison uses: the input's, or under autocast for an op whose
    reference autocast casts, the coarser of it and the autocast dtype (fp64 is not cast)."""
    from ..ops._tolerance import UNIT_ROUNDOFF

    if v.autocast is None or not op.parity.autocast or dtype == torch.float64:
        return dtype
    return max(dtype, v.autocast, key=UNIT_ROUNDOFF.get)
