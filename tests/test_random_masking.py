"""random_masking: every fused implementation (the C++ CPU kernel; the Triton kernel, interpreted on
CPU, native on CUDA) vs the reference, its edges (L = 0, ties and NaN noise, double backward, numpy
scalars), and the pair with restore_tokens as a model calls them (mixed dtypes, compile, CUDA graphs)."""
import numpy as np
import pytest
import torch
from umae_testing import (DTYPES, LAYOUT_SHAPES, TOL, assert_backward_reads_any_gradient_layout, assert_close,
                          assert_forward_mode_ad_refused, assert_grid_row, assert_rounding_matters, assert_runs,
                          assert_second_order_matches, cpu_impls, cuda_only, fused_impls, grid_params, needs_ext, randn,
                          runs_impl, sampled)

from umae.ops import registry

import umae
from umae.ops.random_masking_op import len_keep_for, random_masking_reference
from umae.ops.restore_tokens_op import restore_tokens_reference

# (N, L, D): L = 49, 196, 197, 256, 1024 and D = 64, 192, 384, 768, 1000 (kept small in N: the
# interpreter costs ~1 ms per program).
SHAPES = [(3, 49, 64), (2, 196, 768), (2, 197, 384), (1, 256, 192), (1, 1024, 1000), (2, 37, 33)]
RATIOS = [0.0, 0.5, 0.75, 0.9]
IMPLS = fused_impls("random_masking")
CPU_IMPLS = cpu_impls("random_masking")


def _custom_op(op):
    """The op's one torch.library op (every implementation is a kernel of it)."""
    return getattr(torch.ops.umae, registry.get(op).schema.split("::")[1]).default


def _params(N, L, D, dtype, device, pos, cls):
    x = randn(N, L, D, dtype=dtype, device=device, requires_grad=True)
    p = randn(1, L, D, dtype=dtype, device=device, requires_grad=True) if pos else None
    c = randn(1, 1, D, dtype=dtype, device=device, requires_grad=True) if cls else None
    return x, p, c


