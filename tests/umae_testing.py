"""Shared test helpers (a module of its own name, not a top-level `utils`): the op tolerances (the
library's, umae/ops/_tolerance.py), the implementations to run and `runs_impl`, the model-level
gradient bound, the sampled parameter grids of the quick tier."""
from __future__ import annotations

import pytest
import torch

import umae
from umae import ops
from umae.ops import _common, registry
from umae.ops._common import triton_interpreted
# The op tolerances, per dtype, are the library's (umae/ops/_tolerance.py: what each allows and why):
# `umae check` and these tests compare at the same ones.
from umae.ops._tolerance import EXACT, LOSS_TOL, MATMUL_TOL, SUM_TERMS, TOL, U, UNIT_ROUNDOFF  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# each op's parity tests
OP_TESTS = {"patchify": "tests/test_patchify.py", "unpatchify": "tests/test_patchify.py",
            "masked_mse_loss": "tests/test_masked_mse.py", "mae_loss": "tests/test_masked_mse.py",
            "random_masking": "tests/test_random_masking.py", "restore_tokens": "tests/test_restore_tokens.py",
            "uniformity_loss": "tests/test_uniformity.py", "tubelet_patchify": "tests/test_videomae.py",
            "tubelet_unpatchify": "tests/test_videomae.py", "videomae_loss": "tests/test_videomae.py"}

# Model-level gradients (a whole backward, fused vs reference) are not compared elementwise at a
# fixed tolerance: how far two fp32 backwards drift apart depends on the machine's matmul kernels
# (AVX2 vs AVX-512 blocking) and on the network's conditioning, and some true gradients are 0
# (attention key biases), where any tolerance relative to the value is pure noise. Instead both
# paths are measured against the same model in float64 (the truth): per parameter, the fused
# path's error norm may be at most GRAD_ERR_RATIO times the reference's own error in the same
# precision, plus a floor of GRAD_FLOOR roundings of the dtype at the tensor's own norm, and of
# fp32 (the precision gradients are accumulated in) at the typical parameter's gradient scale,
# for a tensor whose true gradient is ~0 (the median over parameters of their RMS: one outsized
# gradient, such as a mask token's, must not set it). Both paths do the same operations in
# different orders, so their errors have the same size; a wrong gradient (a missed term, a wrong
# scale) is off by O(1) relative, 1e5 times this bound in fp32 (tests/test_patching.py checks
# that a 10% error fails in fp32, a 50% one under bf16 autocast).
GRAD_ERR_RATIO = 4.0
GRAD_FLOOR = 16


def assert_grads_close(got: dict, ref: dict, truth: dict, dtype: torch.dtype, what="grad"):
    """got / ref: {name: gradient} of the fused and the reference model computed in `dtype` (or
    under its autocast); truth: the reference model's gradients in float64."""
    assert got.keys() == ref.keys() == truth.keys(), (sorted(got), sorted(ref), sorted(truth))
    truth = {n: t.detach().double().cpu() for n, t in truth.items()}
    typical = torch.tensor([t.pow(2).mean().sqrt().item() for t in truth.values()]).median().item()
    bad = []
    for n, t in truth.items():
        e_got = (got[n].detach().double().cpu() - t).norm().item()
        e_ref = (ref[n].detach().double().cpu() - t).norm().item()
        floor = UNIT_ROUNDOFF[dtype] * t.norm().item() + UNIT_ROUNDOFF[torch.float32] * typical * t.numel() ** 0.5
        bound = GRAD_ERR_RATIO * e_ref + GRAD_FLOOR * floor
        if not e_got <= bound:
            bad.append(f"{what} {n}: error {e_got:.3g} vs the float64 truth, bound {bound:.3g} (the reference's "
                       f"error {e_ref:.3g}; |truth| {t.norm().item():.3g})")
    assert not bad, "\n".join(bad)


