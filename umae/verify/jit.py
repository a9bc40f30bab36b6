"""Compile what Triton's JIT will compile, without a GPU.

The launchers are run (on CPU tensors) with each kernel's `run` replaced by a recorder, so no
kernel executes; each recorded launch is then specialized by Triton's own binder for an H100
target -- arguments equal to 1 become constants, pointers and integers divisible by 16 are marked,
exactly as a launch on the GPU would specialize them -- and compiled for sm_90. A hand-written
signature (every int an i32, no alignment) compiles a kernel the JIT never runs.

Needs a process where TRITON_INTERPRET is unset at import (real JITFunctions).
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import triton

from ..ops import random_masking_op, restore_tokens_op, uniformity_op, videomae_loss_op


@contextlib.contextmanager
def recording(fns, run: bool = False):
    """Launches of the kernels `fns` (JITFunctions, or InterpretedFunctions) are recorded as
    (fn, args, kwargs, grid); not run, unless `run`."""
    launches = []
    fns = list(dict.fromkeys(fns))  # ops sharing a kernel module (an op and its inverse) list its kernels twice

    def wrap(fn):
        real = fn.run

        def record(*args, grid, warmup, **kwargs):
            launches.append((fn, args, kwargs, grid))
            return real(*args, grid=grid, warmup=warmup, **kwargs) if run else None
        return record

    # a launcher's check of data a kernel wrote (restore_tokens' check_ids of random_masking's ids) reads
    # garbage where no kernel ran: the kernel modules' check_* functions are off while launches are not run
    checks = [] if run else [(m, n) for m in {sys.modules[fn.fn.__module__] for fn in fns}
                             for n in vars(m) if n.startswith("check_") and callable(getattr(m, n))]
    saved = [(m, n, getattr(m, n)) for m, n in checks]
    for fn in fns:
        fn.run = wrap(fn)
    for m, n in checks:
        setattr(m, n, lambda *a, **k: None)
    try:
        yield launches
    finally:
        for m, n, f in saved:
            setattr(m, n, f)
        for fn in fns:
            del fn.run


# (L, D) of the masking / restore tests (tests/test_random_masking.py, tests/test_restore_tokens.py), as the compile check launches them
# (the models' and benchmarks' shapes it takes from their own launches).
TOKEN_SHAPES = ((49, 64), (196, 768), (197, 384), (256, 192), (1024, 1000), (64, 192), (196, 512), (64, 128),
                (256, 1024))
# the token kernels' ops: both run at each of TOKEN_SHAPES
TOKEN_OPS = {random_masking_op.RANDOM_MASKING.name, restore_tokens_op.RESTORE_TOKENS.name}


def _uniformity_variants() -> None:
    """Forward and backward at every flag combination, the similarity's and the Gram's shapes, each
    dtype: each combination picks its own kernels and constexprs (the compile check compiles them)."""
    for B, D in ((70, 96), (130, 64)):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for normalize in (True, False):
                for exclude in (True, False):
                    f = torch.randn(B, D).to(dt).requires_grad_()
                    uniformity_op.uniformity_loss(f, normalize=normalize, exclude_diagonal=exclude).backward()


def _videomae_loss_variants() -> None:
    """norm_pix and the unnormalize off (constexprs the cases leave on; the dtypes the cases compile)."""
    from ..ops.tube_mask_op import tube_mask

    mask = tube_mask(2, 2, 2, 3, 0.5)
    for norm_pix, stats in ((False, {}), (True, dict(mean=None, std=None)), (False, dict(mean=None, std=None))):
        pred = torch.randn(2, 6, 2 * 8 * 8 * 3).requires_grad_()
        videomae_loss_op.videomae_loss(pred, torch.randn(2, 3, 4, 16, 24), mask, 8, 2, norm_pix, **stats).backward()


# launches beyond an op's benchmark cases that the compile check must see (flags the cases do not set)
LAUNCH_VARIANTS = {uniformity_op.UNIFORMITY_LOSS.name: _uniformity_variants,
                   videomae_loss_op.VIDEOMAE_LOSS.name: _videomae_loss_variants}


def h100():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def specialize(fn, args, kwargs, target):
    """(key, ASTSource, options) of the launch as the JIT binds it for `target`."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kwargs = dict(kwargs, debug=fn.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    key = (fn.__name__, repr(spec), repr(sorted(options.__dict__.items())))
    return key, ASTSource(fn, signature, constexprs, attrs), options


@contextlib.contextmanager
def triton_on_cpu():
    """The fused ops pick their Triton kernels for CPU tensors (as under the interpreter), while
    the kernels themselves stay compiled JITFunctions whose launches `recording` intercepts."""
    from .. import ops

    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with ops.use_impl("triton-interpreter"):
            yield
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


def kernels_of(module):
    """The module's own @triton.jit kernels (JITFunctions; InterpretedFunctions under the
    interpreter), not the shared helpers it imports (kernels/_util.py's)."""
    return [v for v in vars(module).values()
            if isinstance(v, triton.runtime.jit.KernelInterface) and v.fn.__module__ == module.__name__]


def _fwd_bwd(out, inputs):
    outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.requires_grad]
    torch.autograd.grad(outs, inputs, [torch.ones_like(t) for t in outs], allow_unused=True)


