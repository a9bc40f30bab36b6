"""umae's models as timm models, tested the way timm's own test_models.py tests a model
(forward, default cfgs, classifier reset, backward, forward_intermediates), plus a linear probe
on an umae encoder (the fine-tune: tests/test_finetune.py)."""
import subprocess
import sys

import numpy as np
import pytest
import timm
import timm.loss
import timm.optim
import torch
from PIL import Image
from umae_testing import HANG_GUARD, TOL, assert_close

import umae
from umae.models import MAEOutput

MODELS = ["umae_vit_micro_patch4_32", "umae_vit_mini_patch4_32"]
B = 2


def _input(model):
    return torch.randn(B, *model.pretrained_cfg["input_size"])


def test_import_umae_registers_the_models():
    code = "import timm, umae\nprint(type(timm.create_model('umae_vit_micro_patch4_32')).__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode == 0 and r.stdout.strip() == "MaskedAutoencoderViT", r.stderr


@pytest.mark.parametrize("name", MODELS)
def test_model_forward(name):
    model = timm.create_model(name, num_classes=7).eval()
    out = model(_input(model))
    assert out.shape == (B, 7) and torch.isfinite(out).all()
    # without num_classes the model is the MAE / U-MAE objective, as before
    assert isinstance(timm.create_model(name)(_input(model)), MAEOutput)


@pytest.mark.parametrize("name", MODELS)
def test_model_default_cfgs(name):
    model = timm.create_model(name, num_classes=7).eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 7 and len(cfg["mean"]) == len(cfg["std"]) == 3
    sd = model.state_dict()
    assert cfg["classifier"] + ".weight" in sd and sd[cfg["first_conv"] + ".weight"].shape[1] == 3
    x = _input(model)
    feats = model.forward_features(x)
    assert feats.shape == (B, 1 + 64, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (B, model.num_features)
    model.reset_classifier(0)
    assert model(x).shape == (B, model.num_features) and model.get_classifier().__class__.__name__ == "Identity"
    model.reset_classifier(0, "")
    assert_close(model(x), feats, **TOL[torch.float32])  # no pooling: the features
    model.reset_classifier(5, "avg")
    assert model(x).shape == (B, 5) and model.pretrained_cfg["num_classes"] == 5
    assert_close(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1), **TOL[torch.float32])
    # resolve_data_config gives the model's own 32 px input (timm's default would be 224)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)


def test_model_backward_trains_encoder_and_head_not_the_decoder():
    model = timm.create_model("umae_vit_micro_patch4_32", num_classes=4, drop_path_rate=0.1, qkv_bias=False)
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    model(_input(model)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("decoder_", "mask_token")) for n in trainable)  # frozen: unused by a classifier
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [], no_grad


@pytest.mark.parametrize("fmt", ["NCHW", "NLC"])
def test_model_forward_intermediates(fmt):
    model = timm.create_model("umae_vit_mini_patch4_32", num_classes=3).eval()
    x = _input(model)
    final, inter = model.forward_intermediates(x, output_fmt=fmt)
    assert_close(final, model.forward_features(x), **TOL[torch.float32])
    assert len(inter) == len(model.blocks) == len(model.feature_info)
    shape = (B, model.embed_dim, 8, 8) if fmt == "NCHW" else (B, 64, model.embed_dim)
    assert all(t.shape == shape for t in inter)
    last2 = model.forward_intermediates(x, indices=2, output_fmt=fmt, intermediates_only=True)
    assert len(last2) == 2 and torch.equal(last2[-1], inter[-1])
    normed = model.forward_intermediates(x, indices=[len(model.blocks) - 1], norm=True, output_fmt="NLC",
                                         intermediates_only=True)
    assert_close(normed[0], final[:, 1:], **TOL[torch.float32])  # the last block, normed: the features


def test_grad_checkpointing_same_values():
    torch.manual_seed(0)
    model = timm.create_model("umae_vit_micro_patch4_32", fused=False)
    x, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(x, noise=noise)  # the MAE objective: encoder and decoder blocks checkpointed
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for n in g0:  # the recomputed forward is the same computation
        assert_close(g1[n], g0[n], **TOL[torch.float32], name=n)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_a_linear_probe_on_the_encoder():
    model = timm.create_model("umae_vit_micro_patch4_32")  # a pretraining model
    model.reset_classifier(10)  # now a classifier; only the head is trained in a probe
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    before = model.blocks[0].mlp.fc1.weight.clone()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model.blocks[0].mlp.fc1.weight, before) and model.head.weight.abs().sum() > 0


def test_bad_timm_arguments_are_named():
    with pytest.raises(ValueError, match="global_pool must be one of"):
        timm.create_model("umae_vit_micro_patch4_32", global_pool="max")
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        timm.create_model("umae_vit_micro_patch4_32", num_classes=-1)
    assert umae.models.MaskedAutoencoderViT.forward_features  # the API lives on the model class
