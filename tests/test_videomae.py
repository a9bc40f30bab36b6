"""VideoMAE's ops: tubelet_patchify / tubelet_unpatchify, videomae_loss, visible_tokens and the
tube-mask generator. Fused (C++ and interpreted Triton) against the references, and the references
against transformers' VideoMAEForPreTraining on the installed version (same weights, same mask), both
memory layouts, awkward sizes, gradcheck, opcheck, compile, and the errors that name the argument."""
import io

import pytest
import torch
from umae_testing import (LAYOUT_SHAPES, LOSS_TOL, TOL, assert_backward_reads_any_gradient_layout, assert_close,
                          assert_grads_close,
                          assert_forward_mode_ad_refused, assert_grid_row, assert_runs, cpu_impls, grid_params,
                          needs_ext, randn, runs_impl, videomae, videomae_inputs)

import umae
from umae.ops.tubelet_patchify_op import tubelet_patchify_reference
from umae.ops.videomae_loss_op import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, videomae_loss_reference
from umae.ops.visible_tokens_op import visible_tokens_reference

transformers = pytest.importorskip("transformers")


def _hf(norm_pix: bool, image=8, frames=4, p=4, ts=2):
    return videomae(norm_pix, image=image, frames=frames, p=p, ts=ts)


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("frames,ts", [(4, 2), (6, 3), (3, 1)])
def test_loss_matches_hf_videomae_in_both_layouts(norm_pix, frames, ts):
    model = _hf(norm_pix, frames=frames, ts=ts)
    B, t, h = 3, frames // ts, 2
    pixel_values = randn(B, frames, 3, 8, 8)  # HF's (B, T, C, H, W), normalized as ImageNet's
    mask = umae.tube_mask(B, t, h, h, 0.75, generator=torch.Generator().manual_seed(1))
    out = model(pixel_values, bool_masked_pos=mask)
    view = pixel_values.transpose(1, 2)  # (B, C, T, H, W), read by its strides
    got = videomae_loss_reference(out.logits, view, mask, 4, ts, norm_pix=norm_pix)
    assert_close(got, out.loss, name="loss, HF's layout as a view", **LOSS_TOL[torch.float32])
    again = videomae_loss_reference(out.logits, view.contiguous(), mask, 4, ts, norm_pix=norm_pix)
    assert torch.equal(again, got)  # the same values in the same order: the layout changes nothing
    assert got.dtype == torch.float32 and out.loss > 0
    if umae.ops._common.EXT_LOADED:  # the public op, fused, in both layouts, and its gradient: HF's own
        for v in (view, view.contiguous()):
            fused = umae.videomae_loss(out.logits, v, mask, 4, ts, norm_pix=norm_pix)
            assert_close(fused, out.loss, name="fused loss", **LOSS_TOL[torch.float32])
        params = [q for q in model.parameters() if q.requires_grad]
        want = torch.autograd.grad(out.loss, params, retain_graph=True)
        fused = umae.videomae_loss(out.logits, view, mask, 4, ts, norm_pix=norm_pix)
        got_g = torch.autograd.grad(fused, params)
        for a, b in zip(got_g, want):
            assert_close(a, b, name="HF weights' gradient through the fused loss", atol=TOL[torch.float32]["atol"] *
                         float(b.abs().max()) + 1e-12, rtol=TOL[torch.float32]["rtol"])


