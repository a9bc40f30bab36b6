"""Benchmarks: each fused op vs its eager reference vs torch.compile(reference), in one run.

A case builds inputs for a named shape set and returns the three providers' callables
plus the bytes the op must move and the FLOPs it must do. Timing: on CUDA
`triton.testing.do_bench` (median, 20/80 quantiles, device events); on CPU a
perf_counter loop (median, 20/80 quantiles) -- CPU figures are not GPU figures.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

import umae
from umae import _backend

PROVIDERS = ("fused", "eager", "compile")

# "bwd" mode replays one backward (retain_graph): compiled graphs must not donate their buffers.
import torch._functorch.config as _functorch_config  # noqa: E402

if hasattr(_functorch_config, "donated_buffer"):
    _functorch_config.donated_buffer = False
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass
class Case:
    """What one op at one shape needs: `run(backend)` -> output tensor(s) of the forward,
    the tensors that receive gradients, bytes moved and FLOPs of the forward and backward."""
    op: str
    shape: str
    dtype: torch.dtype
    forward: Callable[[], object]
    grad_inputs: list
    bytes_fwd: float
    bytes_bwd: float
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0


def _elt(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ---- shape sets ----------------------------------------------------------------------
# name -> (N, image size, patch, channels, encoder dim, decoder dim)
SHAPES = {
    "vit_b16": dict(N=256, img=224, p=16, C=3, D=768, Dd=512),
    "vit_l16": dict(N=128, img=224, p=16, C=3, D=1024, Dd=512),
    "vit_tiny32": dict(N=512, img=32, p=4, C=3, D=192, Dd=128),
    "cpu_small": dict(N=16, img=224, p=16, C=3, D=768, Dd=512),  # the CPU report and pytest-benchmark
    # uniformity loss only: global batch B of D-dim features
    "unif_b256": dict(B=256, D=768), "unif_b1024": dict(B=1024, D=768),
    "unif_b4096": dict(B=4096, D=768), "unif_b16384": dict(B=16384, D=768),
}
# the batch sweep: how cost grows with N at ViT-B/16 shapes
for _n in (32, 64, 128, 256, 512):
    SHAPES[f"vit_b16_n{_n}"] = dict(SHAPES["vit_b16"], N=_n)


class NotApplicable(Exception):
    """A shape set that does not describe this op's inputs."""


def _vit(s):
    if "img" not in s:
        raise NotApplicable
    return s


def _rand(*shape, dtype, device, grad=False):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def case_patchify(s, dtype, device):
    s = _vit(s)
    imgs = _rand(s["N"], s["C"], s["img"], s["img"], dtype=dtype, device=device, grad=True)
    nbytes = 2 * imgs.numel() * _elt(dtype)
    return Case("patchify", "", dtype, lambda: umae.patchify(imgs, s["p"]), [imgs], nbytes, nbytes)