def _grads(outs, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(outs, inputs, g)


@sampled(key={"device,impl": IMPLS, "dtype": DTYPES}, crossed={"N,L,D": SHAPES}, paired={"ratio": RATIOS})
@runs_impl
def test_random_masking_parity(device, impl, dtype, N, L, D, ratio):
    pos, cls = (L + D) % 2 == 0, ratio != 0.5  # vary the optional inputs across cases
    x, p, c = _params(N, L, D, dtype, device, pos=True, cls=True)
    p = p if pos else None
    c = c if cls else None
    noise = torch.rand(N, L, device=device)
    assert_runs("random_masking", impl, x, p, c)
    xm, mask, ids = umae.random_masking(x, ratio, noise, p, c)
    rxm, rmask, rids = random_masking_reference(x, ratio, noise, p, c)
    assert torch.equal(ids, rids) and torch.equal(mask, rmask)
    assert xm.dtype == rxm.dtype and xm.shape == (N, len_keep_for(L, ratio) + int(cls), D)
    # gathered values bitwise: one fp32 add, one round-to-nearest-even (the interpreter's Triton
    # path too: kernels/_util.cast_rn does the rounding its bf16 cast would truncate)
    assert torch.equal(xm, rxm)
    if p is not None and dtype == torch.bfloat16 and ratio != 0.0:
        assert_rounding_matters(x.detach()[:, :1], p.detach()[:, :1])
    g = randn(*xm.shape, dtype=xm.dtype, device=device)
    for a, b, name in zip(_grads(xm, (x, p, c), g), _grads(rxm, (x, p, c), g), ("x", "pos", "cls")):
        assert_close(a, b, name=f"grad {name}", **TOL[dtype])


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_roundtrip_mixed_dtypes_autocast_style(device, impl):
    # bf16 tokens with fp32 parameters: outputs promote to fp32 exactly like the reference.
    N, L, D = 2, 196, 192
    x = randn(N, L, D, dtype=torch.bfloat16, device=device, requires_grad=True)
    pos = randn(1, L, D, device=device)
    cls = randn(1, 1, D, device=device, requires_grad=True)
    noise = torch.rand(N, L, device=device)
    xm, mask, ids = umae.random_masking(x, 0.75, noise, pos, cls)
    rxm = random_masking_reference(x, 0.75, noise, pos, cls)[0]
    assert xm.dtype == torch.float32 and torch.equal(xm, rxm)
    tok = randn(1, 1, D, device=device, requires_grad=True)
    dpos = randn(1, L + 1, D, device=device)
    xd = xm.detach().to(torch.bfloat16).requires_grad_()
    out = umae.restore_tokens(xd, ids, tok, dpos)
    ref = restore_tokens_reference(xd, ids, tok, dpos)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    g = randn(*out.shape, device=device)
    for a, b in zip(torch.autograd.grad(out, (xd, tok), g), torch.autograd.grad(ref, (xd, tok), g)):
        assert_close(a, b, **TOL[a.dtype])  # one rounding to the gradient's own dtype
    g = randn(*xm.shape, device=device)
    for a, b in zip(torch.autograd.grad(xm, (x, cls), g), torch.autograd.grad(rxm, (x, cls), g)):
        assert_close(a, b, **TOL[torch.bfloat16])


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_random_masking_without_noise(device, impl):
    N, L, D = 4, 197, 32
    x = randn(N, L, D, device=device)
    torch.manual_seed(7)
    xm, mask, ids = umae.random_masking(x, 0.75)
    keep = len_keep_for(L, 0.75)
    assert (mask.sum(1) == L - keep).all()  # exactly len_keep kept per row
    assert torch.equal(ids.sort(1).values, torch.arange(L, device=device).expand(N, L))  # a permutation
    assert torch.equal(torch.gather(x, 1, ids.argsort(1)[:, :keep, None].expand(-1, -1, D)), xm)
    torch.manual_seed(7)
    assert torch.equal(umae.random_masking(x, 0.75)[1], mask)  # same seed, same mask
    torch.manual_seed(7)
    with umae.use_backend("reference"):
        assert torch.equal(umae.random_masking(x, 0.75)[1], mask)  # and the same as the reference


@pytest.mark.parametrize("impl", CPU_IMPLS)
@runs_impl
def test_edges_len_keep_zero_and_all(impl):
    x = randn(2, 49, 16)
    cls = randn(1, 1, 16)
    xm, mask, ids = umae.random_masking(x, 0.99, cls_token=cls)  # int(49 * 0.01) == 0
    assert xm.shape == (2, 1, 16) and mask.eq(1).all()
    assert torch.equal(umae.restore_tokens(xm, ids, randn(1, 1, 16), has_cls=True)[:, 0], xm[:, 0])
    xm, mask, ids = umae.random_masking(x, 0.0, noise=torch.rand(2, 49))
    assert xm.shape == (2, 49, 16) and mask.eq(0).all()


@pytest.mark.parametrize("impl", CPU_IMPLS)
@runs_impl
def test_ties_and_nan_noise_like_a_stable_sort(impl):
    x = randn(2, 49, 16)
    noise = torch.rand(2, 49)
    noise[:, ::3] = 0.5  # many ties
    noise[1, 5] = float("nan")
    a = umae.random_masking(x, 0.5, noise)
    b = random_masking_reference(x, 0.5, noise)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@runs_impl
def test_nan_after_inf_and_fp64_noise_order_like_the_reference(impl):
    # NaN sorts after +inf (not tied with it); fp64 noise keeps differences fp32 cannot hold
    x = randn(2, 12, 8)
    noise = torch.rand(2, 12, dtype=torch.float64)
    noise[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=torch.float64)
    noise[0, 4] = 0.0
    noise[1, :6] = 0.5
    noise[1, 3] = 0.5 + 1e-12  # == 0.5 in fp32
    noise[1, 1] = 0.5 - 1e-12
    assert (noise.float()[1, :6] == 0.5).all()
    a = umae.random_masking(x, 0.5, noise)
    b = random_masking_reference(x, 0.5, noise)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_non_contiguous(device, impl):
    x = randn(3, 64, 2 * 48, device=device)[:, :, ::2]
    pos = randn(1, 48, 64, device=device).transpose(1, 2)
    noise = torch.rand(3, 64, device=device)
    assert not (x.is_contiguous() or pos.is_contiguous())
    for u, v in zip(umae.random_masking(x, 0.75, noise, pos), random_masking_reference(x, 0.75, noise, pos)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_opcheck(device, impl):
    x = randn(2, 49, 24, device=device, requires_grad=True)
    pos = randn(1, 49, 24, device=device, requires_grad=True)
    cls = randn(1, 1, 24, device=device, requires_grad=True)
    noise = torch.rand(2, 49, device=device)
    torch.library.opcheck(_custom_op("random_masking"), (x, noise, pos, cls, 12))


@pytest.mark.parametrize("check", [torch.autograd.gradcheck,
                                   pytest.param(torch.autograd.gradgradcheck, marks=pytest.mark.slow)],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("impl", [p for p in CPU_IMPLS if p.values[0] == "cpp-cpu"])
@runs_impl
def test_gradcheck_float64_cpp(impl, check):
    # the C++ kernel takes fp64: its backward (and the backward of that: double backward, a gradient
    # penalty) against finite differences
    N, L, D = 2, 11, 5
    x, pos, cls = (randn(*s, dtype=torch.float64, requires_grad=True) for s in ((N, L, D), (1, L, D), (1, 1, D)))
    noise = torch.rand(N, L)
    assert_runs("random_masking", impl, x, pos, cls)
    assert check(lambda a, b, c: umae.random_masking(a, 0.6, noise, b, c)[0], (x, pos, cls))


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.umae.random_masking(randn(2, 9, 4), torch.rand(2, 8), None, None, 3), "noise must be"),
    (lambda: torch.ops.umae.random_masking(randn(2, 9, 4), torch.rand(2, 9), randn(1, 9, 5), None, 3), "pos_embed must be"),
    (lambda: torch.ops.umae.random_masking(randn(2, 9, 4), torch.rand(2, 9), None, randn(1, 4), 3), "cls_token must be"),
    (lambda: torch.ops.umae.random_masking(randn(2, 9, 4), torch.rand(2, 9), None, None, 10), "len_keep must be"),
])
@needs_ext
def test_cpp_kernel_refuses_bad_input(call, match):
    # the C++ op is reachable directly (torch.ops.umae.*): it checks its arguments itself
    with pytest.raises(RuntimeError, match=match):
        call()


