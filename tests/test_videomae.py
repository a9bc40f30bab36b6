"""VideoMAE's glue, the references (umae/ops/videomae_loss_op.py) and the tube-mask generator
(umae/ops/tube_mask_op.py): against transformers' VideoMAEForPreTraining on the installed version
(same weights, same mask), both memory layouts, awkward sizes, and the errors that name the argument.
The fused video ops join these tests as they land."""
import pytest
import torch
from umae_testing import LOSS_TOL, TOL, assert_close, assert_runs, cpu_impls, randn, runs_impl

import umae
from umae.ops.videomae_loss_op import (tubelet_patchify_reference, tubelet_unpatchify_reference,
                                       videomae_loss_reference)
from umae.ops.visible_tokens_op import visible_tokens_reference

transformers = pytest.importorskip("transformers")


def _hf(norm_pix: bool, image=8, frames=4, p=4, ts=2):
    torch.manual_seed(0)
    cfg = transformers.VideoMAEConfig(image_size=image, patch_size=p, num_frames=frames, tubelet_size=ts,
                                      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                      decoder_num_attention_heads=2, decoder_intermediate_size=64,
                                      norm_pix_loss=norm_pix)
    return transformers.VideoMAEForPreTraining(cfg).eval()


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


@pytest.mark.parametrize("shape,p,ts", [((2, 3, 6, 12, 8), 4, 3), ((1, 2, 2, 8, 16), 8, 1), ((2, 1, 4, 4, 12), 2, 2)])
def test_tubelet_patchify_is_exactly_inverted_and_orders_tokens_t_h_w(shape, p, ts):
    v = randn(*shape)
    x = tubelet_patchify_reference(v, p, ts)
    B, C, T, H, W = shape
    assert x.shape == (B, (T // ts) * (H // p) * (W // p), ts * p * p * C)
    assert torch.equal(tubelet_unpatchify_reference(x, p, ts, T, H, W), v)
    # token (t, h, w) = (0, 0, 1), value (p0, p1, p2, c) = (ts - 1, 1, 0, C - 1): frame ts - 1, row 1, column p
    k = (((ts - 1) * p + 1) * p + 0) * C + C - 1
    assert x[0, 1, k] == v[0, C - 1, ts - 1, 1, p]


def test_a_constant_token_stays_finite_with_norm_pix():
    # variance 0: the 1e-6 added to the std keeps it finite (as VideoMAE's), the labels 0
    videos = torch.full((1, 3, 2, 4, 4), 0.3)
    mask = torch.tensor([[True]])
    pred = randn(1, 1, 2 * 4 * 4 * 3)
    loss = videomae_loss_reference(pred, videos, mask, 4, 2)
    assert torch.isfinite(loss) and torch.allclose(loss, pred.pow(2).mean())


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
    (lambda: umae.tube_mask(2, 2, 2, 2, 1.0), "ratio must be"),
    (lambda: umae.visible_tokens(randn(2, 2, 4), torch.tensor([[True, False], [True, True]])),
     "num_masked=1 tokens in every row"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 2)), "mask must be bool"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 3, dtype=torch.bool)), "mask must have shape"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), num_masked=3), "num_masked must"),
    (lambda: umae.visible_tokens(randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), randn(1, 3, 4)),
     "pos_embed must have shape"),
    (lambda: umae.tube_mask(2, 0, 2, 2, 0.5), "tubelets, height and width"),
    (lambda: umae.tube_mask(-1, 1, 2, 2, 0.5), "batch must be"),
    (lambda: tubelet_patchify_reference(randn(1, 3, 5, 8, 8), 4, 2), "frames \\(5\\) must be divisible by tubelet_size"),
    (lambda: tubelet_patchify_reference(randn(1, 3, 4, 8, 6), 4, 2), "height and width \\(8, 6\\)"),
    (lambda: tubelet_patchify_reference(randn(1, 3, 8, 8), 4, 2), "videos must have 5 dims"),
    (lambda: tubelet_unpatchify_reference(randn(1, 5, 96), 4, 2, 4, 8, 8), "x must have shape"),
    (lambda: videomae_loss_reference(randn(2, 1, 96), randn(2, 3, 2, 4, 8), torch.tensor([[True, False], [True, True]]),
                                     4, 2), "same number of tokens in every row"),
    (lambda: videomae_loss_reference(randn(1, 1, 96), randn(1, 3, 2, 4, 8), torch.ones(1, 3, dtype=torch.bool), 4, 2),
     "mask must have shape"),
    (lambda: videomae_loss_reference(randn(1, 1, 96), randn(1, 3, 2, 4, 8), torch.ones(1, 2), 4, 2), "mask must be bool"),
    (lambda: videomae_loss_reference(randn(1, 1, 95), randn(1, 3, 2, 4, 8), torch.tensor([[True, False]]), 4, 2),
     "pred must have shape"),
    (lambda: videomae_loss_reference(randn(1, 1, 96), randn(1, 3, 2, 4, 8, requires_grad=True),
                                     torch.tensor([[True, False]]), 4, 2), "videos is the target"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
