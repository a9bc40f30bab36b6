"""MAE / U-MAE model: fused vs reference with the same weights and noise, autocast, compile."""
import copy

import pytest
import timm
import torch
from umae_testing import DEVICES, LOSS_TOL, MATMUL_TOL, TOL, UNIT_ROUNDOFF, assert_close, assert_grads_close, cuda_only

import umae
import umae.models  # noqa: F401  (registers with timm)


def _pair(device, lamb=0.01, **kw):
    torch.manual_seed(0)
    fused = timm.create_model("umae_vit_micro_patch4_32", fused=True, lamb=lamb, **kw).to(device)
    ref = timm.create_model("umae_vit_micro_patch4_32", fused=False, lamb=lamb, **kw).to(device)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_fused_matches_reference_fp32(device, norm_pix_loss):
    fused, ref = _pair(device, norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(6, 3, 32, 32, device=device)
    noise = torch.rand(6, 64, device=device)
    a, b = fused(imgs, noise=noise), ref(imgs, noise=noise)
    for f in ("loss", "loss_mae", "loss_unif", "pred", "mask", "latent"):
        assert_close(getattr(a, f), getattr(b, f), name=f, **TOL[torch.float32])
    a.loss.backward()
    b.loss.backward()
    ga, gb = _grads(fused), _grads(ref)
    assert len(ga) > 20
    assert_grads_close(ga, gb, _truth(ref, imgs, noise), torch.float32)


def _truth(ref, imgs, noise):
    """The reference model's gradients in float64."""
    truth = copy.deepcopy(ref).double()
    truth.zero_grad()
    truth(imgs.double(), noise=noise.double()).loss.backward()
    return _grads(truth)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,dtype", [(6, torch.bfloat16), (70, torch.bfloat16), (70, torch.float16)])
def test_fused_matches_reference_under_autocast(device, batch, dtype):
    # batch 70 > the embedding width 64: the uniformity loss's Gram path (it crashed under CPU autocast)
    fused, ref = _pair(device)
    imgs = torch.randn(batch, 3, 32, 32, device=device)
    noise = torch.rand(batch, 64, device=device)
    outs = []
    for m in (fused, ref):
        with torch.autocast(device, dtype=dtype):
            out = m(imgs, noise=noise)
        out.loss.backward()
        outs.append(out)
    assert outs[0].loss.dtype == torch.float32
    assert_close(outs[0].loss, outs[1].loss, **TOL[dtype])
    # the uniformity term's matmul in the autocast dtype on both paths (its reference's, cast by autocast)
    assert_close(outs[0].loss_unif, outs[1].loss_unif, **MATMUL_TOL[dtype])
    assert_grads_close(_grads(fused), _grads(ref), _truth(ref, imgs, noise), dtype)


def test_fused_patch_embedding_gives_contiguous_tokens(monkeypatch):
    # timm's PatchEmbed tokens are strided (L*D, 1, L); the fused model hands the masking gather
    # contiguous tokens with the same values
    import umae.ops as ops

    fused, ref = _pair("cpu")
    imgs = torch.randn(5, 3, 32, 32)
    seen = []
    real = ops.random_masking
    monkeypatch.setattr(ops, "random_masking", lambda x, *a, **k: (seen.append(x), real(x, *a, **k))[1])
    fused(imgs)
    ref(imgs)
    assert seen[0].is_contiguous() and not seen[1].is_contiguous()
    # the same convolution, computed for another memory layout: oneDNN and the BLAS may pick another
    # kernel (another summation order) per layout and per ISA, so the tokens are not bitwise equal
    # on every machine. Each is a dot product of K = p*p*C terms plus the bias, accumulated in fp32:
    # each errs from the exact value by at most (K + 1) u (sum |w x| + |b|) (any order, with or
    # without FMA), so the two differ by at most twice that; a wrong layout (a transposed patch) is
    # off by O(|token|).
    pe = fused.patch_embed.proj
    K = pe.weight[0].numel()
    mag = torch.nn.functional.conv2d(imgs.abs(), pe.weight.abs(), pe.bias.abs(), stride=pe.stride)
    bound = 2 * (K + 1) * UNIT_ROUNDOFF[torch.float32] * mag.flatten(2).transpose(1, 2)
    diff = (seen[0] - seen[1]).abs().detach()
    assert (diff <= bound).all(), f"patch embedding differs by {diff.max().item():.3g} (bound {bound.min().item():.3g})"
    # the bound can fail: tokens one patch off exceed it
    assert not ((seen[0] - seen[1].roll(1, dims=1)).abs().detach() <= bound).all()
    with pytest.raises(ValueError, match="imgs must be"):
        fused(torch.randn(2, 3, 36, 36))


def test_global_backend_switch_routes_a_fused_model_to_the_reference(monkeypatch):
    import umae.ops.uniformity_op as uniformity_op

    calls = []
    real = uniformity_op.uniformity_loss_reference
    monkeypatch.setattr(uniformity_op, "uniformity_loss_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, _ = _pair("cpu")
    imgs = torch.randn(2, 3, 32, 32)
    fused(imgs)
    n = len(calls)
    with umae.use_backend("reference"):
        fused(imgs)
    assert len(calls) == n + 1


def test_lamb_zero_is_plain_mae_and_timm_kwargs():
    m = timm.create_model("umae_vit_micro_patch4_32", lamb=0.0, norm_pix_loss=False, fused=True)
    assert m.lamb == 0 and not m.norm_pix_loss
    out = m(torch.randn(2, 3, 32, 32))
    assert torch.equal(out.loss, out.loss_mae) and out.loss_unif > 0
    out.loss.backward()
    assert out.mask.shape == (2, 64) and out.pred.shape == (2, 64, 48) and out.latent.shape == (2, 17, 64)
    for name in ("umae_vit_tiny_patch4_32", "umae_vit_base_patch16_224"):
        assert timm.is_model(name)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("umae_vit_tiny_patch4_32", pretrained=True)


def test_masking_is_deterministic_with_noise():
    fused, _ = _pair("cpu")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    assert torch.equal(fused(imgs, noise=noise).loss, fused(imgs, noise=noise).loss)


@pytest.mark.slow
def test_compile_fullgraph():
    fused, ref = _pair("cpu")
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(imgs, 0.75, noise)
    out.loss.backward()
    assert_close(out.loss, ref(imgs, noise=noise).loss, **LOSS_TOL[torch.float32])


@cuda_only
def test_cuda_compile_inductor_and_fp16_grad_scaler():
    fused, ref = _pair("cuda")
    imgs, noise = torch.randn(8, 3, 32, 32, device="cuda"), torch.rand(8, 64, device="cuda")
    compiled = torch.compile(fused, fullgraph=True)
    out = compiled(imgs, 0.75, noise)
    assert_close(out.loss, ref(imgs, noise=noise).loss, **MATMUL_TOL[torch.float32])  # inductor reorders sums
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = fused(imgs, noise=noise).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert torch.isfinite(loss)


def test_timm_kwargs_override_the_named_config():
    m = timm.create_model("umae_vit_tiny_patch4_32", embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64,
                          decoder_depth=2, decoder_num_heads=2, lamb=0.1)
    assert m.pos_embed.shape[-1] == 96 and len(m.blocks) == 4 and m.blocks[0].attn.num_heads == 3
    assert m.mask_token.shape[-1] == 64 and len(m.decoder_blocks) == 2 and m.lamb == 0.1
    assert m.patch_size == 4 and m.img_size == 32  # the rest from the named config


def test_checkpoint_path_loads_facebookresearch_mae_checkpoints(tmp_path):
    src = timm.create_model("umae_vit_micro_patch4_32", fused=False)
    full = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save({"model": full}, tmp_path / "full.pth")  # MAE's layout: {"model": state_dict}
    m = timm.create_model("umae_vit_micro_patch4_32", checkpoint_path=str(tmp_path / "full.pth"))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in full.items())
    # encoder-only (mae_pretrain_vit_*.pth): loads the encoder, names the missing decoder keys
    enc = {k: v for k, v in full.items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "enc.pth")
    with pytest.warns(UserWarning, match=r"encoder-only checkpoint.*missing keys: decoder_"):
        m = timm.create_model("umae_vit_micro_patch4_32", checkpoint_path=str(tmp_path / "enc.pth"))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in enc.items())
    # anything else is refused before loading, naming the keys
    bad = dict(enc, **{"extra.weight": torch.ones(3)})
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra.weight'\]"):
        timm.create_model("umae_vit_micro_patch4_32", checkpoint_path=str(tmp_path / "bad.pth"))
    # a wider model's checkpoint: umae's message naming each key and both shapes, not PyTorch's
    wide = timm.create_model("umae_vit_micro_patch4_32", embed_dim=96, fused=False).state_dict()
    torch.save({"model": wide}, tmp_path / "wide.pth")
    with pytest.raises(RuntimeError, match=r"the shapes of \d+ keys differ: cls_token \(1, 1, 96\) \(model: \(1, 1, 64\)\)"):
        timm.create_model("umae_vit_micro_patch4_32", checkpoint_path=str(tmp_path / "wide.pth"))
    del enc["pos_embed"]
    torch.save({"model": enc}, tmp_path / "no_pos.pth")
    with pytest.raises(RuntimeError, match="missing keys.*pos_embed"):
        timm.create_model("umae_vit_micro_patch4_32", checkpoint_path=str(tmp_path / "no_pos.pth"))


