"""`umae bench host`: what one call costs the host. Each op at tiny sizes (kernel time ~0), with
autograd recording, forward and forward + `.sum().backward()`, fused vs reference vs a unit: the
same patterns around one aten op (`torch.mul(x, 2.0)`). And a training step of the smallest model,
fused vs reference. On CUDA each timed loop is queued behind a sleep kernel that outlasts it, so
the figure is the host's (Python, checks, dispatch, autograd, launches), not the GPU's.

Timing: rounds of `n` calls, the providers interleaved round by round (a noisy machine slows them
alike); the median round, per call. The backend is set once around a loop, not per call.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

import umae

from .. import ops as umae_ops
from ..ops import registry
from ..ops._common import dtype_name
from .cases import CASES

# kernel time ~0: four 8x8x3 patches per image, 16-wide tokens, a 4-row uniformity batch
HOST_SHAPE = dict(N=2, img=16, p=8, C=3, D=16, Dd=16, B=4, clips=2, frames=1, ts=1, ratio=0.75)
STEP_MODEL, STEP_BATCH = "umae_vit_micro_patch4_32", 2
# what a call is held to (x the reference's, x the unit's): forward at most half the reference
# and 3 units; forward + backward no more than the reference and 1.3 units
TARGETS = {"fwd": (0.5, 3.0), "fwd+bwd": (1.0, 1.3)}
MODES = tuple(TARGETS)


class Clock:
    """Per-call host time of a loop of calls under a backend."""

    def __init__(self, device: str):
        self.device = device
        self.cycles_per_us = self._calibrate() if device == "cuda" else 0.0

    @staticmethod
    def _calibrate() -> float:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(10_000_000)
        b.record()
        torch.cuda.synchronize()
        return 10_000_000 / (a.elapsed_time(b) * 1e3)

    def per_call_us(self, fn, backend: str, n: int, cover_us: float = 0.0) -> float:
        if self.device == "cuda":  # the GPU waits; the launches queue behind it
            torch.cuda._sleep(int(2 * cover_us * self.cycles_per_us) + 1000)
        with umae.use_backend(backend):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            t = (time.perf_counter() - t0) * 1e6 / n
        if self.device == "cuda":
            torch.cuda.synchronize()
        return t


def measure(fns: dict, device: str, n: int = 50, rounds: int = 15) -> dict:
    """{name: median per-call host us} of `fns` ({name: (callable, backend)}), interleaved."""
    clock = Clock(device)
    cover = {}
    for name, (fn, backend) in fns.items():  # warm up (first-call caches, lazy inits), size the sleep
        cover[name] = clock.per_call_us(fn, backend, 3, 1e5) * n * 1.5
    times: dict = {k: [] for k in fns}
    gc.collect()
    for _ in range(rounds):
        for name, (fn, backend) in fns.items():
            times[name].append(clock.per_call_us(fn, backend, n, cover[name]))
    return {k: statistics.median(v) for k, v in times.items()}


def _fwd_bwd(forward):
    """forward + .sum().backward() of its one differentiable output, found once (as the unit, no search
    per call)."""
    out = forward()
    if not isinstance(out, tuple):
        return lambda: forward().sum().backward()
    (i,) = [k for k, t in enumerate(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    return lambda: forward()[i].sum().backward()


def unit_fns(device: str, dtype) -> dict:
    """The patterns around one aten op, per mode."""
    x = torch.randn(HOST_SHAPE["N"], HOST_SHAPE["D"], HOST_SHAPE["D"], device=device, dtype=dtype, requires_grad=True)
    return {"fwd": lambda: torch.mul(x, 2.0), "fwd+bwd": lambda: torch.mul(x, 2.0).sum().backward()}


def op_rows(ops=None, device: str = "cpu", dtype=torch.float32, n: int = 50, rounds: int = 15) -> list[dict]:
    """Per op: host us of forward and forward + backward, fused, reference and the unit, and the
    implementation the fused calls run."""
    unit = unit_fns(device, dtype)
    rows = []
    for op in list(registry.OPS) if ops is None else ops:
        torch.manual_seed(0)
        c = CASES[op](HOST_SHAPE, dtype, device)
        impl = umae_ops.choose(op, device, (dtype,), "fused")[0]
        row = dict(op=op, dtype=dtype_name(dtype), device=device, impl=impl)
        for mode in MODES:
            fn = c.forward if mode == "fwd" else _fwd_bwd(c.forward)
            row[mode] = measure({"fused": (fn, "fused"), "reference": (fn, "reference"),
                                 "unit": (unit[mode], "fused")}, device, n, rounds)
        rows.append(row)
    return rows


def step_row(device: str = "cpu", n: int = 10, rounds: int = 9) -> dict:
    """Host us of one training step (forward, backward, AdamW) of the smallest U-MAE model at batch
    STEP_BATCH, fused vs reference model (bf16 autocast on CUDA, fp32 on CPU)."""
    import timm

    from .. import models  # noqa: F401  (registers the models with timm)
    from .runner import train_step_fn

    fns = {}
    for provider in ("fused", "reference"):
        torch.manual_seed(0)
        model = timm.create_model(STEP_MODEL, fused=provider == "fused", lamb=0.01).to(device)
        fns[provider] = (train_step_fn(model, STEP_BATCH, device, provider,
                                       torch.bfloat16 if device == "cuda" else None), provider)
    return dict(op="train_step", model=STEP_MODEL, batch=STEP_BATCH, device=device,
                step=measure(fns, device, n, rounds))


def verdicts(row: dict) -> dict:
    """{mode: (fused / reference, fused / unit, whether both meet TARGETS)} of an op row."""
    out = {}
    for mode, (max_ref, max_unit) in TARGETS.items():
        t = row[mode]
        r_ref, r_unit = t["fused"] / t["reference"], t["fused"] / t["unit"]
        out[mode] = (r_ref, r_unit, r_ref <= max_ref and r_unit <= max_unit)
    return out


def format_rows(rows: list[dict], step: dict | None = None) -> str:
    """The host-time table (markdown; each row's unit measured beside it), and the training step's line."""
    head = "| op | impl |" + "".join(f" {m} fused us | {m} ref us | {m} unit us | fused/ref | fused/unit |" for m in MODES)
    lines = [head + " targets |", "|---" * (3 + 5 * len(MODES)) + "|"] if rows else []
    for r in rows:
        v = verdicts(r)
        cells = [r["op"], r["impl"]]
        for mode in MODES:
            t = r[mode]
            cells += [f"{t['fused']:.1f}", f"{t['reference']:.1f}", f"{t['unit']:.1f}", f"{v[mode][0]:.2f}x",
                      f"{v[mode][1]:.2f}x"]
        cells.append("met" if all(ok for *_, ok in v.values()) else
                     "missed: " + ", ".join(m for m, (*_, ok) in v.items() if not ok))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if step:
        s = step["step"]
        text += ("\n\n" if text else "") + (
            f"training step, {step['model']} batch {step['batch']} (forward, backward, AdamW): fused "
            f"{s['fused']:.0f} us, reference {s['reference']:.0f} us per step ({s['fused'] / s['reference']:.2f}x)")
    return text


def header(device: str) -> str:
    return (f"Host time per call on {device} (umae/bench/host.py): tiny inputs, autograd recording; "
            f"unit = the same pattern around torch.mul(x, 2.0). Targets: fwd <= {TARGETS['fwd'][0]}x reference "
            f"and <= {TARGETS['fwd'][1]:g} units; fwd+bwd <= {TARGETS['fwd+bwd'][0]:g}x reference and "
            f"<= {TARGETS['fwd+bwd'][1]} units." + (" The GPU waits behind a sleep kernel while the calls are "
                                                   "timed: host time only." if device == "cuda" else ""))


def main(ops, device: str, out: str | None, step: bool = True, rounds: int = 15) -> int:
    from .report import write_json
    from .runner import environment

    rows = op_rows(ops, device, rounds=rounds)
    srow = step_row(device) if step else None
    print(header(device))
    print(format_rows(rows, srow))
    if out:
        write_json(out, "host.json", dict(environment=environment(device), targets=TARGETS, rows=rows, step=srow))
    return 0
