"""The fine-tune half of the workflow: umae's encoders against timm's VisionTransformer of the same
shape and weights (create_model's keywords, global_pool, layer-wise lr decay groups, intermediates,
features_only, set_input_size), timm's save_for_hf folder created again, checkpoints that record
their architecture, and a fine-tune run the way timm's train.py runs one."""
import os
import re

import numpy as np
import pytest
import timm
import timm.data
import timm.loss
import timm.optim
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from umae_testing import TOL

import umae  # noqa: F401  (registers the models)
from umae.cli.main import main

NAME = "umae_vit_micro_patch4_32"  # 32 x 32, patch 4, 64-d, 2 blocks, 2 heads
TIMM_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, qkv_bias=True)


def _pair(global_pool="token", num_classes=10, **kw):
    """(umae classifier, timm ViT) with the same weights, both in eval mode."""
    torch.manual_seed(0)
    u = timm.create_model(NAME, num_classes=num_classes, global_pool=global_pool, fused=False, **kw)
    for p in u.parameters():  # nothing at its initial constant (norms at 1 / 0, the head near 0)
        p.data.add_(torch.randn_like(p) * 0.1)
    v = VisionTransformer(num_classes=num_classes, global_pool=global_pool, **TIMM_VIT)
    own = v.state_dict()
    missing = v.load_state_dict({k: t for k, t in u.state_dict().items() if k in own}, strict=False).missing_keys
    assert missing == [], missing
    return u.eval(), v.eval()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_classifier_matches_timm_vit(pool):
    # was: 'avg' took mean(norm(tokens)); timm and MAE's fine-tune take fc_norm(mean(tokens)), no final norm
    u, v = _pair(pool)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(u(x), v(x), **TOL[torch.float32])
        assert torch.allclose(u.forward_head(u.forward_features(x), pre_logits=True),
                              v.forward_head(v.forward_features(x), pre_logits=True), **TOL[torch.float32])
    assert (pool == "avg") == isinstance(u.fc_norm, torch.nn.LayerNorm)


def test_create_model_takes_timm_train_py_keywords():
    # was: TypeError on drop_rate, which timm's train.py always passes
    m = timm.create_model(NAME, pretrained=False, in_chans=3, num_classes=5, drop_rate=0.25, drop_path_rate=0.1,
                          proj_drop_rate=0.125, attn_drop_rate=0.0625, pos_drop_rate=0.5, global_pool="avg",
                          img_size=32, drop_block_rate=None, class_token=True, patch_drop_rate=0.0)
    assert (m.head_drop.p, m.pos_drop.p) == (0.25, 0.5)
    assert (m.blocks[0].attn.proj_drop.p, m.blocks[0].attn.attn_drop.p, m.blocks[0].mlp.drop1.p) == (0.125, 0.0625, 0.125)
    assert m.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    for kw, msg in ((dict(class_token=False), "class_token=False"), (dict(reg_tokens=4), "reg_tokens=4"),
                    (dict(dynamic_img_size=True), "dynamic_img_size=True"), (dict(qk_norm=True), "qk_norm=True")):
        with pytest.raises(ValueError, match=f"cannot honour timm's {msg}"):
            timm.create_model(NAME, **kw)
    with pytest.raises(TypeError, match="'no_such_option'"):
        timm.create_model(NAME, no_such_option=1)


def _groups(model, how):
    """[(sorted names, lr scale, weight decay)] of the optimizer groups timm's create_optimizer_v2 or
    MAE's param_groups_lrd (its rule: layer 0 for the embeddings, i + 1 for block i, the rest last;
    1-d parameters and no_weight_decay() undecayed) make with layer decay 0.75."""
    names = {id(p): n for n, p in model.named_parameters()}
    if how == "timm":
        groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                                                layer_decay=0.75).param_groups
        return sorted((tuple(sorted(names[id(p)] for p in g["params"])), round(g["lr_scale"], 6), g["weight_decay"])
                      for g in groups)
    skip, layers = model.no_weight_decay(), len(model.blocks) + 1
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block = re.match(r"blocks\.(\d+)\.", n)
        layer = 0 if n in ("cls_token", "pos_embed") or n.startswith("patch_embed") else (
            int(block.group(1)) + 1 if block else layers)
        decay = 0.0 if p.ndim == 1 or n in skip else 0.05
        out.setdefault((layer, decay), []).append(n)
    return sorted((tuple(sorted(v)), round(0.75 ** (layers - layer), 6), d) for (layer, d), v in out.items())


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("how", ["timm", "mae"])
def test_layer_decay_groups_are_timm_vits(pool, how):
    # was: groups by parameter order (cls_token at 0.237 instead of 0.422, block 0 split across two scales,
    # cls_token and pos_embed decayed); MAE's param_groups_lrd raised AttributeError (no no_weight_decay)
    u, v = _pair(pool)
    got, want = _groups(u, how), _groups(v, how)
    assert got == want
    assert any("cls_token" in g[0] and g[1] == round(0.75 ** 3, 6) and g[2] == 0.0 for g in got)