# Parameters after a few AdamW steps (two runs whose gradients differ only in rounding, such as
# DDP vs one process): Adam divides each gradient element by its own RMS, so rounding noise
# becomes a step of up to ~lr wherever the true gradient is as small as the noise (key biases:
# 0). A weight's gradient element sums one term per token of the global batch; summing T terms in
# another order errs by at most ~T ulps of their magnitude, bounded here by the whole gradient's
# RMS (not the element's own value, which may be 0). The update's relative error is then
# noise / |g|, capped at 2 (an opposite step), per step; plus one fp32 rounding of the parameter
# per step.
def adam_tolerance(param: torch.Tensor, exp_avg_sq: torch.Tensor, global_rms: float, lr: float, steps: int,
                   terms: int, beta2: float = 0.95) -> torch.Tensor:
    """Per-element bound on |p_a - p_b| after `steps` AdamW steps at lr <= `lr`; exp_avg_sq is
    the optimizer's second moment (bias-corrected here), global_rms the RMS of every element's
    sqrt(v_hat), terms the tokens of a global batch."""
    u = UNIT_ROUNDOFF[torch.float32]
    g = (exp_avg_sq / (1 - beta2 ** steps)).sqrt()
    return steps * lr * (terms * u * global_rms / g).clamp(max=2.0) + 2 * steps * u * param.abs()