@pytest.mark.parametrize("shape,p,ts", [((2, 3, 6, 12, 8), 4, 3), ((1, 2, 2, 8, 16), 8, 1), ((2, 1, 4, 4, 12), 2, 2)])
def test_tubelet_patchify_is_exactly_inverted_and_orders_tokens_t_h_w(shape, p, ts):
    v = randn(*shape)
    x = tubelet_patchify_reference(v, p, ts)
    B, C, T, H, W = shape
    assert x.shape == (B, (T // ts) * (H // p) * (W // p), ts * p * p * C)
    assert torch.equal(umae.tubelet_unpatchify(x, p, ts, T, H, W, backend="reference"), v)
    # token (t, h, w) = (0, 0, 1), value (p0, p1, p2, c) = (ts - 1, 1, 0, C - 1): frame ts - 1, row 1, column p
    k = (((ts - 1) * p + 1) * p + 0) * C + C - 1
    assert x[0, 1, k] == v[0, C - 1, ts - 1, 1, p]


@pytest.mark.parametrize("impl", [None] + cpu_impls("videomae_loss"))
@runs_impl
def test_a_constant_token_stays_finite_with_norm_pix(impl):
    # variance 0: the 1e-6 added to the std keeps it finite (as VideoMAE's), the labels 0
    videos = torch.full((1, 3, 2, 4, 4), 0.3)
    mask = torch.tensor([[True]])
    pred = randn(1, 1, 2 * 4 * 4 * 3, requires_grad=True)
    loss = umae.videomae_loss(pred, videos, mask, 4, 2, backend="fused" if impl else "reference")
    if impl:
        assert_runs("videomae_loss", impl, pred)
    assert torch.isfinite(loss) and torch.allclose(loss, pred.pow(2).mean())
    loss.backward()
    assert torch.allclose(pred.grad, 2 * pred.detach() / pred.numel())


def test_tube_mask_repeats_one_spatial_draw_per_clip():
    g = torch.Generator().manual_seed(3)
    m = umae.tube_mask(5, 4, 3, 5, 0.9, generator=g)
    assert m.dtype == torch.bool and m.shape == (5, 4 * 15)
    spatial = m.view(5, 4, 15)
    assert (spatial == spatial[:, :1]).all()  # the same positions at every tubelet
    assert (spatial[:, 0].sum(1) == int(0.9 * 15)).all()
    assert len({tuple(r.tolist()) for r in spatial[:, 0]}) > 1  # clips draw apart
    assert torch.equal(umae.tube_mask(5, 4, 3, 5, 0.9, generator=torch.Generator().manual_seed(3)), m)
    assert not umae.tube_mask(2, 1, 2, 2, 0.0).any()


@pytest.mark.parametrize("impl", cpu_impls("random_masking"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@runs_impl
def test_visible_tokens_are_x_of_not_mask_with_their_gradients(impl, dtype):
    B, t, h, w, D = 3, 2, 3, 5, 24
    mask = umae.tube_mask(B, t, h, w, 0.75, generator=torch.Generator().manual_seed(2))
    x0 = randn(B, t * h * w, 2 * D).to(dtype)[..., ::2]  # read by its strides
    pos0 = randn(1, t * h * w, D).to(dtype)
    x, pos = x0.clone().requires_grad_(), pos0.clone().requires_grad_()
    got = umae.visible_tokens(x, mask, pos, num_masked=t * int(0.75 * h * w))
    assert_runs("random_masking", impl, x)
    xr, posr = x0.clone().requires_grad_(), pos0.clone().requires_grad_()
    ref = visible_tokens_reference(xr, mask, posr)
    assert got.shape == (B, t * (h * w - int(0.75 * h * w)), D) and torch.equal(got, ref)
    g = randn(*got.shape).to(dtype)
    got.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, xr.grad)  # each visible row's gradient, zero elsewhere
    assert_close(pos.grad, posr.grad, name="pos_embed grad", **TOL[dtype])  # a sum over the batch
    assert torch.equal(umae.visible_tokens(x0, mask), visible_tokens_reference(x0, mask))  # count read, no pos


@pytest.mark.parametrize("call,match", [
    (lambda b: umae.tubelet_patchify(randn(1, 3, 5, 8, 8), 4, 2, backend=b),
     "frames \\(5\\) must be divisible by tubelet_size"),
    (lambda b: umae.tubelet_patchify(randn(1, 3, 4, 8, 6), 4, 2, backend=b), "height and width \\(8, 6\\)"),
    (lambda b: umae.tubelet_patchify(randn(1, 3, 8, 8), 4, 2, backend=b), "videos must have 5 dims"),
    (lambda b: umae.tubelet_patchify(randn(1, 3, 4, 8, 8), 4, 0, backend=b), "tubelet_size must be a positive int"),
    (lambda b: umae.tubelet_patchify(randn(1, 3, 4, 8, 8).long(), 4, 2, backend=b), "videos must be float32"),
    (lambda b: umae.tubelet_unpatchify(randn(1, 5, 96), 4, 2, 4, 8, 8, backend=b), "x must have shape"),
    (lambda b: umae.tubelet_unpatchify(randn(1, 4, 96), 4, 2, 5, 8, 8, backend=b), "frames 5 must be divisible"),
    (lambda b: umae.videomae_loss(randn(2, 1, 96), randn(2, 3, 2, 4, 8), torch.tensor([[True, False], [True, True]]),
                                  4, 2, backend=b), "row 1 masks 2 tokens|1 tokens in every row"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96), randn(1, 3, 2, 4, 8), torch.ones(1, 3, dtype=torch.bool), 4, 2,
                                  backend=b), "mask must have shape"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96), randn(1, 3, 2, 4, 8), torch.ones(1, 2), 4, 2, backend=b),
     "mask must be bool"),
    (lambda b: umae.videomae_loss(randn(1, 1, 95), randn(1, 3, 2, 4, 8), torch.tensor([[True, False]]), 4, 2,
                                  backend=b), "pred must have shape"),
    (lambda b: umae.videomae_loss(randn(1, 2, 96), randn(1, 3, 2, 4, 8), torch.tensor([[True, False]]), 4, 2,
                                  backend=b), "row 0 masks 1 tokens|2 tokens in every row"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96), randn(1, 3, 2, 4, 8, requires_grad=True),
                                  torch.tensor([[True, False]]), 4, 2, backend=b), "videos is the target"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96), randn(1, 3, 3, 4, 8), torch.tensor([[True, False]]), 4, 2,
                                  backend=b), "frames \\(3\\) must be divisible by tubelet_size 2"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96), randn(1, 3, 2, 4, 6), torch.tensor([[True, False]]), 4, 2,
                                  backend=b), "height and width \\(4, 6\\)"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96), randn(1, 3, 2, 4, 8), torch.tensor([[True, False]]), 4, 2,
                                  mean=(0.5,), std=(0.2,), backend=b), "one value per channel \\(3\\)"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96), randn(1, 3, 2, 4, 8), torch.tensor([[True, False]]), 4, 2,
                                  mean=None, backend=b), "mean and std go together"),
    (lambda b: umae.videomae_loss(randn(1, 1, 96).double(), randn(1, 3, 2, 4, 8), torch.tensor([[True, False]]), 4,
                                  2, backend=b), "float64 goes with float64"),
])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_bad_video_input_is_named(call, match, backend):
    with pytest.raises((ValueError, TypeError), match=match):
        call(backend)


