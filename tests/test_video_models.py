"""umae's VideoMAE / U-MAE video models (umae/models/videomae.py): registered with timm, MCG-NJU's
fixed positions (as transformers' table), the fused model against the reference model (same
weights: loss, prediction, every gradient against a float64 truth), the tube mask drawn on the
device, and U-MAE's term on the mean visible token."""
import pytest
import timm
import torch
from umae_testing import LOSS_TOL, assert_close, assert_grads_close, needs_ext

import umae
import umae.models  # noqa: F401  (registers with timm)
from umae.models.videomae import VIDEO_CONFIGS, get_sinusoid_encoding_table
from umae.ops.uniformity_op import uniformity_loss_reference

MICRO = "umae_videomae_micro_patch4_32"


def test_the_video_models_are_registered_with_timm():
    assert set(timm.list_models("umae_videomae*")) == set(VIDEO_CONFIGS) == {
        "umae_videomae_small_patch16_224", "umae_videomae_base_patch16_224", "umae_videomae_large_patch16_224", MICRO}
    base = timm.create_model("umae_videomae_base_patch16_224", depth=1, decoder_depth=1)  # MCG-NJU's widths
    assert base.embed_dim == 768 and base.mask_token.shape[-1] == 384 and base.num_tokens == 1568
    assert base.head.out_features == 2 * 16 * 16 * 3 and base.decoder_blocks[0].attn.num_heads == 6
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(MICRO, pretrained=True)


def test_fixed_positions_are_videomae_s():
    transformers = pytest.importorskip("transformers")
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table as hf

    for n, d in ((392, 384), (1568, 768), (7, 10)):
        assert torch.equal(get_sinusoid_encoding_table(n, d), hf(n, d).float())
    assert transformers  # the table is transformers' own function


def _pair(**kw):
    torch.manual_seed(0)
    fused = timm.create_model(MICRO, **kw)
    ref = timm.create_model(MICRO, fused=False, **kw)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


@needs_ext
@pytest.mark.parametrize("lamb,norm_pix", [(0.0, True), (0.01, False)])
def test_fused_model_matches_the_reference_model(lamb, norm_pix):
    fused, ref = _pair(lamb=lamb, norm_pix_loss=norm_pix)
    g = torch.Generator().manual_seed(1)
    videos = torch.randn(3, 3, 4, 32, 32, generator=g)
    mask = umae.tube_mask(3, 2, 8, 8, 0.9, generator=g)
    a, b = fused(videos, mask), ref(videos, mask)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.latent, b.latent)  # the glue is bitwise the reference's
    assert_close(a.loss, b.loss, name="loss", **LOSS_TOL[torch.float32])
    a.loss.backward()
    b.loss.backward()
    torch.manual_seed(0)
    truth = timm.create_model(MICRO, fused=False, lamb=lamb, norm_pix_loss=norm_pix).double()
    truth.load_state_dict(fused.state_dict())
    truth(videos.double(), mask).loss.backward()
    names = [n for n, p in fused.named_parameters() if p.grad is not None]
    grads = lambda m: {n: dict(m.named_parameters())[n].grad for n in names}  # noqa: E731
    assert_grads_close(grads(fused), grads(ref), grads(truth), torch.float32)
    if lamb:
        assert_close(a.loss_unif, uniformity_loss_reference(b.latent.mean(1)), name="loss_unif",
                     **LOSS_TOL[torch.float32])
        assert_close(a.loss, a.loss_mae + lamb * a.loss_unif, name="loss", **LOSS_TOL[torch.float32])


@needs_ext
def test_the_model_draws_its_tube_mask_on_the_device():
    model = timm.create_model(MICRO, mask_ratio=0.75)
    out = model(torch.randn(2, 3, 4, 32, 32))
    per_tubelet = out.mask.view(2, 2, 64)
    assert (per_tubelet == per_tubelet[:, :1]).all() and (per_tubelet.sum(-1) == 48).all()
    assert out.pred.shape == (2, 96, 2 * 4 * 4 * 3) and out.latent.shape == (2, 32, 64)
    with pytest.raises(ValueError, match="divisible"):
        timm.create_model(MICRO, num_frames=5)


def test_the_commands_take_video_models_by_name():
    from umae.models import check_name, is_video

    check_name(MICRO)
    assert is_video(MICRO) and not is_video("umae_vit_micro_patch4_32")
    with pytest.raises(ValueError, match="umae_videomae_micro_patch4_32"):  # the list names the video models
        check_name("umae_videomae_nano")


def test_video_models_convert_to_and_from_transformers():
    # weights bitwise both ways; the same clips and mask give HF's loss (float64: the order of the
    # q / k / v products apart, the same arithmetic)
    pytest.importorskip("transformers")
    from umae.convert import video_from_hf, video_to_hf

    torch.manual_seed(0)
    model = timm.create_model(MICRO, fused=False)
    with torch.no_grad():
        for blk in [*model.blocks, *model.decoder_blocks]:
            blk.attn.qkv.bias.normal_()
            blk.attn.qkv.bias[blk.attn.qkv.bias.shape[0] // 3:2 * blk.attn.qkv.bias.shape[0] // 3] = 0  # HF may lack it
    hf = video_to_hf(model)
    back = video_from_hf(hf, fused=False)
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    g = torch.Generator().manual_seed(2)
    videos = torch.randn(2, 3, 4, 32, 32, generator=g, dtype=torch.float64)
    mask = umae.tube_mask(2, 2, 8, 8, 0.9, generator=g)
    ours = model.double()(videos, mask)
    theirs = hf.double()(videos.transpose(1, 2), bool_masked_pos=mask)
    assert_close(theirs.logits, ours.pred, name="logits", atol=1e-10, rtol=1e-10)
    assert_close(theirs.loss, ours.loss_mae, name="loss", atol=1e-12, rtol=1e-10)


@pytest.mark.slow
def test_the_video_model_compiles_whole_with_the_loaders_mask():
    # umae train's call (the loader's tube mask and its known count): one graph, the mask's rows
    # checked inside it (on the CPU too), and a mask of another count still refused
    torch._dynamo.reset()
    model = timm.create_model(MICRO, lamb=0.01)
    x = torch.randn(3, 3, 4, 32, 32)
    mask, n = model.tube_mask(3, "cpu")
    ref = model(x, mask, n)
    out = torch.compile(model, fullgraph=True)(x, mask, n)
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-5 * float(ref.loss)
    out.loss.backward()
    bad = mask.clone()
    bad[0, :5] = ~bad[0, :5]
    with pytest.raises(RuntimeError, match="same number of tokens"):
        torch.compile(model, fullgraph=True)(x, bad, n)
