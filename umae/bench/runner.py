"""One benchmark run: every registered op vs its eager reference vs torch.compile(reference),
per shape set, dtype and mode, plus one U-MAE training step end to end."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess

import torch

import umae

from ..ops import _common, registry
from .. import ops
from ..ops._common import dtype_name
from . import costs
from .cases import DEFAULT_DTYPES, DEFAULT_SHAPES, SHAPES, NotApplicable, case
from .timing import (CG_PROVIDERS, COMPILED_PROVIDERS, FUSED_PROVIDERS, HOST_BOUND, MODES, PROVIDERS, device_ms, mode_fn, outputs, peak_mb, provider_forward, time_ms)


@contextlib.contextmanager
def bench_settings():
    """Settings for the benchmark only, restored after it (importing umae changes nothing):
    "bwd" mode replays one backward (retain_graph), so compiled graphs must not donate their
    buffers; on small CPU machines a pool of Inductor compile workers competes with the timed code."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with contextlib.ExitStack() as stack:
        if hasattr(functorch_config, "donated_buffer"):
            stack.enter_context(functorch_config.patch(donated_buffer=False))
        if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # the user's choice stands
            stack.enter_context(inductor_config.patch(compile_threads=1))
        yield


def parity_error(c) -> float:
    """Max abs difference of the forward outputs, fused vs reference, in fp32."""
    with umae.use_backend("fused"):
        a = outputs(c.forward())
    with umae.use_backend("reference"):
        b = outputs(c.forward())
    return max(float((x.detach().float() - y.detach().float()).abs().max()) if x.numel() else 0.0
               for x, y in zip(a, b))