@pytest.mark.parametrize("call,match", [
    (lambda: umae.tube_mask(2, 2, 2, 2, 1.0), "ratio must be"),
    (lambda: umae.visible_tokens(randn(2, 2, 4), torch.tensor([[True, False], [True, True]])),
     "same number of tokens in every row, got \\[1, 2\\]"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 2)), "mask must be bool"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 3, dtype=torch.bool)), "mask must have shape"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), num_masked=3), "num_masked must"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), randn(1, 3, 4)),
     "pos_embed must have shape"),
    (lambda: umae.tube_mask(2, 0, 2, 2, 0.5), "tubelets, height and width"),
    (lambda: umae.tube_mask(-1, 1, 2, 2, 0.5), "batch must be"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---- the fused video ops against their references -------------------------------------------------

@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("tubelet_patchify"))
@runs_impl
def test_tubelet_patchify_grid(device, impl, dtype, variant):
    # shapes (odd T / ts, H != W, ts 1-3, C != 3), layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("tubelet_patchify", device, impl, dtype, variant)


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("tubelet_unpatchify"))
@runs_impl
def test_tubelet_unpatchify_grid(device, impl, dtype, variant):
    assert_grid_row("tubelet_unpatchify", device, impl, dtype, variant)


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("videomae_loss"))
@runs_impl
def test_videomae_loss_grid(device, impl, dtype, variant):
    # norm_pix and the unnormalize on and off, the layouts, autocast
    assert_grid_row("videomae_loss", device, impl, dtype, variant)


@pytest.mark.parametrize("impl", cpu_impls("tubelet_patchify"))
@pytest.mark.parametrize("p,ts", [(4, 1), (8, 2), (16, 3)])
@runs_impl
def test_tubelet_patchify_takes_hf_layout_as_a_view_bitwise(impl, p, ts):
    B, T, C, H, W = 2, 2 * ts, 3, 2 * p, 3 * p
    hf = randn(B, T, C, H, W).to(torch.bfloat16)  # (B, T, C, H, W)
    v = hf.transpose(1, 2)
    x = umae.tubelet_patchify(v, p, ts)
    assert_runs("tubelet_patchify", impl, v)
    assert torch.equal(x, tubelet_patchify_reference(v, p, ts)) and x.is_contiguous()
    back = umae.tubelet_unpatchify(x, p, ts, T, H, W)
    assert torch.equal(back, v) and back.is_contiguous()


