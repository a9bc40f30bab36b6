"""umae.patch on the MAEs people already run: transformers' ViTMAE and facebookresearch/mae-style
models, patched vs unpatched (no downloads: small configs)."""
import copy
import io
import os
import pickle

import pytest
import timm
import torch
from umae_testing import LOSS_TOL, TOL, assert_close, assert_grads_close, videomae, videomae_inputs

import umae
import umae.models  # noqa: F401  (registers with timm)
from umae.ops.masked_mse_op import mae_loss_reference
from umae.ops.uniformity_op import uniformity_loss_reference

transformers = pytest.importorskip("transformers")

# (image_size, patch, channels, norm_pix_loss, mask_ratio); (16, 64) is non-square with a square patch
# count, the only non-square shape transformers' ViTMAE builds (its pos-embed init takes sqrt(L))
HF_CONFIGS = [(32, 4, 3, True, 0.75), (64, 16, 1, False, 0.5), ((16, 64), 4, 3, True, 0.75), (24, 4, 3, False, 0.75)]


def _hf(image_size, patch, channels, norm_pix, ratio, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    decoder_hidden_size=24, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=48, image_size=image_size, patch_size=patch,
                                    num_channels=channels, norm_pix_loss=norm_pix, mask_ratio=ratio)
    return transformers.ViTMAEForPreTraining(cfg)


