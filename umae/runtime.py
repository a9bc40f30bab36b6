"""What a process runs with, for training and the benchmarks alike: the loader's worker count and
AdamW's implementation per device. Imports nothing of umae (any layer may use it)."""
from __future__ import annotations

import os


def default_workers() -> int:
    """Loader processes by default: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def adamw_impl(device) -> dict:
    """One fused kernel per step, on CUDA and CPU alike: it also takes `found_inf`, which skips a step
    whose gradient is not finite on the device (umae.train.engine.skip_nonfinite_step)."""
    return dict(fused=True, foreach=None)