# The limit on a spawned process or subprocess: a guard against a hang, not a speed limit (a test must
# not depend on how fast the machine is; a busy 2-core machine runs minutes behind a quiet one).
HANG_GUARD = 900

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(actual, expected, atol, rtol, name="value"):
    """torch.testing.assert_close on fp32 copies, reporting the worst element."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    try:
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True)
    except AssertionError as err:
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        i = int(diff.flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
        raise AssertionError(f"{name}: worst at {idx}: actual {a.flatten()[i].item()!r} vs "
                             f"expected {e.flatten()[i].item()!r}\n{err}") from None


def assert_rounding_matters(a, b):
    """bf16 a + b rounded to nearest differs from truncation somewhere: a test that expects the
    rounding of a bf16 sum bitwise can then fail if a kernel truncates."""
    s = a.float() + b.float()
    truncated = (s.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(s.to(torch.bfloat16), truncated), "inputs where truncation and rounding agree"


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    """Fresh random values (never zeros), made in fp32 and rounded once to dtype."""
    x = torch.randn(*shape, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def random_mask(N, L, device="cpu", ratio=0.75):
    return (torch.rand(N, L, device=device) < ratio).float()

# CPU tests of Triton kernels: only under the interpreter (on a GPU machine they run on CUDA instead).
triton_cpu = pytest.mark.skipif(not triton_interpreted(),
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (the CUDA variants cover it)")
# tests of the C++ extension's own ops (torch.ops.umae.*): not where it is not built
needs_ext = pytest.mark.skipif(not _common.EXT_LOADED, reason=_common.EXT_REASON)


def fused_impls(op: str, device: str | None = None):
    """pytest params (device, impl) for every fused implementation of `op` this machine runs (on CPU:
    the C++ kernel and, under TRITON_INTERPRET=1, the Triton kernel). A test that takes them says
    @runs_impl, which puts its `impl` first; `assert_runs` checks that it is what runs."""
    out = []
    spec = registry.get(op)
    for impl in spec.impls:
        if device not in (None, impl.device) or impl.device not in DEVICES or not _common._runnable(spec, impl)[0]:
            continue
        out.append(pytest.param(impl.device, impl.name, id=f"{impl.device}-{impl.name}"))
    return out


def runs_impl(test):
    """A test of implementation `impl` (its parameter, from fused_impls / cpu_impls): it runs with that
    implementation first where its device has several (`umae.ops.use_impl`: on CPU the C++ kernel or the
    interpreted Triton kernel); `assert_runs` checks what runs."""
    import functools

    import contextlib

    @functools.wraps(test)
    def run(*args, **kwargs):
        impl = kwargs["impl"]  # None: the reference (a test of both)
        with ops.use_impl(impl) if impl else contextlib.nullcontext():
            return test(*args, **kwargs)
    return run


def cpu_impls(op: str):
    """fused_impls on CPU, as pytest params of `impl` alone."""
    return [pytest.param(p.values[1], id=p.id) for p in fused_impls(op, "cpu")]


def assert_runs(op: str, impl: str, *tensors):
    """The parity test runs the implementation it names (else it would compare the reference with itself)."""
    got = ops.implementation(op, *tensors)
    assert got == impl or (impl == "triton" and got == "triton-interpreter"), f"{op}: {got} runs, not {impl}"


def sampled(key: dict, crossed: dict, paired: dict = None):
    """pytest.mark.parametrize over a parity grid, in two tiers. Dims are {argnames: values}
    ("a,b" for tuples; values may be pytest.params).

    The full run (every tier) crosses the `key` dims (e.g. implementation x dtype) with the
    `crossed` dims (the shapes: each selects other block sizes and tails), and pairs the `paired`
    dims (flags) with those rows: the row of key combination k and crossed combination c takes
    paired combination (k + c) mod their count, so each key combination meets every paired
    combination once there are as many crossed combinations as paired ones, and each crossed
    combination does once there are as many key combinations (paired sampling: each value
    covered, not crossed again). The quick tier runs one row per key combination, cycling
    through the crossed values so each is in it; the other rows are marked `slow`."""
    import itertools

    paired = paired or {}

    def norm(v, arity):  # (values, id, marks)
        if isinstance(v, type(pytest.param(0))):
            return tuple(v.values), v.id, tuple(v.marks)
        return (tuple(v) if arity > 1 else (v,)), None, ()

    def product(dims):
        return list(itertools.product(*([norm(v, len(k.split(","))) for v in vals] for k, vals in dims.items())))

    names = [n.strip() for k in (*key, *crossed, *paired) for n in k.split(",")]
    keys, cross, pairs = product(key), product(crossed), product(paired)
    if not keys or not cross:  # no implementation here: nothing to run (not a collection error)
        return pytest.mark.parametrize(",".join(names), [])
    quick = {(j % len(keys), j % len(cross)) for j in range(max(len(keys), len(cross)))}
    params = []
    for j, (ki, ci) in enumerate(itertools.product(range(len(keys)), range(len(cross)))):
        parts = keys[ki] + cross[ci] + pairs[(ki + ci) % len(pairs)]
        values = tuple(x for p in parts for x in p[0])
        ids = "-".join(p[1] if p[1] is not None else "-".join(_id(x) for x in p[0]) for p in parts)
        marks = tuple(m for p in parts for m in p[2]) + (() if (ki, ci) in quick else (pytest.mark.slow,))
        params.append(pytest.param(*values, id=ids, marks=marks))
    return pytest.mark.parametrize(",".join(names), params)


def _id(x) -> str:
    return str(x).replace("torch.", "")


def grid_params(op: str):
    """pytest params (device, impl, dtype, variant): every row of `op`'s parity grid (umae/verify/grid.py,
    what `umae check` runs) for each fused implementation here and each dtype it takes. The quick tier
    runs the variants whose index is the (implementation, dtype) pair's modulo the number of pairs:
    each pair a different share, every variant once over the pairs (where its dtype applies); the rest
    are marked slow."""
    from umae.verify import grid
    from umae.ops._common import FLOATS

    spec = registry.get(op)
    keys = [(p.values[0], p.values[1], dt) for p in fused_impls(op) for dt in FLOATS
            if dt in next(i for i in spec.impls if i.name == p.values[1]).dtypes]
    k = max(len(keys), 1)
    return [pytest.param(*key, v, id=f"{key[0]}-{key[1]}-{_id(key[2])}-{v.name.replace(' ', '-')}",
                         marks=() if vi % k == ki % k else (pytest.mark.slow,))
            for ki, key in enumerate(keys) for vi, v in enumerate(grid.variants(op)) if grid.applies(v, key[2])]


def assert_grid_row(op: str, device: str, impl: str, dtype, variant):
    """The fused call against the reference on one grid row, forward and backward, at the op's tolerances
    (the comparison `umae check` makes)."""
    from umae.verify import check

    got = ops.choose(op, device, (dtype,), backend="fused")[0]
    assert got == impl or (impl == "triton" and got == "triton-interpreter"), f"{op}: {got} runs, not {impl}"
    fwd, bwd = check.compare(registry.get(op), variant, dtype, device)
    assert fwd <= 1 and bwd <= 1, (f"{op} [{variant.name}] {dtype}: err/tol forward {fwd:.3g}, backward {bwd:.3g} "
                                   "(umae/ops/_tolerance.py; pass at <= 1)")


# ---- properties each op's test file checks for its ops: second order, gradient layouts, forward-mode AD ----

DOUBLE_BACKWARD = r"double backward \(a gradient of its gradient.*is not supported by the fused .*use the reference"
CREATE_GRAPH_WARNING = "ignore:Using backward\\(\\) with create_graph=True:UserWarning"


def penalty_grads(fn, inputs):
    """d/d(inputs) of a gradient penalty |d f/d(inputs)|^2, f = sum(w * fn(*inputs)^2): needs fn's
    second derivative (its backward differentiated w.r.t. the incoming gradient)."""
    out = fn(*inputs)
    w = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    acc = torch.promote_types(out.dtype, torch.float32)
    f = (w * out.to(acc) ** 2).sum()
    grads = torch.autograd.grad(f, inputs, create_graph=True)
    penalty = sum(g.to(acc).pow(2).sum() for g in grads)
    return torch.autograd.grad(penalty, inputs)


def assert_second_order_matches(fn, inputs, tol):
    got = penalty_grads(fn, inputs)
    with umae.use_backend("reference"):
        ref = penalty_grads(fn, inputs)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert b.abs().max() > 0, "a second-order term that is 0 tests nothing"
        assert_close(a, b, name=f"second-order grad of input {i}", **tol)


def assert_second_order_refused(loss_fn, inp, ref_grad):
    """create_graph=True alone works (the first-order gradient, requiring grad); differentiating that
    gradient (a penalty, a Hessian-vector product) raises, never 0 or 'not used in the graph'."""
    loss = loss_fn(inp)
    (g,) = torch.autograd.grad(loss, inp, create_graph=True)
    assert g.requires_grad
    assert_close(g, ref_grad, name="first-order grad under create_graph", **TOL[torch.float32])
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(g.pow(2).sum(), inp)  # a gradient penalty through the op
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(g, inp, torch.ones_like(g))  # a Hessian-vector product
    loss_fn(inp).backward(create_graph=True)  # and .backward(create_graph=True), the grad only read
    assert_close(inp.grad, ref_grad, name="grad after backward(create_graph=True)", **TOL[torch.float32])
    inp.grad = None


# every op's case at sizes where the CPU kernels run inline (their grain) and where most split into tasks
LAYOUT_SHAPES = [dict(N=2, img=16, p=8, C=3, D=16, Dd=16, B=5), dict(N=9, img=48, p=8, C=3, D=200, Dd=136, B=70)]


def assert_backward_reads_any_gradient_layout(op, shape, layout):
    """The backward kernels read the incoming gradient by its strides: a .sum()'s is one value broadcast
    (every stride 0), a transposed one has no unit stride; both gave copies before, now neither does."""
    from umae.bench.cases import CASES

    torch.manual_seed(0)
    case = CASES[op](shape, torch.float32, "cpu")
    assert ops.implementation(op, *case.grad_inputs) == "cpp-cpu"

    def grads(backend):
        with umae.use_backend(backend):
            out = case.forward()
        out = out[0] if isinstance(out, tuple) else out
        if layout == "sum":
            return torch.autograd.grad(out.sum(), case.grad_inputs)
        g = torch.randn(tuple(reversed(out.shape)), generator=torch.Generator().manual_seed(1))
        if out.dim():  # out's shape, no unit stride (a loss's gradient is one number)
            g = g.permute(*reversed(range(out.dim())))
            assert g.stride(-1) != 1
        return torch.autograd.grad(out, case.grad_inputs, g)

    for got, ref, x in zip(grads("fused"), grads("reference"), case.grad_inputs):
        tol = registry.get(op).parity.grad[torch.float32]
        scale = float(ref.abs().max()) if registry.get(op).parity.grad_scaled else 1.0
        assert_close(got, ref, name=f"{op} grad of {tuple(x.shape)}", atol=tol["atol"] * max(scale, 1e-30),
                     rtol=tol["rtol"])


FORWARD_AD = r"umae::.*forward-mode AD \(torch.func.jvp, torch.autograd.forward_ad\) is not supported by the fused"


def _jvp_cases():
    """op -> (its input, a function of it through the public op), fp64 (the C++ kernels take it)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    imgs, mask, noise = r(2, 3, 8, 8), (torch.rand(2, 4, generator=g) < 0.5).double(), torch.rand(2, 4, generator=g)
    target, ids = umae.patchify(imgs, 4, backend="reference"), torch.argsort(torch.rand(2, 4, generator=g), 1)
    pos, cls, tok, pos2 = r(1, 4, 16), r(1, 1, 16), r(1, 1, 16), r(1, 5, 16)
    vmask = umae.tube_mask(2, 2, 2, 2, 0.5, generator=g)
    return {"patchify": (imgs, lambda v: umae.patchify(v, 4)),
            "unpatchify": (r(2, 4, 48), lambda v: umae.unpatchify(v, 4, 8, 3)),
            "masked_mse_loss": (r(2, 4, 48), lambda v: umae.masked_mse_loss(v, target, mask)),
            "mae_loss": (r(2, 4, 48), lambda v: umae.mae_loss(v, imgs, mask, 4)),
            "random_masking": (r(2, 4, 16), lambda v: umae.random_masking(v, 0.5, noise, pos, cls)[0]),
            "restore_tokens": (r(2, 3, 16), lambda v: umae.restore_tokens(v, ids, tok, pos2)),
            "uniformity_loss": (r(5, 16), lambda v: umae.uniformity_loss(v)),
            "tubelet_patchify": (r(2, 3, 4, 8, 8), lambda v: umae.tubelet_patchify(v, 4, 2)),
            "tubelet_unpatchify": (r(2, 8, 96), lambda v: umae.tubelet_unpatchify(v, 4, 2, 4, 8, 8)),
            "videomae_loss": (r(2, 4, 96), lambda v: umae.videomae_loss(v, r(2, 3, 4, 8, 8), vmask, 4, 2))}