P = lambda *s: randn(*s)  # noqa: E731


@pytest.mark.parametrize("call, match", [
    (lambda: umae.random_masking(P(2, 49, 8), 1.0), r"mask_ratio must be a number in \[0, 1\)"),
    (lambda: umae.random_masking(P(2, 49, 8), -0.1), "mask_ratio"),
    (lambda: umae.random_masking(P(2, 49, 8), 0.75, noise=P(2, 48)), r"noise must have shape \(2, 49\)"),
    (lambda: umae.random_masking(P(2, 49, 8), 0.75, pos_embed=P(1, 50, 8)), r"pos_embed must have shape \(1, 49, 8\)"),
    (lambda: umae.random_masking(P(2, 49, 8), 0.75, pos_embed=P(1, 49, 7)), "pos_embed must have shape"),
    (lambda: umae.random_masking(P(2, 49, 8), 0.75, cls_token=P(1, 8)), r"cls_token must have shape \(1, 1, 8\)"),
    (lambda: umae.random_masking(P(2, 49, 8), 0.75, noise=P(2, 49).to("meta")), "noise is on meta"),
    (lambda: umae.random_masking(P(49, 8), 0.75), "x must have 3 dims"),
    (lambda: umae.random_masking(randn(1, 4, 2), True), r"mask_ratio must be .*\), got True"),
    (lambda: umae.random_masking(randn(1, 4, 2), np.True_), "mask_ratio must be a number"),
    (lambda: umae.random_masking(randn(1, 4, 2), np.float32(1.0)), "mask_ratio must be a number"),
    (lambda: umae.random_masking(randn(1, 4, 2), torch.tensor(0.5)), "mask_ratio must be a number"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_numpy_scalars_are_accepted(backend):
    x, noise = randn(2, 10, 4), torch.rand(2, 10)
    want = umae.random_masking(x, 0.7, noise, backend=backend)
    for r in (np.float32(0.7), np.float64(0.7)):
        got = umae.random_masking(x, r, noise, backend=backend)
        assert got[0].shape == want[0].shape and all(torch.equal(u, v) for u, v in zip(got, want))
    assert umae.random_masking(x, np.float32(0.25), noise, backend=backend)[0].shape == (2, 7, 4)  # int(10 * 0.75)


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("x_dtype,cls_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
@pytest.mark.parametrize("with_pos", [False, True])
@runs_impl
def test_random_masking_no_tokens_keeps_the_cls_token(device, impl, x_dtype, cls_dtype, with_pos):
    # the C++ kernel returned uninitialized memory in the cls row, the Triton kernel zeros
    N, D = 3, 20
    x = randn(N, 0, D, dtype=x_dtype, device=device, requires_grad=True)
    cls = randn(1, 1, D, dtype=cls_dtype, device=device, requires_grad=True)
    pos = randn(1, 0, D, dtype=x_dtype, device=device) if with_pos else None
    assert_runs("random_masking", impl, x, pos, cls)
    noise = torch.rand(N, 0, device=device)
    got = umae.random_masking(x, 0.75, noise, pos, cls)
    ref = random_masking_reference(x, 0.75, noise, pos, cls)
    assert got[0].shape == (N, 1, D) and got[0].dtype == ref[0].dtype
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    assert torch.equal(got[0][:, 0], cls[0].expand(N, D).to(got[0].dtype))
    g = randn(N, 1, D, dtype=got[0].dtype, device=device)
    gx, gc = torch.autograd.grad(got[0], (x, cls), g)
    rx, rc = torch.autograd.grad(ref[0], (x, cls), g)
    assert gx.shape == (N, 0, D) and torch.equal(gc, rc)


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("has_cls", [True, False])
@runs_impl
def test_random_masking_double_backward(device, impl, has_cls):
    x = randn(2, 13, 6, device=device, requires_grad=True)
    pos = randn(1, 13, 6, device=device, requires_grad=True)
    cls = randn(1, 1, 6, device=device, requires_grad=True)
    noise = torch.rand(2, 13, device=device)
    assert_runs("random_masking", impl, x, pos, cls)
    inputs = (x, pos, cls) if has_cls else (x, pos)
    assert_second_order_matches(lambda *t: umae.random_masking(t[0], 0.6, noise, *t[1:])[0], inputs,
                                      TOL[torch.float32])


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=["tiny", "larger"])
@pytest.mark.parametrize("layout", ["sum", "strided"])
def test_backward_reads_any_gradient_layout(shape, layout):
    assert_backward_reads_any_gradient_layout("random_masking", shape, layout)


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused_not_zero(api):
    assert_forward_mode_ad_refused("random_masking", api)


@pytest.mark.slow
@pytest.mark.parametrize("impl", CPU_IMPLS)
@runs_impl
def test_compile_fullgraph(impl):
    x = randn(2, 49, 32, requires_grad=True)
    pos, cls, tok = randn(1, 49, 32), randn(1, 1, 32, requires_grad=True), randn(1, 1, 32, requires_grad=True)
    noise = torch.rand(2, 49)

    def f(x, noise):
        xm, mask, ids = umae.random_masking(x, 0.75, noise, pos, cls)
        return umae.restore_tokens(xm, ids, tok).sum() + mask.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, noise)
    assert_close(out, f(x, noise), **TOL[torch.float32])
    out.backward()


@cuda_only
def test_cuda_graph_capture_no_sync():
    N, L, D = 8, 196, 192
    x = randn(N, L, D, device="cuda")
    pos, tok = randn(1, L, D, device="cuda"), randn(1, 1, D, device="cuda")
    umae.random_masking(x, 0.75, pos_embed=pos)  # warm up (compiles the kernels)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        xm, mask, ids = umae.random_masking(x, 0.75, pos_embed=pos)
        out = umae.restore_tokens(xm, ids, tok, has_cls=False)
    g.replay()
    torch.cuda.synchronize()
    assert (mask.sum(1) == L - len_keep_for(L, 0.75)).all() and out.shape == (N, L, D)


HALF_AND_FP32 = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device,impl", fused_impls("random_masking"))
@runs_impl
def test_random_masking_rounds_kept_rows_as_the_reference_in_every_dtype_mix(device, impl):
    # the reference rounds x + pos to promote(x, pos), then cat with cls widens it (exactly); the Triton
    # kernel stored x + pos unrounded in the wider dtype (4 of 192 mixes, up to 7.8e-3 off)
    N, L, D = 3, 20, 24
    noise = torch.rand(N, L, device=device)
    for xd in HALF_AND_FP32:
        for pd in HALF_AND_FP32:
            for cd in HALF_AND_FP32:
                x = randn(N, L, D, dtype=xd, device=device)
                pos, cls = randn(1, L, D, dtype=pd, device=device), randn(1, 1, D, dtype=cd, device=device)
                assert_runs("random_masking", impl, x, pos, cls)
                got = umae.random_masking(x, 0.6, noise, pos, cls)[0]
                ref = random_masking_reference(x, 0.6, noise, pos, cls)[0]
                assert got.dtype == ref.dtype and torch.equal(got, ref), (xd, pd, cd, (got.float() - ref.float()).abs().max())


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("random_masking"))
@runs_impl
def test_random_masking_grid(device, impl, dtype, variant):
    # shapes, flags, layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("random_masking", device, impl, dtype, variant)