def run(ops=None, shapes=None, modes=MODES, providers=PROVIDERS, dtypes=None, device=None, progress=True):
    """Yields one dict per (op, shape, dtype, mode, provider) with time and throughput."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = list(ops or registry.OPS)
    shapes = list(shapes or DEFAULT_SHAPES[device])
    dtypes = list(dtypes or DEFAULT_DTYPES[device])
    jobs = [(o, s, d) for o in ops for s in shapes for d in dtypes]
    try:
        from tqdm import tqdm
        it = tqdm(jobs, desc="umae bench", disable=not progress)
    except ImportError:
        it = jobs
    with bench_settings():
        for op, shape, dtype in it:
            yield from _run_one(op, shape, dtype, modes, providers, device)


def _run_one(op, shape, dtype, modes, providers, device):
    impl, why = ops.choose(op, device, (dtype,))
    if impl == "triton-interpreter":
        impl, why = "skipped", "Triton interpreter: its timings are not performance"
    elif impl == "reference":
        impl, why = "skipped", f"no fused implementation runs here ({why})"
    torch.manual_seed(0)
    try:
        c = case(op, shape, dtype, device)
    except NotApplicable:
        return
    err = parity_error(c) if impl != "skipped" else float("nan")
    key = dict(op=op, shape=shape, dtype=dtype_name(dtype))
    for mode in modes:
        for provider in providers:
            if provider in FUSED_PROVIDERS and impl == "skipped":
                yield dict(key, mode=mode, provider=provider, skipped=why)
                continue
            if provider in CG_PROVIDERS:  # an op's own device time is its CUDA-graph column
                yield dict(key, mode=mode, provider=provider, skipped="the CUDA-graph providers time training steps")
                continue
            try:
                fn = mode_fn(provider_forward(c.forward, provider), c.grad_inputs, mode)
                peak = peak_mb(fn, device)
                ms, lo, hi = time_ms(fn, device)
            except Exception as e:  # a provider that fails is reported, not fatal
                yield dict(key, mode=mode, provider=provider, error=f"{type(e).__name__}: {e}"[:200])
                continue
            nbytes = {"fwd": c.bytes_fwd, "bwd": c.bytes_bwd, "fwd+bwd": c.bytes_fwd + c.bytes_bwd}[mode]
            flops = {"fwd": c.flops_fwd, "bwd": c.flops_bwd, "fwd+bwd": c.flops_fwd + c.flops_bwd}[mode]
            row = dict(key, mode=mode, provider=provider, impl=impl if provider in FUSED_PROVIDERS else "reference",
                       ms=ms, ms_p20=lo, ms_p80=hi, gbps=nbytes / ms / 1e6, tflops=flops / ms / 1e9 if flops else None,
                       parity_max_abs=err, peak_mb=peak)
            if mode == "fwd+bwd" and provider not in COMPILED_PROVIDERS:  # a compiled call dispatches its graph
                row.update(costs.measure(fn, held=c.grad_inputs))
            if device == "cuda":
                row.update(with_device_time(fn, ms, nbytes, flops))
            yield row


def with_device_time(fn, ms, nbytes, flops) -> dict:
    """A CUDA row's device time (replayed from a CUDA graph), the GB/s and TFLOP/s of that time, and
    whether the row is host-bound (its time with the host's work HOST_BOUND x its device time or more);
    or why the call could not be captured."""
    dev, why = device_ms(fn)
    if dev is None:
        return dict(device_error=why)
    return dict(ms_device=dev, gbps_device=nbytes / dev / 1e6, tflops_device=flops / dev / 1e9 if flops else None,
                bound="host" if ms >= HOST_BOUND * dev else "device")


E2E = {  # shape set -> (model, batch)
    "vit_tiny32": ("umae_vit_tiny_patch4_32", 512),
    "vit_b16": ("umae_vit_base_patch16_224", 64),
    "vit_b16_b256": ("umae_vit_base_patch16_224", 256),  # the step goal's batch
    "cpu_small": ("umae_vit_micro_patch4_32", 64),
    "cpu_tiny32": ("umae_vit_tiny_patch4_32", 64),
    "tiny": ("umae_vit_micro_patch4_32", 4),
}
E2E_DEFAULT = {"cuda": ["vit_tiny32", "vit_b16", "videomae_b"], "cpu": ["cpu_small", "cpu_tiny32", "cpu_video"]}
# transformers' ViTMAEForPreTraining, unpatched vs umae.patch: shape set -> (ViTMAEConfig kwargs, batch)
HF_E2E = {
    "vit_b16": ({}, 64),  # ViTMAEConfig's defaults: ViT-B/16 at 224, the 512-d 8-block decoder
    "cpu_small": (dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                       decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                       decoder_intermediate_size=512, image_size=32, patch_size=4, norm_pix_loss=True), 64),
}
HF_E2E["tiny"] = (HF_E2E["cpu_small"][0], 4)
# transformers' VideoMAEForPreTraining, unpatched vs umae.patch, 90% tube masks: shape set -> (VideoMAEConfig
# kwargs, batch). VideoMAE-B: the config's defaults (16 x 224 x 224, tubelet 2, the 384-d 4-block decoder)
_VIDEO_MICRO = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                    decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                    decoder_intermediate_size=512, image_size=32, patch_size=4, num_frames=8, tubelet_size=2)
_VIDEO_TINY = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                   decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=64, image_size=16, patch_size=4, num_frames=4, tubelet_size=2)
HF_VIDEO_E2E = {"videomae_b": ({}, 8), "cpu_video": (_VIDEO_MICRO, 16), "tiny": (_VIDEO_TINY, 2)}
VIDEO_MASK_RATIO = 0.9
# umae's own video models, U-MAE (lamb 0.01), 90% tube masks: shape set -> (model, batch)
VIDEO_E2E = {"videomae_b": ("umae_videomae_base_patch16_224", 8), "cpu_video": ("umae_videomae_micro_patch4_32", 64),
             "tiny": ("umae_videomae_micro_patch4_32", 2)}
# train_step: umae's U-MAE (lamb 0.01); mae_train_step: the same model as plain MAE (lamb 0)
E2E_OPS = ("train_step", "mae_train_step", "hf_train_step", "hf_video_train_step", "video_train_step")


def run_e2e(shapes, device, providers=PROVIDERS, amp=torch.bfloat16, ops=("train_step",)):
    """One training step (forward, backward, AdamW) per provider, under autocast; images/s, and
    the model's matmul / conv / attention FLOPs per step (torch's FlopCounterMode, counted once per
    model on its first uncompiled provider; umae's glue ops count none) as TFLOP/s, which
    add_fractions turns into MFU (of the matmul peak measured in the same run).
    train_step / mae_train_step: umae's model with lamb 0.01 / 0 (fused or reference model, and
    torch.compile of either); hf_train_step / hf_video_train_step: transformers' ViTMAEForPreTraining /
    VideoMAEForPreTraining (umae.patch'ed or not, and compiled); video_train_step: umae's video model
    (U-MAE, lamb 0.01) on 90% tube masks."""
    with bench_settings():
        for op in ops:
            table = {"hf_train_step": HF_E2E, "hf_video_train_step": HF_VIDEO_E2E,
                     "video_train_step": VIDEO_E2E}.get(op, E2E)
            for shape in shapes:
                if shape not in table:
                    continue
                flops = None
                for provider in providers:
                    torch.manual_seed(0)
                    if op == "hf_train_step":
                        model, impl, batch = _hf_model(shape, provider), "ViTMAEForPreTraining", HF_E2E[shape][1]
                    elif op == "hf_video_train_step":
                        model, impl = _hf_video_model(shape, provider), "VideoMAEForPreTraining"
                        batch = HF_VIDEO_E2E[shape][1]
                    elif op == "video_train_step":
                        name, batch = VIDEO_E2E[shape]
                        model, impl = _umae_model(shape, provider, 0.01, name), f"{name} lamb=0.01"
                    else:
                        lamb = 0.01 if op == "train_step" else 0.0
                        model, impl, batch = _umae_model(shape, provider, lamb), f"{E2E[shape][0]} lamb={lamb}", E2E[shape][1]
                    row, flops = _train_step_row(op, model.to(device), impl, batch, shape, provider, device, amp, flops)
                    yield row


def _umae_model(shape, provider, lamb, name=None):
    import timm

    from .. import models  # noqa: F401

    return timm.create_model(name or E2E[shape][0], fused=provider in FUSED_PROVIDERS, lamb=lamb)


def _hf_model(shape, provider):
    import transformers

    from .. import patch

    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**HF_E2E[shape][0]))
    return patch(model) if provider in FUSED_PROVIDERS else model


def _hf_video_model(shape, provider):
    import transformers

    from .. import patch

    model = transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(**HF_VIDEO_E2E[shape][0]))
    return patch(model) if provider in FUSED_PROVIDERS else model


def _train_step_row(op, model, impl, batch, shape, provider, device, amp, flops):
    """(the row, the step's counted FLOPs: `flops` if given, else counted now on this model)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = train_step_fn(model, batch, device, provider, amp)
    row = dict(op=op, shape=shape, dtype=dtype_name(amp) + "-autocast", mode="step", provider=provider)
    try:
        if flops is None and provider not in COMPILED_PROVIDERS:  # eager ops: what the counter sees
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        peak = peak_mb(step, device)
        ms, lo, hi = time_ms(step, device)
        # the step's exact costs (eager providers: a compiled step dispatches its graph's kernels)
        exact = {} if provider in COMPILED_PROVIDERS else costs.measure(step, held=step.held)
    except Exception as e:
        return dict(row, error=f"{type(e).__name__}: {e}"[:200]), flops
    return dict(row, impl=impl, ms=ms, ms_p20=lo, ms_p80=hi, gbps=0.0, tflops=flops / ms / 1e9 if flops else None,
                step_flops=flops, img_per_s=batch / ms * 1e3, parity_max_abs=float("nan"), peak_mb=peak,
                **exact), flops


def train_step_fn(model, batch: int, device: str, provider: str, amp):
    """One training step (forward, backward, AdamW) of `model` on a random batch, as `provider` runs it
    (compiled providers: torch.compile, the CUDA-graph ones in reduce-overhead mode), under `amp`
    autocast (None: none). The benchmark's, the host-time view's and the profile's step."""
    from ..runtime import adamw_impl

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), **adamw_impl(torch.device(device)))
    cg = provider in CG_PROVIDERS
    net = model
    if provider in COMPILED_PROVIDERS:
        torch._dynamo.reset()  # as provider_forward: no model runs past the recompile limit
        net = torch.compile(model, mode="reduce-overhead" if cg else "default")
    size = model.img_size if hasattr(model, "img_size") else model.config.image_size  # umae's, or transformers'
    chans = model.in_chans if hasattr(model, "in_chans") else model.config.num_channels
    kwargs = {}
    if getattr(getattr(model, "config", None), "model_type", "") == "videomae":  # clips and VideoMAE's tube masks
        cfg = model.config
        imgs = torch.randn(batch, cfg.num_frames, chans, size, size, device=device)
        from ..ops.tube_mask_op import tube_mask

        h = size // cfg.patch_size
        kwargs["bool_masked_pos"] = tube_mask(batch, cfg.num_frames // cfg.tubelet_size, h, h, VIDEO_MASK_RATIO,
                                              device=device)
    elif hasattr(model, "num_frames"):  # umae's video model: clips (B, C, T, H, W), a tube mask and its count
        imgs = torch.randn(batch, chans, model.num_frames, size, size, device=device)
        kwargs["mask"], kwargs["num_masked"] = model.tube_mask(batch, device)
    else:
        imgs = torch.randn(batch, chans, size, size, device=device)

    def step():
        if cg:  # a new step: the previous replay's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = net(imgs, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.held = [imgs, *(v for v in kwargs.values() if torch.is_tensor(v)), *model.parameters(), *model.buffers()]  # what the step holds before its forward
    return step


