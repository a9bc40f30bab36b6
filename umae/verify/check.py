"""`umae check`: the parity check a user runs in their own CI, on their machine's devices. Every op x
fused implementation that runs there x dtype, forward and backward, against its reference at the
tolerances the test suite uses (umae/ops/_tolerance.py, named per op by its registry entry's `parity`),
plus torch.library.opcheck of each custom op the fused call reaches. Prints a table, exits 1 on any
failure; --junit FILE writes the rows as JUnit XML.

The inputs are each op's parity grid (umae/verify/grid.py): several shapes (B below and above D, batches
past the 3rd sample), every flag combination, row-major, transposed, strided and expanded inputs,
autocast off, bf16 and fp16: fresh random values, the same for the fused and the reference call. A
row of the table is the worst over the grid, and names the input that failed.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

from .._files import check_target, write_whole

HELP = "parity of each fused op with its reference on this machine's devices (exit 1 on a mismatch)"

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def add_args(p: argparse.ArgumentParser) -> None:
    from ..ops import registry

    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"],
                   help="default: cpu, and cuda when a GPU is visible")
    p.add_argument("--ops", nargs="+", choices=list(registry.OPS), metavar="OP",
                   help=f"default: all ({', '.join(registry.OPS)})")
    p.add_argument("--impls", nargs="+", choices=sorted({i.name for op in registry.OPS.values() for i in op.impls}),
                   metavar="IMPL", help="default: every implementation of each op on each device")
    p.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, help="default: every dtype each implementation takes")
    p.add_argument("--junit", metavar="FILE", help="also write the rows as JUnit XML (for CI systems)")
    p.add_argument("--no-opcheck", action="store_true", help="leave out torch.library.opcheck")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    import torch

    from ..ops import _common, registry
    from .._table import Col, format_table

    if args.junit is not None:
        check_target(args.junit, "--junit")
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if "cuda" in devices and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else None
    t0 = time.perf_counter()
    rows = []
    for op in (registry.get(n) for n in (args.ops or registry.OPS)):
        for device in devices:
            for impl in op.impls_for(device):
                if args.impls and impl.name not in args.impls:
                    continue
                ok, why = _common._runnable(op, impl)
                if not ok:
                    rows.append(dict(op=op.name, device=device, impl=impl.name, dtype="-", check="-", ratio=None,
                                     status="skipped", note=why))
                    continue
                rows += check_impl(op, impl, device, dtypes, args.seed, opcheck=not args.no_opcheck)
    print(format_table(rows, [Col("op", "op", width=16, align="<"), Col("device", "device", width=6, align="<"),
                              Col("impl", "impl", width=18, align="<"), Col("dtype", "dtype", width=8, align="<"),
                              Col("check", "check", width=8, align="<"),
                              Col("err/tol", lambda r: "-" if r["ratio"] is None else f"{r['ratio']:.3g}", width=8),
                              Col("result", "status", width=7, align="<"),
                              Col("", lambda r: r.get("note", ""), align="<")]))
    failed = [r for r in rows if r["status"] == "FAIL"]
    passed = sum(r["status"] == "pass" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    secs = time.perf_counter() - t0
    print(f"{len(failed)} failed, {passed} passed, {skipped} skipped in {secs:.1f} s "
          "(err/tol: the worst element's error over its tolerance, umae/ops/_tolerance.py; pass at <= 1)")
    if not passed:  # nothing fused ran here (extension not built, no implementation for this machine)
        print("umae check: no fused implementation was compared on this machine: nothing passed", file=sys.stderr)
    if args.junit is not None:
        write_junit(args.junit, rows, secs)
    return 1 if failed or not passed else 0


def check_impl(op, impl, device, dtypes, seed, opcheck=True) -> list[dict]:
    """The rows of one implementation: per dtype, the worst forward and backward over the op's
    parity grid (umae/verify/grid.py), then opcheck of the custom ops the first row's call reached."""
    import torch

    from .. import ops
    from ..ops._common import FLOATS, dtype_name
    from . import grid

    rows = []
    want = [d for d in FLOATS if d in impl.dtypes and (dtypes is None or d in dtypes)]
    variants = grid.variants(op.name)
    for i, dtype in enumerate(want):
        base = dict(op=op.name, device=device, impl=impl.name, dtype=dtype_name(dtype))
        try:
            with ops.use_impl(impl.name):
                runs = ops.choose(op.name, device, (dtype,), backend="fused")[0]
        except Exception as e:  # a crash is a failed row, with its message
            rows.append(dict(base, check="error", ratio=None, status="FAIL", note=f"{type(e).__name__}: {e}"[:300]))
            continue
        if runs != impl.name:  # the implementation would not run: a comparison would be reference vs itself
            rows.append(dict(base, check="-", ratio=None, status="skipped", note=f"{runs} runs here"))
            continue
        worst = {"forward": [], "backward": []}  # (ratio, variant name) per row
        calls: list = []
        error = None
        for k, v in enumerate(variants):
            if not grid.applies(v, dtype):
                continue
            torch.manual_seed(seed + k)
            try:
                with ops.use_impl(impl.name):
                    fwd, bwd = compare(op, v, dtype, device, calls if opcheck and i == 0 and k == 0 else None)
            except Exception as e:  # a crash is a failed row, with its message and the input that made it
                error = error or f"{v.name}: {type(e).__name__}: {e}"
                continue
            worst["forward"].append((fwd, v.name))
            worst["backward"].append((bwd, v.name))
        for check, results in worst.items():
            if results:
                rows.append(dict(base, check=check, **_summary(results)))
        if error is not None:
            rows.append(dict(base, check="error", ratio=None, status="FAIL", note=" ".join(error.split())[:300]))
        if opcheck and i == 0 and not calls and error is None:
            rows.append(dict(base, check="opcheck", ratio=None, status="FAIL",
                             note="the fused call reached no umae custom op"))
        for func, a, kw in calls:
            try:
                with ops.use_impl(impl.name):
                    torch.library.opcheck(func, a, kw)
            except Exception as e:
                rows.append(dict(base, check="opcheck", ratio=None, status="FAIL",
                                 note=f"{func}: {type(e).__name__}: {e}"[:300]))
                continue
            rows.append(dict(base, check="opcheck", ratio=None, status="pass", note=str(func)))
    return rows