def assert_forward_mode_ad_refused(op, api):
    """Was: zero tangents (func.jvp) or none (forward_ad) from every fused op, without a word."""
    import torch.autograd.forward_ad as fwAD

    x, fn = _jvp_cases()[op]
    assert ops.implementation(op, x) == "cpp-cpu"
    tan = torch.randn_like(x)

    def tangent(backend):
        with umae.use_backend(backend):
            if api == "func.jvp":
                return torch.func.jvp(fn, (x,), (tan,))[1]
            with fwAD.dual_level():
                return fwAD.unpack_dual(fn(fwAD.make_dual(x, tan))).tangent
    ref = tangent("reference")
    assert ref is not None and ref.abs().max() > 0  # the reference's tangent exists
    with pytest.raises(RuntimeError, match=FORWARD_AD):
        tangent("fused")


def videomae(norm_pix: bool = True, image=8, frames=4, p=4, ts=2, channels=3, seed=0):
    """A small transformers VideoMAEForPreTraining (one encoder and one decoder layer), eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.VideoMAEConfig(image_size=image, patch_size=p, num_frames=frames, tubelet_size=ts,
                                      num_channels=channels, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32,
                                      decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                      decoder_intermediate_size=64, norm_pix_loss=norm_pix)
    return transformers.VideoMAEForPreTraining(cfg).eval()


def videomae_inputs(model, B: int, ratio=0.75, seed=1):
    """(pixel_values (B, T, C, H, W), a tube mask) for `model`, from a seeded generator."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.num_frames, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
    h = cfg.image_size // cfg.patch_size
    return x, umae.tube_mask(B, cfg.num_frames // cfg.tubelet_size, h, h, ratio, generator=g)