@pytest.mark.parametrize("impl", cpu_impls("videomae_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p,ts,norm_pix", [(4, 3, True), (8, 1, False), (16, 2, True)])
@runs_impl
def test_videomae_loss_matches_the_reference_on_hf_layout(impl, dtype, p, ts, norm_pix):
    # pred in the model's dtype (autocast), videos fp32 as a view of HF's (B, T, C, H, W); awkward grids
    B, t, h, w = 3, 3, 2, 3
    videos = randn(B, t * ts, 3, h * p, w * p).transpose(1, 2)
    mask = umae.tube_mask(B, t, h, w, 0.6, generator=torch.Generator().manual_seed(5))
    n = t * int(0.6 * h * w)
    pred = randn(B, n, ts * p * p * 3).to(dtype).requires_grad_()
    got = umae.videomae_loss(pred, videos, mask, p, ts, norm_pix)
    assert_runs("videomae_loss", impl, pred, videos)
    want = videomae_loss_reference(pred, videos, mask, p, ts, norm_pix)
    assert got.dtype == torch.float32
    assert_close(got, want, name="loss", **LOSS_TOL[dtype])
    g, = torch.autograd.grad(got, pred)
    gr, = torch.autograd.grad(want, pred)
    assert g.dtype == dtype and g.shape == pred.shape
    tol = TOL[dtype]
    assert_close(g, gr, name="pred grad", atol=tol["atol"] * float(gr.abs().max()), rtol=tol["rtol"])


@needs_ext
def test_videomae_loss_rows_of_another_count_are_refused_by_the_kernel():
    # the public op leaves the rows to the kernel when fused: the C++ kernel names the row
    mask = torch.tensor([[True, False, False, True], [True, True, False, False], [True, True, True, False]])
    with pytest.raises(ValueError, match="mask row 2 masks 3 tokens, but pred has 2 rows"):
        torch.ops.umae.videomae_loss(randn(3, 2, 96), randn(3, 3, 2, 8, 8), mask, None, 4, 2, True, 1e-6)


@needs_ext
def test_gradcheck_float64():
    v = randn(2, 2, 6, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: umae.tubelet_patchify(t, 2, 3), (v,))
    x = randn(2, 2 * 2 * 4, 3 * 4 * 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: umae.tubelet_unpatchify(t, 2, 3, 6, 4, 8), (x,))
    videos = randn(2, 2, 4, 4, 8, dtype=torch.float64)
    mask = umae.tube_mask(2, 2, 2, 4, 0.5, generator=torch.Generator().manual_seed(0))
    pred = randn(2, 8, 2 * 4 * 2, dtype=torch.float64, requires_grad=True)
    for norm_pix in (True, False):
        assert torch.autograd.gradcheck(
            lambda t: umae.videomae_loss(t, videos, mask, 2, 2, norm_pix, mean=(0.4, 0.5), std=(0.2, 0.3)), (pred,))


@needs_ext
def test_opcheck():
    torch.library.opcheck(torch.ops.umae.tubelet_patchify.default, (randn(2, 3, 6, 8, 12, requires_grad=True), 4, 3))
    torch.library.opcheck(torch.ops.umae.tubelet_unpatchify.default,
                          (randn(2, 12, 96, requires_grad=True), 4, 2, 2, 2, 3, 3))
    mask = umae.tube_mask(2, 2, 2, 3, 0.5, generator=torch.Generator().manual_seed(0))
    for stats in (torch.tensor([IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD]), None):
        torch.library.opcheck(torch.ops.umae.videomae_loss.default,
                              (randn(2, 6, 96, requires_grad=True), randn(2, 3, 4, 8, 12), mask, stats, 4, 2, True,
                               1e-6))


@needs_ext
def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    mask = umae.tube_mask(2, 2, 2, 3, 0.5, generator=torch.Generator().manual_seed(0))
    videos = randn(2, 4, 3, 8, 12).transpose(1, 2)

    def step(pred, x):
        tokens = umae.tubelet_patchify(x, 4, 2)
        return umae.videomae_loss(pred, videos, mask, 4, 2) + tokens.square().mean()

    pred, x = randn(2, 6, 96, requires_grad=True), randn(2, 3, 4, 8, 12, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(pred, x)
    want = step(pred, x)
    assert_close(got, want, name="compiled loss", **LOSS_TOL[torch.float32])
    g = torch.autograd.grad(got, (pred, x))
    gw = torch.autograd.grad(want, (pred, x))
    for a, b in zip(g, gw):
        assert torch.equal(a, b)


@needs_ext
def test_double_backward_is_refused():
    mask = torch.tensor([[True, False]])
    pred = randn(1, 1, 96, requires_grad=True)
    g, = torch.autograd.grad(umae.videomae_loss(pred, randn(1, 3, 2, 4, 8), mask, 4, 2), pred, create_graph=True)
    with pytest.raises(RuntimeError, match="umae::videomae_loss: double backward"):
        g.sum().backward()


@pytest.mark.parametrize("shape", LAYOUT_SHAPES[:1], ids=["tiny"])
@pytest.mark.parametrize("op", ["tubelet_patchify", "tubelet_unpatchify", "videomae_loss"])
@pytest.mark.parametrize("layout", ["sum", "strided"])
@needs_ext
def test_backward_reads_any_gradient_layout(op, shape, layout):
    assert_backward_reads_any_gradient_layout(op, dict(shape, clips=2, frames=4, ts=2, ratio=0.75), layout)


@pytest.mark.parametrize("op", ["tubelet_patchify", "tubelet_unpatchify", "videomae_loss"])
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
@needs_ext
def test_forward_mode_ad_is_refused_not_zero(op, api):
    assert_forward_mode_ad_refused(op, api)


@pytest.mark.parametrize("impl", cpu_impls("random_masking"))
@pytest.mark.parametrize("dtype,tok_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16)])
@runs_impl
def test_decoder_tokens_are_hf_videomae_decoder_input(impl, dtype, tok_dtype):
    # cat([x_vis + pos[~mask], mask_token + pos[mask]]): bitwise forward (each value one add in the
    # promoted dtype on both paths), x_vis's gradient bitwise, the summed ones (mask_token, pos) at TOL
    from umae.ops.decoder_tokens_op import decoder_tokens_reference

    B, t, h, w, D = 3, 3, 2, 5, 40
    mask = umae.tube_mask(B, t, h, w, 0.7, generator=torch.Generator().manual_seed(4))
    n_vis = t * (h * w - int(0.7 * h * w))
    x0 = randn(B, n_vis, 2 * D).to(dtype)[..., ::2]  # strided, as a Linear's output sliced
    tok0, pos0 = randn(1, 1, D).to(tok_dtype), randn(1, t * h * w, D)
    leaves = [x0.clone().requires_grad_(), tok0.clone().requires_grad_(), pos0.clone().requires_grad_()]
    refs = [v.detach().clone().requires_grad_() for v in leaves]
    got = umae.decoder_tokens(*leaves[:1], mask, *leaves[1:])
    assert_runs("random_masking", impl, got)
    want = decoder_tokens_reference(refs[0], mask, *refs[1:])
    assert got.dtype == want.dtype and torch.equal(got, want)
    g = randn(*got.shape).to(got.dtype)
    ga, gb = torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, refs, g)
    assert torch.equal(ga[0], gb[0])
    for a, b, name in zip(ga[1:], gb[1:], ("mask_token", "pos_embed")):
        assert_close(a, b, name=f"{name} grad", atol=TOL[a.dtype]["atol"] * float(b.abs().max()), rtol=TOL[a.dtype]["rtol"])


def test_decoder_tokens_match_hf_and_refuse_bad_input():
    model = _hf(True)
    B = 2
    mask = umae.tube_mask(B, 2, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    x_vis = randn(B, 4, 32)
    pos = model.position_embeddings.to(torch.float32)
    hf = torch.cat([x_vis + pos.expand(B, -1, -1)[~mask].reshape(B, -1, 32),
                    model.mask_token + pos.expand(B, -1, -1)[mask].reshape(B, -1, 32)], 1)
    assert torch.equal(umae.decoder_tokens(x_vis, mask, model.mask_token, pos), hf)
    with pytest.raises(ValueError, match=r"num_masked=5 tokens in every row, got \[4, 4\]"):
        umae.decoder_tokens(x_vis[:, :3], mask, model.mask_token, pos)
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        umae.decoder_tokens(x_vis, mask, model.mask_token, pos[:, :7])
    with pytest.raises(TypeError, match="mask_token is required"):
        umae.decoder_tokens(x_vis, mask, None, pos)



# ---- umae.patch on transformers' VideoMAEForPreTraining ---------------------------------------------

def _grads(model, loss):
    return {n: g for (n, q), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()),
                                                                                     allow_unused=True))
            if g is not None}