def collect_launches(op_names, shapes=None, models=None):
    """Every launch of the Triton kernels of op `op_names` (a name or a list: one pass records
    them all) at: their benchmark cases (the registry's bench shape sets, fp32/bf16/fp16, forward
    and backward, and forward without grad), their test token shapes (contiguous and strided x),
    and one training step of each umae model (their real strides, under bf16 autocast)."""
    import timm

    from .. import models as _registers  # noqa: F401  (registers the models with timm)
    from ..ops import registry
    from ..bench import cases

    names = [op_names] if isinstance(op_names, str) else list(op_names)
    chosen = [registry.get(n) for n in names]
    mine = {f for op in chosen for f in kernels_of(op.kernels)}
    # the model runs every op: all Triton kernels are intercepted, the chosen ops' are kept
    fns = [f for o in registry.OPS.values() if o.kernels for f in kernels_of(o.kernels)]
    shapes = cases.SHAPES if shapes is None else shapes
    # every model but large and huge (their widths are the vit_l16 bench shapes'; CPU time)
    if models is None:  # the video models' glue at VideoMAE-B's shapes is the video cases' (videomae_b): the micro one
        models = [m for m in timm.list_models("umae_vit_*") if "large" not in m and "huge" not in m]
        models += [m for m in timm.list_models("umae_videomae_*") if "micro" in m]
    with recording(fns) as launches, triton_on_cpu():
        for op in chosen:
            for name, s in shapes.items():
                for dt in (torch.float32, torch.bfloat16, torch.float16):
                    try:
                        c = cases.case(op.name, s, dt, "cpu")
                    except cases.NotApplicable:
                        continue
                    _fwd_bwd(c.forward(), c.grad_inputs)
                    with torch.no_grad():  # inference launches (uniformity: no Gram kept for a backward)
                        c.forward()
        for op in chosen:
            if getattr(op.kernels, "CANDIDATES", None):  # every tuning candidate, as `umae bench tune` launches it
                _candidate_launches(op)
            if op.name in LAUNCH_VARIANTS:  # the flags its cases do not set
                LAUNCH_VARIANTS[op.name]()
        for L, D in sorted({s for op in chosen if op.name in TOKEN_OPS for s in TOKEN_SHAPES}):
            _token_launches(L, D)  # both token ops run; the chosen ops' launches are kept
        for m in models:
            # one encoder and one decoder block: the glue ops' launches depend on the widths, the
            # token counts and the strides, not on the depth (a ViT-B step on CPU takes seconds)
            model = timm.create_model(m, fused=True, depth=1, decoder_depth=1)
            clip = (model.num_frames,) if hasattr(model, "num_frames") else ()  # a video model takes (B, C, T, H, W)
            x = torch.randn(2, 3, *clip, model.img_size, model.img_size)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).loss
            loss.backward()
    return [launch for launch in launches if launch[0] in mine]


def _candidate_launches(op) -> None:
    from ..bench import cases, tune

    for shape, _product, group, i, cfg in tune.runs(op):
        if i == 0:  # the default: launched above
            continue
        with op.kernels.configured(**{group: cfg}):
            c = cases.case(op.name, shape, tune.DTYPE, "cpu")
            _fwd_bwd(c.forward(), c.grad_inputs)


def _token_launches(L, D):
    import umae
    from ..ops.random_masking_op import len_keep_for

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for strided in (False, True):
            x = torch.randn(2, L, 2 * D if strided else D).to(dt)[..., ::2 if strided else 1].requires_grad_()
            pos, cls = torch.randn(1, L, D).to(dt), torch.randn(1, 1, D).to(dt).requires_grad_()
            _fwd_bwd(umae.random_masking(x, 0.75, torch.rand(2, L), pos, cls), [x, cls])
            _fwd_bwd(umae.random_masking(x, 0.75, torch.rand(2, L)), [x])
            keep = len_keep_for(L, 0.75)
            xk = x[:, : keep + 1].detach().requires_grad_()
            ids = torch.argsort(torch.rand(2, L), 1)
            tok = torch.randn(1, 1, D).to(dt).requires_grad_()
            _fwd_bwd(umae.restore_tokens(xk, ids, tok, torch.randn(1, L + 1, D).to(dt)), [xk, tok])
            _fwd_bwd(umae.restore_tokens(xk[:, 1:], ids, tok, has_cls=False), [xk, tok])


def label(src) -> str:
    """A short name for a specialization: pointer dtypes and the upper-case constexprs."""
    fn = src.fn
    ptrs = sorted({t[1:] for t in src.signature.values() if isinstance(t, str) and t.startswith("*")})
    consts = {fn.arg_names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
    named = " ".join(f"{k}={v}" for k, v in consts.items() if k.isupper())
    ones = sum(1 for k, v in consts.items() if not k.isupper() and v == 1)
    return f"{'/'.join(ptrs)} {named} ({ones} args == 1)"


def compile_all(launches, target=None):
    """Compile each distinct JIT specialization once; yields (key, compiled kernel, its ASTSource)."""
    target = target or h100()
    seen = set()
    for fn, args, kwargs, _grid in launches:
        key, src, options = specialize(fn, args, kwargs, target)
        if key in seen:
            continue
        seen.add(key)
        yield key, triton.compile(src, target=target, options=options.__dict__), src
