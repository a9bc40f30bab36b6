"""`umae bench profile`: where a training step's time goes. A few U-MAE training steps
(forward, backward, AdamW; bf16 autocast on CUDA) per model, batch and provider, first timed
plainly, then under torch.profiler: per step the host time (until the last launch returns), the
wall time (until the device is done), the device-busy fraction (the kernels' merged intervals over
the wall time), the kernel launches, and the top kernels by device time with their share. On CPU
(the dry run) there is no device: the launches are the aten ops called and the top rows are ops by
self CPU time.
"""
from __future__ import annotations

import time

import torch

from ..ops._common import dtype_name
from .report import write_json
from .runner import E2E, _umae_model, bench_settings, train_step_fn

# (shape set of runner.E2E, batch) per device; the steps profiled after two warm-up steps
BATCHES = {"cuda": [("vit_b16", 64), ("vit_b16", 256)], "cpu": [("tiny", 4)]}
STEPS, TOP = 3, 8


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _merged_us(intervals) -> float:
    """The length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def profile_one(shape: str, batch: int, provider: str, device: str, steps: int = STEPS) -> dict:
    torch.manual_seed(0)
    model = _umae_model(shape, provider, 0.01).to(device)
    step = train_step_fn(model, batch, device, provider, torch.bfloat16 if device == "cuda" else None)
    for _ in range(2):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - t0
    _sync(device)
    wall = time.perf_counter() - t0
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    row = dict(model=E2E[shape][0], shape=shape, batch=batch, provider=provider, device=device,
               dtype=dtype_name(torch.bfloat16) + "-autocast" if device == "cuda" else "float32",
               host_ms=host / steps * 1e3, wall_ms=wall / steps * 1e3)
    events = prof.events()
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = _merged_us((e.time_range.start, e.time_range.end) for e in kernels) / steps
        by_name: dict = {}
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
        row.update(device_busy=busy_us / 1e3 / row["wall_ms"], launches=len(kernels) / steps, what="kernels")
    else:
        ops = [e for e in events if e.name.startswith("aten::")]
        by_name = {}
        for e in ops:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.self_cpu_time_total
        row.update(device_busy=None, launches=len(ops) / steps, what="aten ops (self CPU time)")
    total = sum(by_name.values()) or 1.0
    row["top"] = [dict(name=n[:90], ms_per_step=t / steps / 1e3, share=t / total)
                  for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP]]
    return row


def format_rows(rows) -> str:
    lines = ["| model | batch | provider | host ms/step | wall ms/step | device busy | launches/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        busy = f"{100 * r['device_busy']:.0f}%" if r["device_busy"] is not None else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['provider']} | {r['host_ms']:.1f} | {r['wall_ms']:.1f} | "
                     f"{busy} | {r['launches']:.0f} |")
    for r in rows:
        lines.append(f"\ntop {r['what']}, {r['model']} batch {r['batch']} {r['provider']}:")
        lines += [f"  {t['share'] * 100:5.1f}%  {t['ms_per_step']:8.3f} ms  {t['name']}" for t in r["top"]]
    return "\n".join(lines)


def main(device: str, providers, out: str | None, batches=None) -> int:
    rows = []
    with bench_settings():
        for shape, batch in batches or BATCHES[device]:
            for provider in providers:
                try:
                    rows.append(profile_one(shape, batch, provider, device))
                except Exception as e:  # an out-of-memory batch or a failed compile is reported, not fatal
                    print(f"profile {shape} batch {batch} {provider}: {type(e).__name__}: {e}"[:300])
                    if device == "cuda":
                        torch.cuda.empty_cache()
    print(f"Training steps under torch.profiler on {device} (umae/bench/profile_steps.py): per step, "
          f"{STEPS} steps after 2 warm-up steps")
    print(format_rows(rows))
    if out:
        write_json(out, "profile.json", dict(rows=rows))
    return 0 if rows else 1