@needs_ext
@pytest.mark.parametrize("cfg", [dict(norm_pix=True, frames=4, ts=2, image=8, p=4),
                                 dict(norm_pix=False, frames=6, ts=3, image=12, p=4),
                                 dict(norm_pix=True, frames=2, ts=1, image=16, p=8, channels=2)], ids=str)
def test_hf_videomae_patched_matches_unpatched(cfg):
    model = videomae(**cfg)
    x, mask = videomae_inputs(model, B=3)
    want = model(x, bool_masked_pos=mask)
    want_g = _grads(model, want.loss)
    truth = videomae(**cfg).double()  # the float64 model: what both fp32 gradients are compared against
    truth_g = _grads(truth, truth(x.double(), bool_masked_pos=mask).loss)
    umae.patch(model)
    got = model(x, bool_masked_pos=mask)
    assert torch.equal(got.logits, want.logits)  # the encoder's and decoder's inputs are bitwise HF's
    assert_close(got.loss, want.loss, name="loss", **LOSS_TOL[torch.float32])
    got_g = _grads(model, got.loss)
    assert got_g.keys() == want_g.keys()
    # (the attention's key bias has no gradient but rounding noise: judged against the truth's error)
    assert_grads_close(got_g, want_g, truth_g, torch.float32)
    assert got.loss_unif is None and torch.equal(got.loss_mae, got.loss)
    umae.unpatch(model)  # the model's own code back, bitwise
    again = model(x, bool_masked_pos=mask)
    assert torch.equal(again.loss, want.loss) and "forward" not in model.__dict__
    assert "_umae_pos" not in model.videomae.embeddings.__dict__ and "_umae_pos" not in model.__dict__


