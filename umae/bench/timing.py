"""Timing and the measured ceilings. On CUDA `triton.testing.do_bench` (median, 20/80
quantiles, device events); on CPU a perf_counter loop (median, 20/80 quantiles)."""
from __future__ import annotations

import statistics
import time

import torch

import umae

# fused: umae's ops eagerly; eager: the reference; compile: torch.compile(reference);
# fused+compile: torch.compile of the fused op or model (umae's custom ops trace as single calls)
PROVIDERS = ("fused", "eager", "compile", "fused+compile")
# the training steps also as torch.compile(mode="reduce-overhead"): their kernels replayed from CUDA
# graphs, so no host work per launch (on CPU it compiles as the default mode)
CG_PROVIDERS = ("compile-cg", "fused+compile-cg")
FUSED_PROVIDERS = ("fused", "fused+compile", "fused+compile-cg")
COMPILED_PROVIDERS = ("compile", "fused+compile") + CG_PROVIDERS
MODES = ("fwd", "bwd", "fwd+bwd")

CPU_MAX_REPS = 200


def _time_cpu(fn, warmup=2, min_reps=5, min_time=0.5):
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + min_time
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= CPU_MAX_REPS:
            break
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def _time_cuda(fn):
    import triton.testing

    ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return ms, lo, hi


def time_ms(fn, device):
    """(median, p20, p80) in ms."""
    return _time_cuda(fn) if device == "cuda" else _time_cpu(fn)


# a row is host-bound when its time with the host's work is this much above its device time
HOST_BOUND = 1.25


def device_ms(fn):
    """(ms, None) of one call replayed from a CUDA graph (`do_bench_cudagraph`: the calls captured
    once, so no Python, dispatch or launch cost: the kernels' own time), or (None, why) where the
    call cannot be captured (a host sync, a host-side read of a tensor: what the capture refuses)."""
    import triton.testing

    try:
        # rep: the graph replays about 10 ms of calls per measurement (ten measurements, the median)
        return triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median"), None
    except Exception as e:  # reported in the row: that the call is not capturable is a finding
        torch.cuda.synchronize()
        return None, f"not capturable: {type(e).__name__}: {e}"[:160]


def peak_mb(fn, device):
    """Peak memory of one call above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def outputs(out, differentiable=False):
    """Floating tensor outputs (for parity), or those autograd can differentiate (for backward)."""
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)
            and t.is_floating_point() and (t.requires_grad or not differentiable)]


def mode_fn(forward, grad_inputs, mode):
    """The callable timed in `mode`: the forward, one backward replayed, or both."""
    if mode == "fwd":
        return lambda: forward()
    outs = outputs(forward(), differentiable=True)
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        def bwd():
            torch.autograd.grad(outs, grad_inputs, grads, retain_graph=True)
        return bwd

    def full():
        o = outputs(forward(), differentiable=True)
        torch.autograd.grad(o, grad_inputs, grads)
    return full


def provider_forward(case_fn, provider):
    """The forward callable for a provider; the backend is fixed inside the call."""
    backend = "fused" if provider in FUSED_PROVIDERS else "reference"

    def fwd():
        with umae.use_backend(backend):
            return case_fn()
    if provider in COMPILED_PROVIDERS:
        # every case compiles this same `fwd`: past dynamo's recompile limit (8) later cases would
        # silently run eagerly, so each compiled provider starts from empty caches
        torch._dynamo.reset()
        return torch.compile(fwd)
    return fwd


def ceilings(device) -> dict:
    """Copy bandwidth (GB/s, read + write; on CPU also into a fresh tensor) and matrix peak
    (TFLOP/s: bf16 on CUDA, fp32 on CPU)."""
    if device == "cuda":
        x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        ms = time_ms(lambda: y.copy_(x), device)[0]
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        mm_ms = time_ms(lambda: a @ a, device)[0]
        out = dict(copy_gbps=2 * x.numel() / ms / 1e6, matmul_tflops=2 * 8192**3 / mm_ms / 1e9, matmul_dtype="bf16")
        del x, y, a
        return out
    # 64 MB, beyond the L3 of the CI machine. An op returns a fresh tensor, and fresh memory above
    # glibc's mmap threshold is faulted in page by page on first touch: `clone` measures that floor.
    x = torch.ones(2**26, dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device)[0]
    clone_ms = time_ms(lambda: x.clone(), device)[0]
    a = torch.randn(1024, 1024)
    mm_ms = time_ms(lambda: a @ a, device)[0]
    return dict(copy_gbps=2 * x.numel() / ms / 1e6, clone_gbps=2 * x.numel() / clone_ms / 1e6,
                matmul_tflops=2 * 1024**3 / mm_ms / 1e9, matmul_dtype="fp32")
