"""MAE checkpoints between umae / facebookresearch/mae and transformers' ViTMAE, both ways: the
round trips are bitwise, and the converted model gives the source's mask and loss for the same
noise (in float64, where the two implementations' different operation orders agree to ~1e-15)."""
import pytest
import torch
from umae_testing import TOL, assert_close

from umae import convert
from umae.cli.main import main

transformers = pytest.importorskip("transformers")


def _hf(seed=0, legacy_eps=True):
    torch.manual_seed(seed)
    cfg = transformers.ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                    decoder_hidden_size=48, decoder_num_hidden_layers=2, decoder_num_attention_heads=3,
                                    decoder_intermediate_size=192, image_size=32, patch_size=4, norm_pix_loss=True,
                                    layer_norm_eps=1e-12 if legacy_eps else 1e-6)
    m = transformers.ViTMAEForPreTraining(cfg).eval()
    with torch.no_grad():  # every tensor away from its init (LayerNorms at (1, 0) would hide a swap)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_hf_to_umae_and_back_is_bitwise():
    hf = _hf()
    model = convert.from_hf(hf, fused=False)
    assert model.norm.eps == 1e-12  # the config's LayerNorm eps, not MAE's 1e-6
    back = convert.to_hf(model)
    _same_state(back.state_dict(), hf.state_dict())
    drop = ("transformers_version",)
    assert {k: v for k, v in back.config.to_dict().items() if k not in drop} == \
        {k: v for k, v in hf.config.to_dict().items() if k not in drop}
    again = convert.from_hf(back, fused=False)
    _same_state(again.state_dict(), model.state_dict())


def test_the_older_hub_layout_is_read():
    hf = _hf()
    legacy = {}
    for k, v in hf.state_dict().items():  # transformers 4.x names, as facebook/vit-mae-base stores them
        k = k.replace("vit.layers.", "vit.encoder.layer.").replace("attention.q_proj", "attention.attention.query")
        k = k.replace("attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense").replace("mlp.fc1", "intermediate.dense")
        legacy[k.replace("mlp.fc2", "output.dense")] = v
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    _same_state(convert.from_hf((legacy, hf.config)).state_dict(), convert.from_hf(hf).state_dict())


@pytest.mark.parametrize("source", ["hf", "umae"])
def test_same_noise_same_mask_and_loss(source):
    hf = _hf(legacy_eps=False)
    model = convert.from_hf(hf, fused=False)
    if source == "umae":  # the other direction: an umae model's HF twin
        hf = convert.to_hf(model)
    hf, model = hf.double(), model.double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 64, dtype=torch.float64)
    with torch.no_grad():
        out = hf(pixel_values=x, noise=noise)
        ours = model(x, mask_ratio=hf.config.mask_ratio, noise=noise)
    assert torch.equal(out.mask, ours.mask)
    assert_close(ours.pred, out.logits, **TOL[torch.float64], name="pred")
    assert_close(ours.loss_mae, out.loss, **TOL[torch.float64], name="loss")


def test_cli_mae_pth_to_hf_folder_and_back(tmp_path, capsys):
    hf = _hf(legacy_eps=False)
    model = convert.from_hf(hf, fused=False)
    torch.save({"model": model.state_dict()}, tmp_path / "mae.pth")  # facebookresearch/mae's own file
    # a facebookresearch/mae .pth does not record its heads: the config is named
    assert main(["convert", str(tmp_path / "mae.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "name the model's config" in capsys.readouterr().err
    import umae.models

    umae.models.CONFIGS["_test_convert"] = (32, 4, 64, 2, 2, 48, 2, 3)
    try:
        assert main(["convert", str(tmp_path / "mae.pth"), str(tmp_path / "hf"), "--to", "hf",
                     "--model", "_test_convert"]) == 0
    finally:
        del umae.models.CONFIGS["_test_convert"]
    loaded = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf")
    _same_state(loaded.state_dict(), hf.state_dict())
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--to", "mae"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    _same_state(back, model.state_dict())
    # umae's .pth records the architecture beside the weights: back to HF without --model
    assert main(["convert", str(tmp_path / "back.pth"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    _same_state(transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf2").state_dict(), hf.state_dict())


def test_unrepresentable_configs_are_refused():
    hf = _hf()
    cfg = hf.config
    cfg.decoder_intermediate_size = 100
    with pytest.raises(ValueError, match="MLP widths differ in ratio"):
        convert.from_hf(hf)