def case_unpatchify(s, dtype, device):
    s = _vit(s)
    L, K = (s["img"] // s["p"]) ** 2, s["p"] ** 2 * s["C"]
    x = _rand(s["N"], L, K, dtype=dtype, device=device, grad=True)
    nbytes = 2 * x.numel() * _elt(dtype)
    return Case("unpatchify", "", dtype, lambda: umae.unpatchify(x, s["p"], s["img"], s["C"]), [x], nbytes, nbytes)


def _loss_inputs(s, dtype, device):
    s = _vit(s)
    L, K = (s["img"] // s["p"]) ** 2, s["p"] ** 2 * s["C"]
    imgs = _rand(s["N"], s["C"], s["img"], s["img"], dtype=torch.float32, device=device)
    pred = _rand(s["N"], L, K, dtype=dtype, device=device, grad=True)
    mask = (torch.rand(s["N"], L, device=device) < 0.75).float()
    return imgs, pred, mask


def case_mae_loss(s, dtype, device):
    imgs, pred, mask = _loss_inputs(s, dtype, device)
    # forward reads pred and imgs; backward reads them again and writes grad pred
    fwd = pred.numel() * _elt(dtype) + imgs.numel() * 4
    return Case("mae_loss", "", dtype, lambda: umae.mae_loss(pred, imgs, mask, s["p"]), [pred], fwd,
                fwd + pred.numel() * _elt(dtype))


def case_masked_mse_loss(s, dtype, device):
    imgs, pred, mask = _loss_inputs(s, dtype, device)
    target = umae.patchify(imgs, s["p"])
    fwd = pred.numel() * _elt(dtype) + target.numel() * 4
    return Case("masked_mse_loss", "", dtype, lambda: umae.masked_mse_loss(pred, target, mask), [pred], fwd,
                fwd + pred.numel() * _elt(dtype))


def case_random_masking(s, dtype, device):
    s = _vit(s)
    N, L, D = s["N"], (s["img"] // s["p"]) ** 2, s["D"]
    x = _rand(N, L, D, dtype=dtype, device=device, grad=True)
    pos = _rand(1, L, D, dtype=dtype, device=device)
    cls = _rand(1, 1, D, dtype=dtype, device=device, grad=True)
    noise = torch.rand(N, L, device=device)
    keep, e = int(L * 0.25), _elt(dtype)
    # must move: noise, kept rows of x, pos once, outputs (tokens, mask, ids_restore)
    fwd = N * L * 4 + N * keep * D * e + L * D * e + N * (keep + 1) * D * e + N * L * (4 + 8)
    bwd = N * (keep + 1) * D * e + N * L * 8 + N * L * D * e  # grad in, ids, grad x out
    return Case("random_masking", "", dtype, lambda: umae.random_masking(x, 0.75, noise, pos, cls), [x, cls], fwd, bwd)


def case_restore_tokens(s, dtype, device):
    s = _vit(s)
    N, L, D = s["N"], (s["img"] // s["p"]) ** 2, s["Dd"]
    keep, e = int(L * 0.25), _elt(dtype)
    ids = torch.argsort(torch.rand(N, L, device=device), dim=1)
    x = _rand(N, keep + 1, D, dtype=dtype, device=device, grad=True)
    tok = _rand(1, 1, D, dtype=dtype, device=device, grad=True)
    pos = _rand(1, L + 1, D, dtype=dtype, device=device)
    fwd = N * (keep + 1) * D * e + N * L * 8 + (L + 1) * D * e + N * (L + 1) * D * e
    bwd = N * (L + 1) * D * e + N * L * 8 + N * (keep + 1) * D * e
    return Case("restore_tokens", "", dtype, lambda: umae.restore_tokens(x, ids, tok, pos), [x, tok], fwd, bwd)


def case_uniformity_loss(s, dtype, device):
    B, D = s.get("B", s.get("N")), s["D"]
    f = _rand(B, D, dtype=dtype, device=device, grad=True)
    e = _elt(dtype)
    # must move: F once (norms may re-read it); backward reads F, writes dF (+ B x D fp32 temporaries)
    # FLOPs of the fused algorithm: upper-triangle Gram B*D^2 forward; Gram + Z @ G = 3 B D^2 backward
    return Case("uniformity_loss", "", dtype, lambda: umae.uniformity_loss(f), [f], B * D * e, 2 * B * D * e,
                flops_fwd=B * D * D, flops_bwd=3 * B * D * D)


CASES = {
    "patchify": case_patchify,
    "unpatchify": case_unpatchify,
    "masked_mse_loss": case_masked_mse_loss,
    "mae_loss": case_mae_loss,
    "random_masking": case_random_masking,
    "restore_tokens": case_restore_tokens,
    "uniformity_loss": case_uniformity_loss,
}


# ---- timing --------------------------------------------------------------------------

def _time_cpu(fn, warmup=2, min_reps=5, min_time=0.5):
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + min_time
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 200:
            break
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def _time_cuda(fn):
    import triton.testing

    ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return ms, lo, hi


def _peak_mb(fn, device):
    """Peak memory of one call above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_ms(fn, device):
    return _time_cuda(fn) if device == "cuda" else _time_cpu(fn)


def _outputs(out, differentiable=False):
    """Floating tensor outputs (for parity), or those autograd can differentiate (for backward)."""
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)
            and t.is_floating_point() and (t.requires_grad or not differentiable)]


def _mode_fn(forward, grad_inputs, mode):
    if mode == "fwd":
        return lambda: forward()
    outs = _outputs(forward(), differentiable=True)
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        def bwd():
            torch.autograd.grad(outs, grad_inputs, grads, retain_graph=True)
        return bwd

    def full():
        o = _outputs(forward(), differentiable=True)
        torch.autograd.grad(o, grad_inputs, grads)
    return full


def _provider_forward(case_fn, provider):
    """The forward callable for a provider; the backend is fixed inside the call."""
    backend = "fused" if provider == "fused" else "reference"

    def fwd():
        with umae.use_backend(backend):
            return case_fn()
    if provider == "compile":
        return torch.compile(fwd)
    return fwd


# ---- ceilings: measured in the same run ----------------------------------------------

def ceilings(device) -> dict:
    """Copy bandwidth (GB/s, read + write) and matrix peak (TFLOP/s: bf16 on CUDA, fp32 on CPU)."""
    if device == "cuda":
        x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        ms = time_ms(lambda: y.copy_(x), device)[0]
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        mm_ms = time_ms(lambda: a @ a, device)[0]
        out = dict(copy_gbps=2 * x.numel() / ms / 1e6, matmul_tflops=2 * 8192**3 / mm_ms / 1e9, matmul_dtype="bf16")
        del x, y, a
        return out
    x = torch.empty(2**26, dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device)[0]
    a = torch.randn(1024, 1024)
    mm_ms = time_ms(lambda: a @ a, device)[0]
    return dict(copy_gbps=2 * x.numel() / ms / 1e6, matmul_tflops=2 * 1024**3 / mm_ms / 1e9, matmul_dtype="fp32")


def add_fractions(rows, ceil):
    for r in rows:  # fused rows only: the other providers' work differs from the counted bytes / FLOPs
        if "ms" in r and r["provider"] == "fused" and r["op"] != "train_step":
            r["frac_copy_bw"] = r["gbps"] / ceil["copy_gbps"]
            if r.get("tflops"):
                r["frac_matmul_peak"] = r["tflops"] / ceil["matmul_tflops"]
    return rows


# ---- end to end: one U-MAE training step ---------------------------------------------

E2E = {  # shape set -> (model, batch)
    "vit_tiny32": ("umae_vit_tiny_patch4_32", 512),
    "vit_b16": ("umae_vit_base_patch16_224", 64),
    "cpu_small": ("umae_vit_micro_patch4_32", 64),
}


def run_e2e(shapes, device, providers=PROVIDERS, amp=torch.bfloat16):
    """One training step (forward, backward, AdamW) fused vs reference vs torch.compile(reference
    model), under autocast; images/s."""
    import timm

    from . import models  # noqa: F401

    for shape in shapes:
        if shape not in E2E:
            continue
        name, batch = E2E[shape]
        for provider in providers:
            torch.manual_seed(0)
            model = timm.create_model(name, fused=provider == "fused", lamb=0.01).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
            net = torch.compile(model) if provider == "compile" else model
            imgs = torch.randn(batch, 3, model.img_size, model.img_size, device=device)

            def step():
                with torch.autocast(device, dtype=amp):
                    loss = net(imgs).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            try:
                peak = _peak_mb(step, device)
                ms, lo, hi = time_ms(step, device)
            except Exception as e:
                yield dict(op="train_step", shape=shape, dtype=str(amp).replace("torch.", "") + "-autocast",
                           mode="step", provider=provider, error=f"{type(e).__name__}: {e}"[:200])
                continue
            yield dict(op="train_step", shape=shape, dtype=str(amp).replace("torch.", "") + "-autocast", mode="step",
                       provider=provider, impl=name, ms=ms, ms_p20=lo, ms_p80=hi, gbps=0.0, tflops=None,
                       img_per_s=batch / ms * 1e3, parity_max_abs=float("nan"), peak_mb=peak)


def profile(ops, shapes, dtypes, device, path):
    """A torch.profiler Chrome trace of one fwd+bwd per op and provider, each inside an NVTX
    range / record_function named after it."""
    from torch.profiler import ProfilerActivity, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for op in ops:
            for shape in shapes:
                for dtype in dtypes:
                    try:
                        case = CASES[op](SHAPES[shape], dtype, device)
                    except NotApplicable:
                        continue
                    for provider in ("fused", "eager"):
                        fn = _mode_fn(_provider_forward(case.forward, provider), case.grad_inputs, "fwd+bwd")
                        label = f"{op}/{shape}/{str(dtype).replace('torch.', '')}/{provider}"
                        nvtx = torch.cuda.nvtx.range(label) if device == "cuda" else contextlib.nullcontext()
                        with nvtx, record_function(label):
                            fn()
    prof.export_chrome_trace(path)
    return path


def parity_error(case: Case) -> float:
    """Max abs difference of the forward outputs, fused vs reference, in fp32."""
    with umae.use_backend("fused"):
        a = _outputs(case.forward())
    with umae.use_backend("reference"):
        b = _outputs(case.forward())
    return max(float((x.detach().float() - y.detach().float()).abs().max()) if x.numel() else 0.0
               for x, y in zip(a, b))


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads visible, torch uses {torch.get_num_threads()})"


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment(device):
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return dict(device=device_name(device), device_type=device, torch=torch.__version__, triton=tv,
                commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                triton_interpret=_backend.triton_interpreted())


def run(ops=None, shapes=None, modes=MODES, providers=PROVIDERS, dtypes=None, device=None, progress=True):
    """Yields one dict per (op, shape, dtype, mode, provider) with time and throughput."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = list(ops or CASES)
    shapes = list(shapes or (["vit_b16", "vit_l16", "vit_tiny32", "unif_b1024", "unif_b4096", "unif_b16384"]
                             if device == "cuda" else ["cpu_small"]))
    dtypes = list(dtypes or ([torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]))
    jobs = [(o, s, d) for o in ops for s in shapes for d in dtypes]
    try:
        from tqdm import tqdm
        it = tqdm(jobs, desc="umae bench", disable=not progress)
    except ImportError:
        it = jobs
    for op, shape, dtype in it:
        impl, why = _backend.choose(op, device)
        if impl == "triton-interpreter":
            impl, why = "skipped", "Triton interpreter: its timings are not performance"
        elif impl == "reference":
            impl, why = "skipped", f"no fused implementation runs here ({why})"
        torch.manual_seed(0)
        try:
            case = CASES[op](SHAPES[shape], dtype, device)
        except NotApplicable:
            continue
        case.shape = shape
        err = parity_error(case) if impl != "skipped" else float("nan")
        for mode in modes:
            for provider in providers:
                if provider == "fused" and impl == "skipped":
                    yield dict(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), mode=mode,
                               provider=provider, skipped=why)
                    continue
                fwd = _provider_forward(case.forward, provider)
                try:
                    fn = _mode_fn(fwd, case.grad_inputs, mode)
                    peak = _peak_mb(fn, device)
                    ms, lo, hi = time_ms(fn, device)
                except Exception as e:  # a provider that fails is reported, not fatal
                    yield dict(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), mode=mode,
                               provider=provider, error=f"{type(e).__name__}: {e}"[:200])
                    continue
                nbytes = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd, "fwd+bwd": case.bytes_fwd + case.bytes_bwd}[mode]
                flops = {"fwd": case.flops_fwd, "bwd": case.flops_bwd, "fwd+bwd": case.flops_fwd + case.flops_bwd}[mode]
                row = dict(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), mode=mode, provider=provider,
                           impl=impl if provider == "fused" else "reference", ms=ms, ms_p20=lo, ms_p80=hi,
                           gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9 if flops else None, parity_max_abs=err,
                           peak_mb=peak)
                yield row