def _hf_inputs(model, N=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    H, W = size if isinstance(size, (tuple, list)) else (size, size)
    p = model.config.patch_size
    x = torch.randn(N, model.config.num_channels, H, W, generator=g)
    return x, torch.rand(N, (H // p) * (W // p), generator=g)


def _hf_unpatched(model, x, noise):
    """The unpatched model's outputs; its loss recomputed by umae's reference where the model's own
    patchify refuses non-square images."""
    if x.shape[2] == x.shape[3]:
        out = model(x, noise=noise)
        return out.loss, out.logits, out.mask, out.ids_restore
    enc = model.vit(x, noise=noise)
    logits = model.decoder(enc.last_hidden_state, enc.ids_restore).logits
    with pytest.raises(ValueError, match="squared"):
        model(x, noise=noise)
    loss = mae_loss_reference(logits, x, enc.mask, model.config.patch_size, model.config.norm_pix_loss)
    return loss, logits, enc.mask, enc.ids_restore


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", HF_CONFIGS, ids=str)
def test_hf_patched_matches_unpatched_fp32(cfg):
    ref, model = _hf(*cfg), _hf(*cfg)
    x, noise = _hf_inputs(model)
    umae.patch(model)
    loss, logits, mask, ids = _hf_unpatched(ref, x, noise)
    out = model(x, noise=noise)
    assert torch.equal(out.mask, mask) and torch.equal(out.ids_restore, ids)
    assert_close(out.logits, logits, name="logits", **TOL[torch.float32])
    assert_close(out.loss, loss, name="loss", **LOSS_TOL[torch.float32])
    assert out.loss_mae is out.loss and out.loss_unif is None
    loss.backward()
    out.loss.backward()
    ga, gb = _grads(model), _grads(ref)
    assert len(ga) > 10
    assert_grads_close(ga, gb, _hf_truth(cfg, x, noise), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_check_fails_a_wrong_gradient(dtype):
    # the bound assert_grads_close sets must not let a zeroed or 10%-scaled gradient through, even in
    # a model whose mask token's gradient is 1e4 times the others'
    cfg = HF_CONFIGS[0]
    model = _hf(*cfg)
    x, noise = _hf_inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        _hf_unpatched(model, x, noise)[0].backward()
    good, truth = _grads(model), _hf_truth(cfg, x, noise)
    assert_grads_close(good, good, truth, dtype)
    names = [n for n in good if truth[n].norm() > 1e-12]  # not a true 0 (key biases): no relative error to make
    factors = (0.0, 0.9) if dtype == torch.float32 else (0.0, 0.5)
    for n in names:
        for f in factors:
            wrong = dict(good, **{n: good[n] * f})
            with pytest.raises(AssertionError, match=f"grad {n}:"):
                assert_grads_close(wrong, good, truth, dtype)


def _hf_truth(cfg, x, noise):
    """The unpatched model's gradients in float64."""
    truth = _hf(*cfg).double()
    _hf_unpatched(truth, x.double(), noise.double())[0].backward()
    return _grads(truth)


def test_hf_patched_matches_unpatched_bf16_autocast():
    ref, model = _hf(*HF_CONFIGS[0]), _hf(*HF_CONFIGS[0])
    umae.patch(model)
    x, noise = _hf_inputs(model)
    outs = []
    for m in (model, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, noise=noise)
        out.loss.backward()
        outs.append(out)
    assert outs[0].loss.dtype == torch.float32 and torch.equal(outs[0].mask, outs[1].mask)
    assert_close(outs[0].loss, outs[1].loss, **TOL[torch.bfloat16])
    assert_grads_close(_grads(model), _grads(ref), _hf_truth(HF_CONFIGS[0], x, noise), torch.bfloat16)


def test_hf_profiler_shows_the_umae_ops():
    model = umae.patch(_hf(*HF_CONFIGS[0]))
    x, noise = _hf_inputs(model)
    with torch.profiler.profile() as prof:
        model(x, noise=noise).loss.backward()
    names = {e.name for e in prof.events()}
    # masking, restore and the loss, forward and backward (C++ CPU kernels here)
    for op in ("umae::random_masking", "umae::restore_tokens", "umae::patch_mse"):
        assert op in names, (op, sorted(n for n in names if n.startswith("umae")))


def test_hf_unpatch_restores_the_original_bitwise_and_other_instances_are_untouched():
    model, other = _hf(*HF_CONFIGS[0]), _hf(*HF_CONFIGS[0])
    x, noise = _hf_inputs(model)
    before = model(x, noise=noise)
    assert umae.patch(model) is model and umae.patch(model) is model  # idempotent
    assert umae.patching.is_patched(model) and not umae.patching.is_patched(other)
    assert "forward" not in other.__dict__ and "forward" not in other.decoder.__dict__
    umae.unpatch(model)
    after = model(x, noise=noise)
    assert "forward" not in model.__dict__ and "forward" not in model.decoder.__dict__
    for f in ("loss", "logits", "mask", "ids_restore"):
        assert torch.equal(getattr(before, f), getattr(after, f)), f


def test_hf_state_dict_to_deepcopy_and_return_dict():
    model = umae.patch(_hf(*HF_CONFIGS[0]))
    plain = _hf(*HF_CONFIGS[0], seed=5)
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())
    model = model.to(torch.float32)
    x, noise = _hf_inputs(model)
    twin = copy.deepcopy(model)
    assert umae.patching.is_patched(twin) and twin.forward.__self__ is twin
    a, b = model(x, noise=noise), twin(x, noise=noise)
    assert torch.equal(a.loss, b.loss)
    t = model(x, noise=noise, return_dict=False)
    assert isinstance(t, tuple) and torch.equal(t[0], a.loss)


def _trained_norm(norm, seed=3):
    """A final norm away from its (1, 0) init, where a second application is not ~identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g))
    return norm


@pytest.mark.parametrize("double", [True, False])
def test_hf_uniformity_term(double):
    model = umae.patch(_hf(*HF_CONFIGS[0]), lamb=0.1, cls_double_norm=double)
    _trained_norm(model.vit.layernorm)
    x, noise = _hf_inputs(model, N=6)
    out = model(x, noise=noise)
    latent = model.vit(x, noise=noise).last_hidden_state  # after the encoder's final norm
    official = uniformity_loss_reference(model.vit.layernorm(latent)[:, 0])  # U-MAE's norm(latent)[:, 0]
    once = uniformity_loss_reference(latent[:, 0])
    assert (official - once).abs() > 1e-3  # the two choices differ here
    assert_close(out.loss_unif, official if double else once, **LOSS_TOL[torch.float32])
    assert_close(out.loss, out.loss_mae + 0.1 * out.loss_unif, **LOSS_TOL[torch.float32])
    out.loss.backward()
    assert model.vit.embeddings.cls_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lamb"):
        umae.patch(transformers.ViTMAEModel(model.config), lamb=0.1)


def test_hf_encoder_alone():
    ref = _hf(*HF_CONFIGS[0]).vit
    model = umae.patch(copy.deepcopy(ref))
    x, noise = _hf_inputs(model)
    a, b = model(x, noise=noise), ref(x, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_restore, b.ids_restore)
    assert_close(a.last_hidden_state, b.last_hidden_state, **TOL[torch.float32])
    assert "forward" in model.embeddings.__dict__ and "forward" not in ref.embeddings.__dict__


def test_hf_interpolate_pos_encoding_falls_back_with_one_warning():
    ref, model = _hf(*HF_CONFIGS[0]), umae.patch(_hf(*HF_CONFIGS[0]))
    x, noise = _hf_inputs(model)
    umae.patching._warned_interpolate = False
    with pytest.warns(UserWarning, match="interpolate_pos_encoding"):
        out = model(x, noise=noise, interpolate_pos_encoding=True)
    r = ref(x, noise=noise, interpolate_pos_encoding=True)
    assert torch.equal(out.mask, r.mask)
    assert_close(out.loss, r.loss, **LOSS_TOL[torch.float32])


@pytest.mark.slow
def test_hf_training_converges_like_the_unpatched_model():
    cfg = (32, 4, 3, False, 0.75)
    ref, model = _hf(*cfg), umae.patch(_hf(*cfg))
    # one random colour per image: a masked patch is predictable from the visible ones, so a
    # model this small learns it within tens of steps (pixel noise it cannot)
    x = torch.randn(16, 3, 1, 1, generator=torch.Generator().manual_seed(2)).expand(16, 3, 32, 32).contiguous()
    curves = []
    for m in (model, ref):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(30):
            loss = m(x, noise=torch.rand(16, 64, generator=g)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < 0.3 * curves[0][0]  # it learns
    assert max(abs(a - b) / b for a, b in zip(*curves)) < 0.02, curves  # and tracks the unpatched run


@pytest.mark.slow
def test_hf_compile():
    ref, model = _hf(*HF_CONFIGS[0]), umae.patch(_hf(*HF_CONFIGS[0]))
    x, noise = _hf_inputs(model)
    compiled = torch.compile(model)
    out = compiled(x, noise=noise)
    assert_close(out.loss, ref(x, noise=noise).loss, **LOSS_TOL[torch.float32])


def _umae_ops_run(fn) -> set:
    with torch.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("umae::")}


@pytest.mark.slow
def test_patching_a_compiled_model_patches_the_module_under_it():
    model = _hf(*HF_CONFIGS[0])
    x, noise = _hf_inputs(model)
    compiled = torch.compile(model)
    plain = compiled(x, noise=noise).loss  # compiled unpatched first: the patch must still take effect
    own = dict(compiled.__dict__)
    assert umae.patch(compiled) is compiled
    assert umae.patching.is_patched(model) and compiled.__dict__ == own  # the wrapper is untouched
    out = compiled(x, noise=noise)
    assert_close(out.loss, plain, **LOSS_TOL[torch.float32])
    assert "umae::random_masking" in _umae_ops_run(lambda: compiled(x, noise=noise))
    umae.unpatch(compiled)
    assert not umae.patching.is_patched(model) and not _umae_ops_run(lambda: compiled(x, noise=noise))


@pytest.mark.parametrize("kind", ["hf", "mae_style"])
def test_a_saved_patched_model_loads_back_patched(kind):
    if kind == "hf":
        model = umae.patch(_hf(*HF_CONFIGS[0]), lamb=0.1)
        x, noise = _hf_inputs(model)
        run = lambda m: m(x, noise=noise).loss  # noqa: E731
    else:
        model = _mae_pair(lamb=0.1)[1]
        x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
        run = lambda m: m(x, noise=noise)[0]  # noqa: E731
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert umae.patching.is_patched(loaded)
    assert torch.equal(run(loaded), run(model))
    assert _umae_ops_run(lambda: run(loaded)) == _umae_ops_run(lambda: run(model)) != set()
    assert umae.patching.is_patched(pickle.loads(pickle.dumps(model)))
    umae.unpatch(loaded)  # back to the model's own methods
    assert not _umae_ops_run(lambda: run(loaded)) and not any(k.startswith("forward") for k in loaded.__dict__)


# ---- facebookresearch/mae-style ------------------------------------------------------------

class OfficialMAE(umae.models.MaskedAutoencoderViT):
    """models_mae.py's forward: (loss, pred, mask), no uniformity term."""

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _mae_pair(lamb=0.0):
    kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=48, decoder_depth=1,
              decoder_num_heads=2, fused=False, lamb=0.0)
    torch.manual_seed(0)
    ref = OfficialMAE(**kw)
    model = copy.deepcopy(ref)
    return ref, umae.patch(model, lamb=lamb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mae_style_patched_matches_the_reference_model(dtype):
    ref, model = _mae_pair()
    x = torch.randn(6, 3, 32, 32)
    noise = torch.rand(6, 64)
    outs = []
    for m in (model, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, pred, mask = m(x, noise=noise)
        loss.backward()
        outs.append((loss, pred, mask))
    (la, pa, ma), (lb, pb, mb) = outs
    assert torch.equal(ma, mb)
    tol = TOL[dtype]
    assert_close(la, lb, name="loss", **(LOSS_TOL[dtype] if dtype == torch.float32 else tol))
    assert_close(pa, pb, name="pred", **tol)
    truth = copy.deepcopy(ref).double()
    truth.zero_grad()
    truth(x.double(), noise=noise.double())[0].backward()
    assert_grads_close(_grads(model), _grads(ref), _grads(truth), dtype)


def test_mae_style_uniformity_term_and_unpatch():
    ref, model = _mae_pair(lamb=0.05)
    _trained_norm(ref.norm), _trained_norm(model.norm)
    x, noise = torch.randn(6, 3, 32, 32), torch.rand(6, 64)
    loss, pred, mask = model(x, noise=noise)
    latent = ref.forward_encoder(x, 0.75, noise)[0]
    terms = model.umae_losses
    assert_close(terms["loss_unif"], uniformity_loss_reference(ref.norm(latent)[:, 0]), **LOSS_TOL[torch.float32])
    umae.patch(model, lamb=0.05, cls_double_norm=False)
    model(x, noise=noise)
    assert_close(model.umae_losses["loss_unif"], uniformity_loss_reference(latent[:, 0]), **LOSS_TOL[torch.float32])
    assert_close(loss, terms["loss_mae"] + 0.05 * terms["loss_unif"], **LOSS_TOL[torch.float32])
    loss.backward()
    umae.unpatch(model)
    assert not any(k in model.__dict__ for k in ("forward", "forward_encoder", "umae_losses"))
    assert torch.equal(model(x, noise=noise)[0], ref(x, noise=noise)[0])


class OfficialUMAE(umae.models.MaskedAutoencoderViT):
    """zhangq327/U-MAE's models_mae.py: forward(imgs, mask_ratio) without noise, returning
    (loss, pred, mask, cls_feats, outputs) for a loop (engine_pretrain.py) that adds the term."""

    def __init__(self, global_pool=False, num_classes=10, **kw):
        super().__init__(**kw)
        self.global_pool = global_pool
        self.fc_norm = torch.nn.LayerNorm(self.cls_token.shape[-1], eps=1e-6)
        self.fc = torch.nn.Linear(self.cls_token.shape[-1], num_classes)

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        if self.global_pool:
            cls_feats = self.fc_norm(latent[:, 1:, :].mean(dim=1))
        else:
            cls_feats = self.norm(latent)[:, 0]
        return loss, pred, mask, cls_feats, self.fc(cls_feats.detach())


MICRO = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=48, decoder_depth=1,
             decoder_num_heads=2, fused=False, lamb=0.0)


def _official_umae(global_pool, seed=0):
    torch.manual_seed(seed)
    m = OfficialUMAE(global_pool=global_pool, **MICRO)
    with torch.no_grad():  # a trained-looking fc_norm, so that it matters
        m.fc_norm.weight.uniform_(0.5, 1.5), m.fc_norm.bias.normal_(0, 0.3)
    _trained_norm(m.norm)
    return m


@pytest.mark.parametrize("global_pool", [False, True])
def test_official_umae_model_feature_noise_and_double_count(global_pool):
    model = _official_umae(global_pool)
    x, noise = torch.randn(6, 3, 32, 32), torch.rand(6, 64)
    umae.patch(model)  # lamb 0: the loop's own term, on the model's own feature
    loss_mae, _, mask, cls_feats, _ = model(x, noise=noise)  # noise= reaches forward_encoder
    assert torch.equal(mask, model.forward_encoder(x, 0.75, noise)[1])
    official_total = loss_mae + 0.05 * uniformity_loss_reference(cls_feats)  # engine_pretrain.py's sum
    umae.patch(model, lamb=0.05)
    with pytest.warns(UserWarning, match="counts it twice"):
        total = model(x, noise=noise)[0]
    # the term follows the model's pooling (global_pool: fc_norm of the mean patch token), as its forward
    assert_close(model.umae_losses["loss_unif"], uniformity_loss_reference(cls_feats), **LOSS_TOL[torch.float32])
    assert_close(total, official_total, **LOSS_TOL[torch.float32])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, noise=noise)  # said once per patch
    other = model(x, noise=torch.rand(6, 64))[2]
    assert not torch.equal(other, mask)


def _official_uniformity(features):
    """zhangq327/U-MAE's loss_func.py (tau = 1): all_gather through GatherLayer, whose backward keeps
    the rank's own slice of the gradient."""
    import torch.distributed as dist

    class GatherLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(out, t.contiguous())
            return tuple(out)

        @staticmethod
        def backward(ctx, *grads):
            return grads[dist.get_rank()].clone()

    z = torch.nn.functional.normalize(torch.cat(GatherLayer.apply(features), dim=0))
    return (z @ z.T).pow(2).mean()


def _official_grad_worker(rank, world, store, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.rand(8, 64)
    dist.broadcast(noise, 0)
    x, noise = x[rank * 4:(rank + 1) * 4], noise[rank * 4:(rank + 1) * 4]
    grads = {}
    for name, lamb, exact in (("mae", 0.0, True), ("official", None, None), ("patched_official", 0.1, False),
                              ("patched_exact", 0.1, True), ("patched_exact_fsdp", 0.1, True)):
        model = umae.patch(_official_umae(False), lamb=lamb or 0.0, exact_ddp_grad=bool(exact))
        if name.endswith("fsdp"):  # FSDP2 averages the ranks' gradients as DDP does
            from torch.distributed.fsdp import fully_shard

            for blk in [*model.blocks, *model.decoder_blocks]:
                fully_shard(blk)
            net = fully_shard(model)
        else:  # as U-MAE's main_pretrain.py: fc_norm is unused without global_pool (else its bucket is never reduced)
            net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        loss, _, _, cls_feats, _ = net(x, noise=noise)
        if lamb is None:  # the official loop: the model's loss plus its own term
            loss = loss + 0.1 * _official_uniformity(cls_feats)
        loss.backward()
        g = model.cls_token.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    if rank == 0:
        torch.save(grads, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
def test_official_ddp_gradient_option(tmp_path):
    # 2 gloo ranks: exact_ddp_grad=False gives the official loop's gradient (its term scaled by 1 / world size
    # after DDP's averaging); the default gives the exact global-batch gradient, twice the official term's
    import warnings

    import torch.multiprocessing as mp

    out = str(tmp_path / "grads.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.start_processes(_official_grad_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True,
                           start_method="spawn")
    g = torch.load(out)
    unif_official, unif_exact = g["official"] - g["mae"], g["patched_exact"] - g["mae"]
    # each gradient carries fp32 summation noise at its own scale; a difference of three, three times that
    noise = 3 * TOL[torch.float32]["atol"] * float(max(v.abs().max() for v in g.values()))
    assert unif_official.abs().max() > 100 * noise  # the term moves the gradient, well above the noise
    assert_close(g["patched_official"], g["official"], atol=noise, rtol=0, name="official")
    assert_close(unif_exact, 2 * unif_official, atol=noise, rtol=0, name="exact term")
    assert_close(g["patched_exact_fsdp"], g["patched_exact"], atol=noise, rtol=0, name="fsdp")


def test_umae_models_keep_their_own_uniformity_switch():
    model = timm.create_model("umae_vit_micro_patch4_32", fused=False)
    umae.patch(model)  # the three swaps are fine
    with pytest.raises(ValueError, match="set their `lamb`"):
        umae.patch(model, lamb=0.1)


def test_unrecognised_model_is_refused_and_untouched():
    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed, self.blocks = torch.nn.Identity(), torch.nn.ModuleList()

        def forward_encoder(self, x, r):
            return x

    m = Half()
    with pytest.raises(TypeError, match="lacks pos_embed, cls_token.*forward_loss"):
        umae.patch(m)
    assert not umae.patching.is_patched(m) and "forward_encoder" not in m.__dict__


VIDEO_PARAM = "videomae.embeddings.patch_embeddings.projection.weight"


def _ddp_worker(rank, world, store, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for wrap in ("ddp", "fsdp"):  # one spawn for both (a spawn is 2 processes importing torch)
        model = umae.patch(_hf(*HF_CONFIGS[0]), lamb=0.1)  # patched, then wrapped
        if wrap == "fsdp":  # FSDP2: each encoder and decoder layer, then the rest
            from torch.distributed.fsdp import fully_shard

            for layer in [*model.vit.layers, *model.decoder.decoder_layers]:
                fully_shard(layer)
            net = fully_shard(model)
        else:
            net = torch.nn.parallel.DistributedDataParallel(model)
        x, noise = _hf_inputs(model, N=2 * 4)
        out = net(x[rank * 4:(rank + 1) * 4], noise=noise[rank * 4:(rank + 1) * 4])
        out.loss.backward()
        grad = model.vit.embeddings.cls_token.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # FSDP: gathered from the shards
        if rank == 0:
            torch.save(dict(loss_unif=out.loss_unif.detach(), grad=grad), f"{out_dir}/{wrap}.pt")
    # VideoMAE under DDP (the wrapper held through the backward: its hooks average the gradients)
    video = umae.patch(videomae(), lamb=0.1)
    net = torch.nn.parallel.DistributedDataParallel(video)
    x, mask = videomae_inputs(video, B=2 * 4)
    out = net(x[rank * 4:(rank + 1) * 4], bool_masked_pos=mask[rank * 4:(rank + 1) * 4])
    out.loss.backward()
    if rank == 0:
        torch.save(dict(loss_unif=out.loss_unif.detach(), grad=video.get_parameter(VIDEO_PARAM).grad),
                   f"{out_dir}/video.pt")
    dist.barrier()
    dist.destroy_process_group()
    # what the test reads is saved and both ranks are past the barrier: end here. At interpreter
    # exit a rank of the FSDP case once aborted ("terminate called without an active exception",
    # a thread still joinable in a static destructor; 1 of 3 full runs, a loaded 2-core machine)
    os._exit(0)


@pytest.mark.dist
def test_hf_uniformity_over_the_global_batch_under_ddp_and_fsdp(tmp_path):
    # two gloo ranks of 4 images each: the uniformity term is the 8-image batch's on every rank
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    model = umae.patch(_hf(*HF_CONFIGS[0]), lamb=0.1)
    x, noise = _hf_inputs(model, N=8)
    out = model(x, noise=noise)
    cls = model.vit.layernorm(model.vit(x, noise=noise).last_hidden_state)[:, 0]
    # after DDP's (FSDP's) averaging, the gradient of the single-process loss over all 8 images
    out.loss.backward()
    truth = umae.patch(_hf(*HF_CONFIGS[0]).double(), lamb=0.1)
    truth(x.double(), noise=noise.double()).loss.backward()
    name = "vit.embeddings.cls_token"
    for wrap in ("ddp", "fsdp"):
        got = torch.load(tmp_path / f"{wrap}.pt")
        assert_close(got["loss_unif"], uniformity_loss_reference(cls), name=f"{wrap} loss_unif", **LOSS_TOL[torch.float32])
        assert_grads_close({name: got["grad"]}, {name: model.vit.embeddings.cls_token.grad},
                           {name: truth.vit.embeddings.cls_token.grad}, torch.float32)
    # VideoMAE: the term over the 8 clips, on the mean visible token; after DDP's averaging, the gradient of
    # the single-process loss
    video = umae.patch(videomae(), lamb=0.1)
    x, mask = videomae_inputs(video, B=8)
    out = video(x, bool_masked_pos=mask)
    out.loss.backward()
    latent = video.videomae(x, bool_masked_pos=mask).last_hidden_state
    got = torch.load(tmp_path / "video.pt")
    assert_close(got["loss_unif"], uniformity_loss_reference(latent.mean(1)), name="VideoMAE loss_unif",
                 **LOSS_TOL[torch.float32])
    truth = umae.patch(videomae().double(), lamb=0.1)
    truth(x.double(), bool_masked_pos=mask).loss.backward()
    assert_grads_close({VIDEO_PARAM: got["grad"]}, {VIDEO_PARAM: video.get_parameter(VIDEO_PARAM).grad},
                       {VIDEO_PARAM: truth.get_parameter(VIDEO_PARAM).grad}, torch.float32)