@needs_ext
def test_hf_videomae_uniformity_term_pickle_and_compile():
    from umae.ops.uniformity_op import uniformity_loss_reference

    model = umae.patch(videomae(), lamb=0.1)
    x, mask = videomae_inputs(model, B=4)
    out = model(x, bool_masked_pos=mask)
    latent = model.videomae(x, bool_masked_pos=mask).last_hidden_state
    assert_close(out.loss_unif, uniformity_loss_reference(latent.mean(1)), name="loss_unif", **LOSS_TOL[torch.float32])
    assert_close(out.loss, out.loss_mae + 0.1 * out.loss_unif, name="loss", **LOSS_TOL[torch.float32])
    assert isinstance(model(x, bool_masked_pos=mask, return_dict=False), tuple)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert umae.patching.is_patched(loaded) and torch.equal(loaded(x, bool_masked_pos=mask).loss, out.loss)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    assert_close(compiled(x, bool_masked_pos=mask).loss, out.loss, name="compiled loss", **LOSS_TOL[torch.float32])
    with pytest.raises(ValueError, match="lamb > 0 needs a model that returns a loss"):
        umae.patch(model.videomae, lamb=0.1)


@needs_ext
def test_cached_constants_survive_inference_mode_and_tracing():
    # the unnormalize constants and the patched model's position tables are made once per device; a
    # first call under inference mode, or one traced on fake tensors, must not leave what later training
    # calls cannot use
    from torch._subclasses.fake_tensor import FakeTensorMode

    from umae.ops import videomae_loss_op

    videomae_loss_op._STATS.clear()
    videos, mask = randn(2, 3, 2, 8, 8), umae.tube_mask(2, 1, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    pred = randn(2, 2, 96, requires_grad=True)
    with FakeTensorMode() as mode:
        fake = umae.videomae_loss(mode.from_tensor(pred), mode.from_tensor(videos), mode.from_tensor(mask), 4, 2)
        assert fake.shape == ()
    with torch.inference_mode():
        umae.videomae_loss(pred.detach(), videos, mask, 4, 2)
    loss = umae.videomae_loss(pred, videos, mask, 4, 2)
    assert type(loss) is torch.Tensor
    loss.backward()  # the constants it saved are not inference tensors
    assert_close(loss, videomae_loss_reference(pred, videos, mask, 4, 2), name="loss", **LOSS_TOL[torch.float32])
    model = umae.patch(videomae())
    x, m = videomae_inputs(model, B=2)
    with torch.inference_mode():
        model(x, bool_masked_pos=m)
    model(x, bool_masked_pos=m).loss.backward()
    assert model.videomae.embeddings.patch_embeddings.projection.weight.grad is not None