def test_intermediates_match_timm_vit():
    u, v = _pair("avg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kw in (dict(indices=2, norm=True), dict(indices=[0], output_fmt="NLC", return_prefix_tokens=True),
                   dict(indices=1, output_dict=True, return_prefix_tokens=True),
                   dict(indices=[0, 1], output_dict=True, intermediates_only=True)):
            got, want = u.forward_intermediates(x, **kw), v.forward_intermediates(x, **kw)
            flat = lambda o: torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(o)])  # noqa: E731
            assert torch.utils._pytree.tree_structure(got) == torch.utils._pytree.tree_structure(want), kw
            assert torch.allclose(flat(got), flat(want), **TOL[torch.float32]), kw
        for kw in (dict(n=2), dict(n=[1], reshape=True, norm=True)):
            got, want = u.get_intermediate_layers(x, **kw), v.get_intermediate_layers(x, **kw)
            assert all(torch.allclose(a, b, **TOL[torch.float32]) for a, b in zip(got, want, strict=True)), kw


def test_features_only_and_pruning_match_timm_vit():
    torch.manual_seed(1)
    u = timm.create_model(NAME, features_only=True, out_indices=(0, 1), fused=False).eval()
    v = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(0, 1), **dict(
        TIMM_VIT, embed_dim=64, num_heads=2)).eval()
    v.load_state_dict({k: t for k, t in u.state_dict().items() if k in v.state_dict()}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = u(x), v(x)
    assert [t.shape for t in got] == [(2, 64, 8, 8)] * 2 and u.feature_info.channels() == v.feature_info.channels()
    assert all(torch.allclose(a, b, **TOL[torch.float32]) for a, b in zip(got, want, strict=True))
    m = timm.create_model(NAME, num_classes=3)
    assert m.prune_intermediate_layers([0], prune_norm=True) == [0]
    assert len(m.blocks) == 1 and isinstance(m.norm, torch.nn.Identity) and m.num_classes == 0


def test_set_input_size():
    # a classifier's position embedding is trained: resampled as timm's; a pretraining model's is MAE's sin-cos
    u, v = _pair("token")
    u.set_input_size(img_size=48)
    v.set_input_size(img_size=(48, 48))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(u(x), v(x), **TOL[torch.float32])
    assert u.pretrained_cfg["input_size"] == (3, 48, 48)
    m = timm.create_model(NAME, img_size=48)
    p = timm.create_model(NAME, fused=False)
    p.set_input_size(img_size=48)
    assert torch.equal(p.pos_embed, m.pos_embed) and torch.equal(p.decoder_pos_embed, m.decoder_pos_embed)
    assert torch.isfinite(p(torch.randn(2, 3, 48, 48)).loss)
    with pytest.raises(ValueError, match="keep their patch size"):
        p.set_input_size(patch_size=8)


def test_save_for_hf_folder_is_created_again(tmp_path):
    # was: "Unknown model (umae)": the folder's config named no umae model
    from timm.models import save_for_hf

    u, _ = _pair("avg", num_classes=7)
    save_for_hf(u, str(tmp_path / "hf"))
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    assert type(again) is type(u) and again.num_classes == 7 and again.global_pool == "avg"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), u(x))
    with pytest.raises(ValueError, match="has no pretrained weights of its own"):
        timm.create_model(NAME, pretrained=True)


