"""umae.data.hierarchical (images with known latents at three levels), the per-level recovery metric,
`umae eval` on it, and a CI-sized `umae reproduce --preset hierarchical` sweep."""
import json
import math

import pytest
import torch

from umae.data import hierarchical as H
from umae.research import sweep
from umae.cli.main import main
from umae.research.evaluate import linear_probe


def test_generator_is_deterministic_and_sized():
    x, y, z = H.make(64, seed=3)
    x2, y2, z2 = H.make(64, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2) and all(torch.equal(z[k], z2[k]) for k in H.LEVELS)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.uint8 and int(y.max()) < H.CLASSES
    assert {k: v.shape[1] for k, v in z.items()} == H.LEVEL_DIMS
    assert not torch.equal(H.make(64, seed=4)[0], x)


def test_latents_and_images_agree():
    z = H.sample_latents(200, seed=1)
    T, theta, a, _ = H._class_layouts()
    s, phi = z["top"][:, 0].double(), torch.atan2(z["top"][:, 2], z["top"][:, 1]).double()
    center = z["top"][:, 3:5].double()
    # mid given top: each part sits at the class's offset, scaled and turned by the top latents (+ 0.04 N(0, 1))
    rot = torch.stack([torch.stack([phi.cos(), -phi.sin()], -1), torch.stack([phi.sin(), phi.cos()], -1)], -2)
    expect = center[:, None] + s[:, None, None] * torch.einsum("nij,npj->npi", rot, T[z["label"]].double())
    assert (z["pos"] - expect).abs().max() < 0.04 * 5  # 5 sd of the part jitter
    assert torch.allclose(z["mid"].view(200, H.PARTS, 5)[..., :2].double(), z["pos"], atol=1e-6)
    # pixels: far from every part, the background grey (+ pixel noise, sd 0.03); at the last part's
    # centre (drawn on top), that part's hue
    img = H.render(z).double() / 255
    lin = torch.linspace(-1, 1, H.SIZE, dtype=torch.float64)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    far = torch.stack([((xx - z["pos"][:, j, 0, None, None]) ** 2 + (yy - z["pos"][:, j, 1, None, None]) ** 2).sqrt()
                       > 1.5 * z["r"][:, j, None, None] for j in range(H.PARTS)]).all(0)
    bg = (img * far[:, None]).sum((2, 3)) / far[:, None].sum((2, 3)).clamp_min(1)
    has = far.flatten(1).any(1)
    assert (bg[has] - z["bg"][has, None]).abs().max() < 0.03  # the mean of many noisy pixels
    j = H.PARTS - 1
    col = ((z["pos"][:, j, 0] + 1) / 2 * (H.SIZE - 1)).round().long().clamp(0, H.SIZE - 1)
    row = ((z["pos"][:, j, 1] + 1) / 2 * (H.SIZE - 1)).round().long().clamp(0, H.SIZE - 1)
    rgb = img[torch.arange(200), :, row, col]
    hue = _hue(rgb)
    d = (hue - z["hue"][:, j]).abs()
    assert (torch.minimum(d, 1 - d) < 0.08).float().mean() > 0.9  # dark stripes and noise blur a few


def _hue(rgb):
    mx, mn = rgb.max(1).values, rgb.min(1).values
    r, g, b = rgb.unbind(1)
    d = (mx - mn).clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h / 6


def test_recovery_of_the_latents_themselves_and_of_noise():
    _, ytr, ztr = H.make(600, seed=0)
    _, yte, zte = H.make(300, seed=1)
    feats = lambda z: torch.cat([z[k] for k in H.LEVELS], 1)  # noqa: E731
    rec = H.recovery(feats(ztr), ytr, ztr, feats(zte), yte, zte, linear_probe)
    assert all(rec[f"r2_{lv}"] > 0.99 for lv in H.LEVELS), rec
    # noise features: held-out R^2 ~ 0 (a least-squares fit of d noise columns to n rows scores about -d / n
    # on new rows: 3 d / n bounds it)
    _, ytr, ztr = H.make(2000, seed=2)
    g, d = torch.Generator().manual_seed(0), 20
    noise = H.recovery(torch.randn(2000, d, generator=g), ytr, ztr, torch.randn(300, d, generator=g), yte, zte,
                       linear_probe)
    assert all(abs(noise[f"r2_{lv}"]) < 3 * d / 2000 for lv in H.LEVELS) and noise["class_acc"] < 0.2, noise
    onehot = torch.nn.functional.one_hot
    assert H.recovery(onehot(ytr, 10).float(), ytr, ztr, onehot(yte, 10).float(), yte, zte,
                      linear_probe)["class_acc"] == 1.0


def test_eval_reports_per_level_recovery(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", "hierarchical", "--model", "umae_vit_micro_patch4_32", "--builtin-size", "256", "--steps", "2",
            "--batch-size", "64", "--num-workers", "0", "--no-progress", "--out", str(out)]
    assert main(["train", *args]) == 0
    assert main(["eval", "--ckpt", str(out / "checkpoint-last.pt"), "--out", str(tmp_path / "eval"),
                 "--max-images", "128"]) == 0
    assert "latent recovery (held-out ridge R^2): top" in capsys.readouterr().out
    res = json.load(open(tmp_path / "eval" / "eval.json"))["results"]
    rec = res[0]["latent_recovery"]
    assert {"r2_top", "r2_mid", "r2_low", "class_acc"} <= rec.keys() and rec["true_dims"]["mid"] == 20
    assert all(math.isfinite(rec[f"r2_{lv}"]) for lv in H.LEVELS)


@pytest.mark.slow
def test_ci_sized_sweep(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.SWEEPS, "default", dict(sweep.SWEEPS["default"], ratios=(0.5, 0.75), patches=(8,),
                                                      steps=2, batch_size=32, builtin_size=128, eval_images=64))
    assert main(["reproduce", "--preset", "hierarchical", "--seeds", "2", "--out", str(tmp_path), "--no-progress",
                 "--num-workers", "0"]) == 0
    data = json.load(open(tmp_path / "sweep.json"))
    assert len(data["rows"]) == 4 * 2 * 2  # (untrained + 2 MAE ratios + U-MAE) x 2 seeds x 2 pools
    assert {(r["ratio"], r["lamb"]) for r in data["summary"]} == {(0.0, -1.0), (0.5, 0.0), (0.75, 0.0), (0.75, 0.1)}
    assert all(r["n"] == 2 and r["r2_top_sd"] >= 0 for r in data["summary"])
    report = (tmp_path / "report.md").read_text()
    assert "| U-MAE 0.1 | 8 | 0.75 | cls |" in report and "| untrained | 8 | - | cls |" in report and (tmp_path / "recovery.png").stat().st_size > 0