def _trained_norm(norm, seed=3):
    g = torch.Generator().manual_seed(seed)  # away from (1, 0): a second norm is not ~identity
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g))


@pytest.mark.parametrize("double", [True, False])
def test_uniformity_cls_feature_as_the_official_forward(double):
    from umae.ops.uniformity_op import uniformity_loss_reference

    fused, ref = _pair("cpu", lamb=0.1, cls_double_norm=double)
    for m in (fused, ref):
        _trained_norm(m.norm)
    imgs, noise = torch.randn(7, 3, 32, 32), torch.rand(7, 64)
    out = fused(imgs, noise=noise)
    official = uniformity_loss_reference(ref.norm(out.latent)[:, 0])  # U-MAE: cls_feats = self.norm(latent)[:, 0]
    once = uniformity_loss_reference(out.latent[:, 0])
    assert (official - once).abs() > 1e-3
    assert_close(out.loss_unif, official if double else once, name="loss_unif", **LOSS_TOL[torch.float32])
    assert_close(ref(imgs, noise=noise).loss_unif, out.loss_unif, name="reference model", **LOSS_TOL[torch.float32])
    assert timm.create_model("umae_vit_micro_patch4_32").cls_double_norm  # the default: the official forward


def test_online_probe_trains_only_the_probe():
    torch.manual_seed(0)
    m = timm.create_model("umae_vit_micro_patch4_32", fused=True, lamb=0.1, probe_classes=10)
    imgs, noise, labels = torch.randn(9, 3, 32, 32), torch.rand(9, 64), torch.randint(0, 10, (9,))
    out = m(imgs, noise=noise, labels=labels)
    logits = m.fc(m.norm(out.latent)[:, 0])
    assert_close(out.loss_probe, torch.nn.functional.cross_entropy(logits, labels), name="loss_probe",
                 **LOSS_TOL[torch.float32])
    assert int(out.probe_correct) == int((logits.argmax(1) == labels).sum())
    assert_close(out.loss, out.loss_mae + 0.1 * out.loss_unif + out.loss_probe, name="loss", **LOSS_TOL[torch.float32])
    out.loss_probe.backward(retain_graph=True)  # the probe's loss reaches the probe only
    grads = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"fc.weight", "fc.bias"}
    m.zero_grad()
    out.loss.backward()
    assert m.cls_token.grad.abs().sum() > 0
    assert m(imgs, noise=noise).loss_probe is None  # no labels: no probe term


def test_checkpoint_with_the_official_probe_loads_without_one(tmp_path):
    src = timm.create_model("umae_vit_micro_patch4_32", probe_classes=10)
    sd = dict(src.state_dict(), **{"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64)})
    dst = timm.create_model("umae_vit_micro_patch4_32")
    with pytest.warns(UserWarning, match="probe / head keys are not loaded: fc.bias, fc.weight, fc_norm.bias"):
        dst.load_state_dict({"model": sd})
    assert torch.equal(dst.cls_token, src.cls_token)
    with pytest.warns(UserWarning, match="probe / head keep their initialization.*fc.bias"):  # a checkpoint without
        timm.create_model("umae_vit_micro_patch4_32", probe_classes=10).load_state_dict(dst.state_dict())
