"""masked_mse_loss and mae_loss: fused (C++ CPU, CUDA) vs the reference."""
import math

import numpy as np
import pytest
import torch
from umae_testing import (CREATE_GRAPH_WARNING, DEVICES, DTYPES, LAYOUT_SHAPES, LOSS_TOL, TOL,
                          assert_backward_reads_any_gradient_layout, assert_close, assert_forward_mode_ad_refused,
                          assert_grid_row, assert_runs, assert_second_order_refused, cuda_only, fused_impls,
                          grid_params, randn, random_mask, runs_impl)

import umae
from umae import ops
from umae.ops.masked_mse_op import NORM_PIX_EPS, mae_loss_reference, masked_mse_loss_reference
from umae.ops.patchify_op import patchify_reference

SHAPES = [(3, 3, 32, 48, 4), (1, 1, 28, 28, 14), (5, 3, 16, 16, 2), (2, 3, 64, 48, 16), (9, 3, 20, 12, 4)]


def _inputs(N, C, H, W, p, dtype, device, target_dtype=None):
    imgs = randn(N, C, H, W, dtype=target_dtype or dtype, device=device) * 2 + 0.5
    L, K = (H // p) * (W // p), p * p * C
    pred = randn(N, L, K, dtype=dtype, device=device, requires_grad=True)
    return pred, imgs, random_mask(N, L, device)


def _check(fused_fn, ref_fn, pred, dtype):
    loss = fused_fn(pred)
    with umae.use_backend("reference"):
        ref = ref_fn(pred)
    assert loss.dtype == torch.float32 and ref.dtype == torch.float32
    assert_close(loss, ref, name="loss", **LOSS_TOL[dtype])
    g = torch.autograd.grad(loss, pred)[0]
    gr = torch.autograd.grad(ref, pred)[0]
    assert g.dtype == dtype
    # relative to the gradient's own size: a mean's gradient is ~1 / the removed pixels, where a
    # tolerance of absolute size would pass a zero gradient in bf16 (umae/ops/_tolerance.py: Parity)
    scale = gr.float().abs().max()
    assert scale > 0
    assert_close(g.float() / scale, gr.float() / scale, name="grad pred / max|grad|", **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("N,C,H,W,p", SHAPES)
def test_mae_loss_parity(device, dtype, norm_pix, N, C, H, W, p):
    pred, imgs, mask = _inputs(N, C, H, W, p, dtype, device)
    _check(lambda x: umae.mae_loss(x, imgs, mask, p, norm_pix), lambda x: mae_loss_reference(x, imgs, mask, p, norm_pix),
           pred, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("N,C,H,W,p", SHAPES[:3])
def test_masked_mse_parity(device, dtype, norm_pix, N, C, H, W, p):
    pred, imgs, mask = _inputs(N, C, H, W, p, dtype, device)
    target = patchify_reference(imgs, p)
    _check(lambda x: umae.masked_mse_loss(x, target, mask, norm_pix),
           lambda x: masked_mse_loss_reference(x, target, mask, norm_pix), pred, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_autocast_style(device):
    # bf16 prediction (autocast) against fp32 images: target math stays fp32.
    pred, imgs, mask = _inputs(4, 3, 32, 32, 4, torch.bfloat16, device, target_dtype=torch.float32)
    _check(lambda x: umae.mae_loss(x, imgs, mask, 4), lambda x: mae_loss_reference(x, imgs, mask, 4),
           pred, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    N, L, K = 3, 12, 192
    pred = randn(N, K, L, device=device).transpose(1, 2).requires_grad_()
    imgs = randn(N, 24, 32, 3, device=device).permute(0, 3, 1, 2)  # channels-last
    mask = random_mask(N, 2 * L, device)[:, ::2]
    assert not (pred.is_contiguous() or imgs.is_contiguous() or mask.is_contiguous())
    target = patchify_reference(imgs, 8)
    _check(lambda x: umae.mae_loss(x, imgs, mask, 8), lambda x: mae_loss_reference(x, imgs, mask, 8),
           pred, torch.float32)
    tnc = torch.cat([target, target], -1)[:, :, ::2]
    _check(lambda x: umae.masked_mse_loss(x, tnc, mask), lambda x: masked_mse_loss_reference(x, tnc, mask),
           pred, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_pred_view_is_read_in_place(device, dtype):
    # the model's pred is the decoder output without its cls row, x[:, 1:, :]: rows strided, unit
    # last stride. The kernels read it where it is (no aten copy inside the op) and agree with the reference.
    N, C, H, W, p = 3, 3, 20, 12, 4
    _, imgs, mask = _inputs(N, C, H, W, p, dtype, device)
    full = randn(N, 1 + 15, p * p * C, dtype=dtype, device=device, requires_grad=True)
    pred = full[:, 1:, :]
    assert not pred.is_contiguous()
    with torch.profiler.profile() as prof:
        torch.ops.umae.patch_mse(pred.detach(), imgs, mask, p, True, NORM_PIX_EPS)
    copies = [e.name for e in prof.events() if e.name in ("aten::contiguous", "aten::clone", "aten::copy_")]
    assert not copies, copies
    _check(lambda x: umae.mae_loss(x[:, 1:, :], imgs, mask, p), lambda x: mae_loss_reference(x[:, 1:, :], imgs, mask, p),
           full, dtype)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_gradcheck_float64(norm_pix):
    pred = randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    imgs = randn(2, 2, 6, 4, dtype=torch.float64)
    mask = random_mask(2, 6).double()
    mask[0, 0] = 1
    assert torch.autograd.gradcheck(lambda x: umae.mae_loss(x, imgs, mask, 2, norm_pix), (pred,))
    t = patchify_reference(imgs, 2)
    assert torch.autograd.gradcheck(lambda x: umae.masked_mse_loss(x, t, mask, norm_pix), (pred,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    pred = randn(3, 6, 48, device=device, requires_grad=True)
    imgs = randn(3, 3, 12, 8, device=device)
    mask = random_mask(3, 6, device=device)
    torch.library.opcheck(torch.ops.umae.patch_mse.default, (pred, imgs, mask, 4, True, NORM_PIX_EPS))
    torch.library.opcheck(torch.ops.umae.patch_mse.default,
                          (pred, patchify_reference(imgs, 4), mask, 0, False, NORM_PIX_EPS))


def test_no_removed_patch_gives_zero_and_zero_grad():
    pred, imgs, _ = _inputs(2, 3, 8, 8, 4, torch.float32, "cpu")
    mask = torch.zeros(2, 4)
    for backend in ("fused", "reference"):
        with umae.use_backend(backend):
            loss = umae.mae_loss(pred, imgs, mask, 4)
            (g,) = torch.autograd.grad(loss, pred)
        assert loss.item() == 0.0 and not g.any()


def test_bool_mask_and_all_removed():
    pred, imgs, mask = _inputs(2, 3, 8, 8, 4, torch.float32, "cpu")
    a = umae.mae_loss(pred, imgs, mask.bool(), 4)
    b = mae_loss_reference(pred, imgs, mask, 4)
    assert_close(a, b, **LOSS_TOL[torch.float32])
    ones = torch.ones(2, 4)
    assert_close(umae.mae_loss(pred, imgs, ones, 4), mae_loss_reference(pred, imgs, ones, 4), **LOSS_TOL[torch.float32])


def test_nan_propagates_like_reference():
    pred, imgs, mask = _inputs(2, 3, 8, 8, 4, torch.float32, "cpu")
    mask[0, 0] = 1
    imgs = imgs.clone()
    imgs[0, 0, 0, 0] = float("nan")
    assert math.isnan(umae.mae_loss(pred, imgs, mask, 4).item())
    assert math.isnan(mae_loss_reference(pred, imgs, mask, 4).item())


def test_constant_patch_normalizes_to_zero():
    # var == 0: (t - mean) / sqrt(0 + 1e-6) == 0, finite, same as the reference. (0.5 keeps the
    # mean exact: otherwise its last-bit rounding is amplified 1000x by the 1e-6 eps.)
    pred, _, mask = _inputs(1, 3, 8, 8, 4, torch.float32, "cpu")
    imgs = torch.full((1, 3, 8, 8), 0.5)
    assert_close(umae.mae_loss(pred, imgs, mask, 4), mae_loss_reference(pred, imgs, mask, 4), **LOSS_TOL[torch.float32])


def test_target_requiring_grad_is_refused():
    pred, imgs, mask = _inputs(2, 3, 8, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="imgs requires grad"):
        umae.mae_loss(pred, imgs.requires_grad_(), mask, 4)


P = lambda *s: randn(*s)  # noqa: E731


@pytest.mark.parametrize("call, match", [
    (lambda: umae.masked_mse_loss(P(2, 4, 48), P(2, 4, 47), P(2, 4)), r"target must have shape \(2, 4, 48\)"),
    (lambda: umae.masked_mse_loss(P(2, 4, 48), P(2, 4, 48), P(2, 5)), r"mask must have shape \(2, 4\)"),
    (lambda: umae.masked_mse_loss(P(2, 4, 48), P(2, 4, 48), torch.ones(2, 4, dtype=torch.int64)), "mask must be a floating or bool"),
    (lambda: umae.masked_mse_loss(P(2, 4, 48), P(2, 4, 48), P(2, 4, 1)), "mask must have 2 dims"),
    (lambda: umae.masked_mse_loss(P(4, 48), P(4, 48), P(4)), "pred must have 3 dims"),
    (lambda: umae.masked_mse_loss(P(0, 4, 48), P(0, 4, 48), P(0, 4)), "empty batch"),
    (lambda: umae.masked_mse_loss(P(2, 4, 1), P(2, 4, 1), P(2, 4)), "norm_pix needs at least 2"),
    (lambda: umae.masked_mse_loss(P(2, 4, 48), P(2, 4, 48).to("meta"), P(2, 4)), "target is on meta"),
    (lambda: umae.mae_loss(P(2, 4, 48), P(2, 3, 8, 8), P(2, 4), 5), "divisible by patch_size 5"),
    (lambda: umae.mae_loss(P(2, 4, 47), P(2, 3, 8, 8), P(2, 4), 4), r"pred must have shape \(N, L, p\*p\*C\)"),
    (lambda: umae.mae_loss(P(2, 4, 48), P(2, 3, 8, 8).double(), P(2, 4), 4), "float64 goes with float64"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.slow
def test_compile_fullgraph_no_graph_break():
    p = 4

    def step(pred, imgs, mask):
        return umae.mae_loss(pred, imgs, mask, p) + umae.unpatchify(umae.patchify(imgs, p), p, 16).mean()

    pred, imgs, mask = _inputs(2, 3, 16, 16, p, torch.float32, "cpu")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(pred, imgs, mask)
    assert_close(out, step(pred, imgs, mask), **LOSS_TOL[torch.float32])
    torch.autograd.grad(out, pred)


@cuda_only
def test_cuda_fp16_large_values_norm_pix():
    # fp16 images with large values: the statistics are fp32, no overflow.
    pred, imgs, mask = _inputs(4, 3, 32, 32, 8, torch.float16, "cuda")
    imgs = (imgs * 3000).half()
    _check(lambda x: umae.mae_loss(x, imgs, mask, 8), lambda x: mae_loss_reference(x, imgs, mask, 8), pred, torch.float16)


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("masked_mse_loss"))
@runs_impl
def test_masked_mse_loss_grid(device, impl, dtype, variant):
    # shapes, flags, layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("masked_mse_loss", device, impl, dtype, variant)


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("mae_loss"))
@runs_impl
def test_mae_loss_grid(device, impl, dtype, variant):
    # shapes, flags, layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("mae_loss", device, impl, dtype, variant)


# ---- edges: second order, argument types, gradient layouts, forward-mode AD ----

@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
@pytest.mark.parametrize("device,impl", fused_impls("mae_loss"))
@pytest.mark.parametrize("op", ["mae_loss", "masked_mse_loss"])
@runs_impl
def test_loss_double_backward_is_refused(device, impl, op):
    # was: 0 where the reference gives a second derivative, and a penalty "not used in the graph"
    imgs = randn(2, 3, 8, 8, device=device)
    pred = randn(2, 4, 48, device=device, requires_grad=True)
    mask = random_mask(2, 4, device, ratio=0.5)
    mask[:, 0] = 1
    target = umae.patchify(imgs, 4)
    if op == "mae_loss":
        fn = lambda p: umae.mae_loss(p, imgs, mask, 4)  # noqa: E731
    else:
        fn = lambda p: umae.masked_mse_loss(p, target, mask)  # noqa: E731
    assert_runs(op, impl, pred, imgs)
    with umae.use_backend("reference"):
        (ref,) = torch.autograd.grad(fn(pred), pred)
        # the reference's own second derivative exists (is what the fused path would drop)
        (g,) = torch.autograd.grad(fn(pred), pred, create_graph=True)
        assert torch.autograd.grad(g.pow(2).sum(), pred)[0].abs().max() > 0
    assert_second_order_refused(fn, pred, ref)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.complex64, torch.bool])
def test_masked_mse_refuses_non_floating_target(backend, dtype):
    pred, mask = randn(2, 4, 12), random_mask(2, 4)
    target = torch.ones(2, 4, 12, dtype=dtype)
    with pytest.raises(TypeError, match=rf"target must be float32, float16, bfloat16 or float64, got {dtype}"):
        umae.masked_mse_loss(pred, target, mask, backend=backend)
    with pytest.raises(TypeError, match=rf"imgs must be float32, float16, bfloat16 or float64, got {dtype}"):
        umae.mae_loss(pred, torch.ones(2, 3, 4, 4, dtype=dtype), mask, 2, backend=backend)


@pytest.mark.parametrize("op", ["mae_loss", "masked_mse_loss"])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64])
def test_loss_gradient_of_a_float_mask(op, mask_dtype):
    # the masked mean is in the kernel: a float mask that requires grad gets the reference's gradient
    # from the saved per-patch errors, (rows - loss) / sum(mask); a soft mask too
    dtype = torch.float64 if mask_dtype == torch.float64 else torch.float32
    imgs = randn(2, 3, 8, 8, dtype=dtype)
    pred = randn(2, 4, 48, dtype=dtype, requires_grad=True)
    mask = torch.rand(2, 4, dtype=mask_dtype).requires_grad_()
    target = umae.patchify(imgs, 4)
    fn = (lambda p, m: umae.mae_loss(p, imgs, m, 4)) if op == "mae_loss" else \
        (lambda p, m: umae.masked_mse_loss(p, target, m))
    assert ops.implementation(op, pred, imgs) == "cpp-cpu"
    got = torch.autograd.grad(fn(pred, mask), (pred, mask))
    with umae.use_backend("reference"):
        ref = torch.autograd.grad(fn(pred, mask), (pred, mask))
    for g, r, name in zip(got, ref, ("pred", "mask")):
        assert g.dtype == r.dtype, name
        assert_close(g, r, name=f"grad {name}", **TOL[dtype])
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fn, (pred.detach().requires_grad_(), mask.detach().requires_grad_()))
    # a mask with nothing removed: loss 0, the reference's gradient (the rows, divided by 1)
    zero = torch.zeros(2, 4, dtype=mask_dtype, requires_grad=True)
    got = torch.autograd.grad(fn(pred, zero), zero)[0]
    with umae.use_backend("reference"):
        ref = torch.autograd.grad(fn(pred, zero), zero)[0]
    assert_close(got, ref, name="grad of an all-zero mask", **TOL[dtype])


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_numpy_scalars_are_accepted(backend):
    imgs, pred, mask = randn(2, 3, 8, 12), randn(2, 6, 48), random_mask(2, 6)
    assert torch.equal(umae.mae_loss(pred, imgs, mask, np.int64(4), backend=backend),
                       umae.mae_loss(pred, imgs, mask, 4, backend=backend))


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=["tiny", "larger"])
@pytest.mark.parametrize("op", ["masked_mse_loss", "mae_loss"])
@pytest.mark.parametrize("layout", ["sum", "strided"])
def test_backward_reads_any_gradient_layout(op, shape, layout):
    assert_backward_reads_any_gradient_layout(op, shape, layout)


@pytest.mark.parametrize("op", ["masked_mse_loss", "mae_loss"])
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused_not_zero(op, api):
    assert_forward_mode_ad_refused(op, api)