def speedups(rows):
    """Adds `speedup_vs_eager` / `speedup_vs_compile` to fused rows."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["mode"])  # noqa: E731
    base = {(key(r), r["provider"]): r["ms"] for r in rows if "ms" in r}
    for r in rows:
        if r.get("provider") == "fused" and "ms" in r:
            for p in ("eager", "compile"):
                if (key(r), p) in base:
                    r[f"speedup_vs_{p}"] = base[(key(r), p)] / r["ms"]
    return rows


def format_table(rows) -> str:
    head = (f"{'op':<16} {'shape':<10} {'dtype':<8} {'mode':<7} {'provider':<8} {'ms':>9} {'GB/s':>8} "
            f"{'TFLOP/s':>8} {'x eager':>8} {'x compile':>9} {'%copyBW':>8} {'%mmPeak':>8} {'parity':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<8} skipped: {r['skipped']}")
            continue
        if "error" in r:
            out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<8} ERROR {r['error']}")
            continue
        tf = f"{r['tflops']:.2f}" if r.get("tflops") else ("%.0f img/s" % r["img_per_s"] if "img_per_s" in r else "-")
        se = f"{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else ""
        sc = f"{r['speedup_vs_compile']:.2f}" if "speedup_vs_compile" in r else ""
        par = f"{r['parity_max_abs']:.1e}" if r["provider"] == "fused" and r["op"] != "train_step" else ""
        fb = f"{100 * r['frac_copy_bw']:.0f}%" if r.get("gbps") and "frac_copy_bw" in r else ""
        fm = f"{100 * r['frac_matmul_peak']:.0f}%" if "frac_matmul_peak" in r else ""
        out.append(f"{r['op']:<16} {r['shape']:<10} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<8} "
                   f"{r['ms']:>9.3f} {r['gbps']:>8.1f} {tf:>8} {se:>8} {sc:>9} {fb:>8} {fm:>8} {par:>9}")
    return "\n".join(out)


def write(rows, env, out_dir, ceil=None):
    import csv

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(environment=env, ceilings=ceil, rows=rows), f, indent=1)
    fields = sorted({k for r in rows for k in r})
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(env) + fields)
        w.writeheader()
        for r in rows:
            w.writerow({**env, **r})


def plot(rows, ceil, out_dir):
    """speedup.png (fused vs eager and vs compile, fwd+bwd) and roofline.png (fraction of the
    measured copy bandwidth / matrix peak, fused, fwd+bwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = [r for r in rows if r.get("provider") == "fused" and "ms" in r]
    if any(r["mode"] in ("fwd+bwd", "step") for r in fused):  # the full step when it was measured
        fused = [r for r in fused if r["mode"] in ("fwd+bwd", "step")]
    if not fused:
        return []
    labels = [f"{r['op']} {r['mode']}\n{r['shape']} {r['dtype']}" for r in fused]
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(fused)), 4))
    x = range(len(fused))
    ax.bar([i - 0.2 for i in x], [r.get("speedup_vs_eager", 0) for r in fused], 0.4, label="vs eager reference")
    ax.bar([i + 0.2 for i in x], [r.get("speedup_vs_compile", 0) for r in fused], 0.4, label="vs torch.compile(reference)")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("speedup of the fused op")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "speedup.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(fused)), 4))
    ax.bar(list(x), [100 * r.get("frac_matmul_peak", r.get("frac_copy_bw", 0)) for r in fused])
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("% of measured ceiling")
    ax.set_title(f"copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.1f} TFLOP/s "
                 f"({ceil['matmul_dtype']}); uniformity vs matmul, others vs copy", fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "roofline.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