def _summary(results: list) -> dict:
    """A check's row over the grid: the worst ratio, and which rows failed."""
    ratio, name = max(results, key=lambda r: r[0])
    bad = [n for r, n in results if not r <= 1.0]
    if not bad:
        return dict(ratio=ratio, status="pass", note=f"{len(results)} inputs")
    return dict(ratio=ratio, status="FAIL", note=f"{len(bad)} of {len(results)} inputs fail; worst: {name}")


def _status(ratio: float) -> str:
    return "pass" if ratio <= 1.0 else "FAIL"


def compare(op, v, dtype, device, calls: list | None = None):
    """(forward err/tol, backward err/tol) of one grid row (umae/verify/grid.py `Variant`): the fused
    call and the reference on the same inputs, under the row's autocast, and their gradients for the
    same output gradients (the backward outside autocast, as a training step runs it). `calls`: a
    list that receives the custom-op calls the fused forward made (for opcheck)."""
    import torch

    from ..ops import _common
    from ..ops._tolerance import UNIT_ROUNDOFF
    from . import grid

    inp = grid.inputs(v, dtype, device)
    with _common.use_backend("fused"), grid.autocast(v, device), \
            (_Recorder(calls) if calls is not None else contextlib.nullcontext()):
        got = _outputs(inp.forward())
    with _common.use_backend("reference"), grid.autocast(v, device):
        ref = _outputs(inp.forward())
    # under autocast an op whose reference autocast casts returns its own documented dtype (fp32 for a
    # loss), where the reference's follows the cast
    recast = v.autocast is not None and op.parity.autocast
    if len(got) != len(ref) or any(a.dtype != b.dtype and not (recast and a.dtype.is_floating_point
                                                               and b.dtype == v.autocast)
                                   for a, b in zip(got, ref)):
        return float("inf"), float("inf")
    tdt = grid.tolerance_dtype(op, v, dtype)
    par = op.parity
    fwd = max(_ratio(a, b, par.out[tdt], par.out_scaled) for a, b in zip(got, ref))
    if any(a.requires_grad != b.requires_grad for a, b in zip(got, ref)):  # a fused path that drops the graph
        return fwd, float("inf")
    grads_of = [(a, b) for a, b in zip(got, ref) if b.requires_grad]
    if not grads_of:  # nothing to differentiate: the case's inputs take no gradient through this op
        return fwd, float("inf") if inp.grad_inputs else 0.0
    # one output gradient for both paths, made in fp32 and rounded to the coarser of their dtypes: of
    # magnitudes in [0.5, 1.5], times 2^10 for a scalar (a loss is a mean of ~10^3-10^4 terms here: its
    # backward divides by their count, and a reference running it in fp16 under autocast would otherwise
    # compute in subnormals, whose rounding is relative to nothing)
    gs = []
    for a, b in grads_of:
        g = torch.randn(b.shape, device=device)
        g = g.sign() * (0.5 + g.abs().clamp(max=1.0)) * (1024.0 if b.dim() == 0 else 1.0)
        gs.append(g.to(max(a.dtype, b.dtype, key=UNIT_ROUNDOFF.get)))
    ga = torch.autograd.grad([a for a, _ in grads_of], inp.grad_inputs, [g.to(a.dtype) for g, (a, _) in
                                                                          zip(gs, grads_of)], allow_unused=True)
    gb = torch.autograd.grad([b for _, b in grads_of], inp.grad_inputs, [g.to(b.dtype) for g, (_, b) in
                                                                          zip(gs, grads_of)], allow_unused=True)
    bwd = 0.0
    for a, b in zip(ga, gb):
        if a is None or b is None:
            bwd = max(bwd, 0.0 if a is b else float("inf"))
            continue
        bwd = max(bwd, _ratio(a, b, par.grad[tdt], par.grad_scaled))
    return fwd, bwd


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _ratio(a, b, tol: dict, scaled: bool = False) -> float:
    """max |a - b| / (atol + rtol |b|) over the elements (0 where equal, inf on a shape, dtype-kind or NaN
    mismatch); integer outputs compare bitwise. `scaled`: both divided by max |b| first (a loss, or
    a gradient of a mean: the tolerance is relative to the quantity's own size, not to 1)."""
    import torch

    if a.shape != b.shape or a.dtype.is_floating_point != b.dtype.is_floating_point:
        return float("inf")
    if not a.dtype.is_floating_point:
        return 0.0 if torch.equal(a, b) else float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(a)])
            and torch.equal(torch.isinf(a), torch.isinf(b))):
        return float("inf")
    finite = torch.isfinite(b)
    a, b = torch.where(finite, a, 0.0), torch.where(finite, b, 0.0)
    if not a.numel():
        return 0.0
    if scaled:
        s = b.abs().max()
        a, b = (a / s, b / s) if s > 0 else (a, b)
    diff = (a - b).abs()
    bound = tol["atol"] + tol["rtol"] * b.abs()
    r = torch.where(diff == 0, torch.zeros_like(diff), diff / bound)
    return r.max().item()


