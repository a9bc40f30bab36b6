"""Shared test helpers: the op tolerances (the library's, umae/ops/_tolerance.py), the model-level
gradient bound, the sampled parameter grids of the quick tier."""
from __future__ import annotations

import pytest
import torch

from umae import ops

from umae.ops import _backend, registry
from umae.ops._backend import triton_interpreted
# The op tolerances, per dtype, are the library's (umae/ops/_tolerance.py: what each allows and why):
# `umae check` and these tests compare at the same ones.
from umae.ops._tolerance import EXACT, LOSS_TOL, MATMUL_TOL, SUM_TERMS, TOL, U, UNIT_ROUNDOFF  # noqa: F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# each op's parity tests
OP_TESTS = {"patchify": "tests/test_patchify.py", "unpatchify": "tests/test_patchify.py",
            "masked_mse_loss": "tests/test_masked_mse.py", "mae_loss": "tests/test_masked_mse.py",
            "random_masking": "tests/test_masking.py", "restore_tokens": "tests/test_masking.py",
            "uniformity_loss": "tests/test_uniformity.py"}

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


def fused_impls(op: str, device: str | None = None):
    """pytest params (device, impl) for every fused implementation of `op` this machine runs (on CPU:
    the C++ kernel and, under TRITON_INTERPRET=1, the Triton kernel). tests/conftest.py puts the
    test's `impl` first (`_backend.use_impl`); `assert_runs` checks that it is what runs."""
    out = []
    spec = registry.get(op)
    for impl in spec.impls:
        if device not in (None, impl.device) or impl.device not in DEVICES or not _backend._runnable(spec, impl)[0]:
            continue
        out.append(pytest.param(impl.device, impl.name, id=f"{impl.device}-{impl.name}"))
    return out


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
    """pytest params (device, impl, dtype, variant): every row of `op`'s parity grid (umae/bench/grid.py,
    what `umae check` runs) for each fused implementation here and each dtype it takes. The quick tier
    runs the variants whose index is the (implementation, dtype) pair's modulo the number of pairs:
    each pair a different share, every variant once over the pairs (where its dtype applies); the rest
    are marked slow."""
    from umae.bench import grid
    from umae.ops._checks import FLOATS

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
    from umae.bench import check

    got = ops.choose(op, device, (dtype,), backend="fused")[0]
    assert got == impl or (impl == "triton" and got == "triton-interpreter"), f"{op}: {got} runs, not {impl}"
    fwd, bwd = check.compare(registry.get(op), variant, dtype, device)
    assert fwd <= 1 and bwd <= 1, (f"{op} [{variant.name}] {dtype}: err/tol forward {fwd:.3g}, backward {bwd:.3g} "
                                   "(umae/ops/_tolerance.py; pass at <= 1)")