def test_checkpoints_record_the_architecture_and_hf_roundtrips(tmp_path, capsys):
    # was: a .pth recorded no config: HF -> .pth -> HF turned layer_norm_eps 1e-12 into 1e-6, and a shape
    # that is no umae config could not go back through the CLI
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                       image_size=24, patch_size=6, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=128, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.pth"), "--to", "mae"]) == 0
    assert torch.load(tmp_path / "m.pth")["config"]["norm_eps"] == 1e-12
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "hf2"), "--to", "hf"]) == 0  # no --model
    back = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf2").eval()
    assert back.config.layer_norm_eps == 1e-12
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    x, noise = torch.randn(2, 3, 24, 24), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(hf(x, noise=noise).logits, back(x, noise=noise).logits)
    # umae train's checkpoints record it too
    assert main(["train", "--model", NAME, "--builtin-size", "16", "--batch-size", "8", "--steps", "1",
                 "--num-workers", "0", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    rec = torch.load(tmp_path / "run" / "checkpoint-1.pt", weights_only=False)["config"]
    assert rec == timm.create_model(NAME).arch_config()
    capsys.readouterr()


def _image_folder(root, n=12, classes=3):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n // classes):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")


def test_a_fine_tune_as_timm_train_py_runs_it(tmp_path):
    # a pretraining checkpoint, then timm's train.py steps: create_model with its keywords, the data
    # config and transforms, an ImageFolder, create_optimizer_v2 with layer decay, mixup + soft targets
    src = timm.create_model(NAME)
    torch.save({"model": src.state_dict()}, tmp_path / "pretrain.pth")
    with pytest.warns(UserWarning, match="keep their initialization"):
        model = timm.create_model(NAME, pretrained=False, in_chans=3, num_classes=3, drop_rate=0.0, drop_path_rate=0.1,
                                  global_pool="avg", checkpoint_path=str(tmp_path / "pretrain.pth"))
    assert torch.equal(model.cls_token, src.cls_token)
    data_config = timm.data.resolve_data_config({}, model=model)
    _image_folder(tmp_path / "data")
    ds = timm.data.create_dataset("", root=str(tmp_path / "data"), split="train", is_training=True)
    ds.transform = timm.data.create_transform(**data_config, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                              re_prob=0.25)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True, drop_last=True)
    mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)
    crit = timm.loss.SoftTargetCrossEntropy()
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    decoder = model.decoder_pred.weight.clone()
    model.train()
    for _ in range(2):
        for x, y in loader:
            x, y = mixup(x, y)
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
    assert torch.isfinite(loss) and torch.equal(model.decoder_pred.weight, decoder)
    assert not torch.equal(model.pos_embed, src.pos_embed)  # fine-tuned, as MAE's fine-tune trains it
    model.eval()
    eval_tf = timm.data.create_transform(**data_config)
    with torch.no_grad():
        assert model(eval_tf(Image.open(tmp_path / "data" / "c0" / "0.png").convert("RGB"))[None]).shape == (1, 3)
    assert os.path.isdir(tmp_path / "data")


def test_a_saved_classifier_is_reheaded_and_a_frozen_one_resized(tmp_path):
    # timm re-heads pretrained weights for another class count; set_input_size resamples a classifier's
    # trained position embedding even when it is frozen (a linear probe), as timm's ViT does
    from timm.models import save_for_hf

    u, v = _pair("token", num_classes=7)
    save_for_hf(u, str(tmp_path / "hf"))
    re = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True, num_classes=3)
    assert re.num_classes == 3 and torch.equal(re.blocks[0].mlp.fc1.weight, u.blocks[0].mlp.fc1.weight)
    u.requires_grad_(False)
    u.set_input_size(img_size=48)
    v.set_input_size(img_size=(48, 48))
    assert torch.allclose(u.pos_embed, v.pos_embed, **TOL[torch.float32])


@pytest.mark.parametrize("saved,loaded", [("avg", "token"), ("token", "avg")])
def test_a_classifier_into_another_pool_raises_as_timm_vit(tmp_path, saved, loaded):
    # was: 'avg' weights loaded into a 'token' model with a warning only (fc_norm dropped as if U-MAE's probe's),
    # so timm's validate.py without --gp scored another network; timm's ViT raises on the same keys
    u, v = _pair(saved, num_classes=5)
    torch.save({"model": u.state_dict()}, tmp_path / "ft.pth")
    with pytest.raises(RuntimeError, match="fc_norm"):
        timm.create_model(NAME, num_classes=5, global_pool=loaded, checkpoint_path=str(tmp_path / "ft.pth"))
    w = VisionTransformer(num_classes=5, global_pool=loaded, **TIMM_VIT)
    with pytest.raises(RuntimeError, match="fc_norm"):
        w.load_state_dict(v.state_dict())
    same = timm.create_model(NAME, num_classes=5, global_pool=saved, checkpoint_path=str(tmp_path / "ft.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(x), u(x))


def test_pretrained_path_with_another_class_count_reheads_as_timm_train_py(tmp_path):
    # timm's train.py --pretrained-path: pretrained_cfg_overlay=dict(file=..., num_classes=-1), "force head
    # adaptation" (was: a head shape error for any other class count)
    u, _ = _pair("token", num_classes=7)
    torch.save(u.state_dict(), tmp_path / "ft.pth")
    m = timm.create_model(NAME, pretrained=True, num_classes=3,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "ft.pth"), num_classes=-1))
    assert m.head.out_features == 3 and torch.equal(m.blocks[1].attn.qkv.weight, u.blocks[1].attn.qkv.weight)
    assert m.pretrained_cfg["num_classes"] == 3


@pytest.mark.parametrize("pool", ["token", "avg", "max", "avgmax", ""])
def test_pool_is_timm_vits(pool):
    u, v = _pair("avg", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = v.forward_features(x)
        assert torch.equal(u.pool(feats, pool), v.pool(feats, pool))
        assert torch.equal(u.pool(feats), v.pool(feats))  # the model's own: 'avg'