def _Recorder(calls: list):
    """A torch-function mode that records each umae custom op the public call reaches (its args
    cloned, requires_grad kept), for opcheck: what the fused call really runs, not a hand-written
    list. A function mode sees the op as called, above its autograd (a dispatch mode would see the
    ops its autograd kernel calls instead)."""
    import torch
    from torch.overrides import TorchFunctionMode

    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone().requires_grad_(x.requires_grad)
        return x

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if isinstance(func, torch._ops.OpOverloadPacket):
                func = func.default
            if isinstance(func, torch._ops.OpOverload) and func.namespace == "umae" \
                    and not any(f is func for f, _, _ in calls):
                calls.append((func, tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}))
            return func(*args, **kwargs)

    return Recorder()


def write_junit(path: str, rows: list[dict], secs: float) -> None:
    """The rows as one JUnit testsuite: a testcase per row, a failure or skipped element where due."""
    from xml.etree import ElementTree as ET

    suite = ET.Element("testsuite", name="umae check", tests=str(len(rows)),
                       failures=str(sum(r["status"] == "FAIL" for r in rows)),
                       skipped=str(sum(r["status"] == "skipped" for r in rows)), time=f"{secs:.3f}")
    for r in rows:
        tc = ET.SubElement(suite, "testcase", classname=f"umae.check.{r['op']}",
                           name=f"{r['device']}-{r['impl']}-{r['dtype']}-{r['check']}")
        what = "" if r["ratio"] is None else f"err/tol {r['ratio']:.3g}"
        if r["status"] == "FAIL":
            ET.SubElement(tc, "failure", message=(what + " " + r.get("note", "")).strip() or "failed")
        elif r["status"] == "skipped":
            ET.SubElement(tc, "skipped", message=r.get("note", ""))
    write_whole(path, lambda tmp: ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True))