def profile(ops, shapes, dtypes, device, path):
    """A torch.profiler Chrome trace of one fwd+bwd per op and provider, each inside an NVTX
    range / record_function named after it."""
    from torch.profiler import ProfilerActivity, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with bench_settings(), torch.profiler.profile(activities=acts) as prof:
        for op in ops:
            for shape in shapes:
                for dtype in dtypes:
                    try:
                        c = case(op, shape, dtype, device)
                    except NotApplicable:
                        continue
                    for provider in ("fused", "eager"):
                        fn = mode_fn(provider_forward(c.forward, provider), c.grad_inputs, "fwd+bwd")
                        label = f"{op}/{shape}/{dtype_name(dtype)}/{provider}"
                        nvtx = torch.cuda.nvtx.range(label) if device == "cuda" else contextlib.nullcontext()
                        with nvtx, record_function(label):
                            fn()
    prof.export_chrome_trace(path)
    return path


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} threads visible, torch uses {torch.get_num_threads()})"


def git_commit():
    """UMAE_COMMIT when set (a copied working tree, as the GPU machine gets, has another .git), else HEAD."""
    if os.environ.get("UMAE_COMMIT"):
        return os.environ["UMAE_COMMIT"]
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
                triton_interpret=_common.triton_interpreted(),
                # PyTorch's CPU allocator backs large tensors with huge pages when this is 1: at shapes
                # beyond the cache, first-touch page faults otherwise bound every op that returns a tensor
                thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"))


__all__ = ["SHAPES", "run", "run_e2e", "profile", "environment", "parity_error", "bench_settings", "E2E",
           "E2E_DEFAULT"]
