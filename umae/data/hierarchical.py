"""A data set whose generative latents are known, at three levels (Kong et al. 2023, "Understanding
Masked Autoencoders via Hierarchical Latent Variable Models"), and how linearly an encoder's
features recover each level.

The generative process of one 32x32 RGB image (a set of n images is deterministic by (n, seed)):

    top    c ~ U{0..9}, s ~ U(0.55, 0.85), phi ~ U(0, 2 pi), (cx, cy) ~ U(-0.12, 0.12)^2
           z_top = (s, cos phi, sin phi, cx, cy)                                  (class + 5 dims)
    mid    for each of P = 4 parts j:  p_j = (cx, cy) + s R(phi) T_c[j] + 0.04 e_j,
           r_j = s (a_c + 0.05 u_j),  psi_j = phi + theta_c[j] + 0.3 v_j
           z_mid = (p_j, r_j, cos psi_j, sin psi_j)_j                              (20 dims)
    low    for each part: hue h_j ~ U(0, 1), stripe frequency f_j = (1 + 1.5 w_j) / r_j,
           stripe phase rho_j ~ U(0, 2 pi); background grey b ~ U(0.15, 0.45)
           z_low = (cos 2 pi h_j, sin 2 pi h_j, f_j r_j, cos rho_j, sin rho_j)_j, b  (21 dims)
    pixels part j covers the pixels inside its shape (class c's: disc, square or diamond, of
           radius r_j, turned by psi_j) with colour HSV(h_j, 0.75, 0.55 + 0.4 stripe), stripe =
           cos(2 pi f_j <x - p_j, (cos psi_j, sin psi_j)> + rho_j); later parts cover earlier
           ones; elsewhere grey b; + N(0, 0.03^2) pixel noise; rounded to uint8.

T_c (4 part offsets), theta_c (part angles), a_c (part size) and the shape are fixed per class:
the class decides the parts' layout (high level), the mid latents where each part lands, the
low latents each part's colour and texture. e, u, v, w are standard normal / uniform draws.
Every image ships with z_top (with its class), z_mid and z_low.
"""
from __future__ import annotations

import math

import torch

CLASSES, PARTS, SIZE = 10, 4, 32
LEVELS = ("top", "mid", "low")
# the dimension of each level's continuous latents (top also has the class)
LEVEL_DIMS = {"top": 5, "mid": 5 * PARTS, "low": 5 * PARTS + 1}


def _class_layouts():
    """Per class: part offsets T (10, P, 2), part angles theta (10, P), part size a (10,), shape id (10,)."""
    g = torch.Generator().manual_seed(1234)  # fixed: a property of the data set, not of a draw
    ang = torch.rand(CLASSES, PARTS, generator=g) * 2 * math.pi
    rad = 0.35 + 0.4 * torch.rand(CLASSES, PARTS, generator=g)
    T = torch.stack([rad * ang.cos(), rad * ang.sin()], dim=-1)
    theta = torch.rand(CLASSES, PARTS, generator=g) * 2 * math.pi
    a = 0.3 + 0.15 * torch.rand(CLASSES, generator=g)
    return T, theta, a, torch.arange(CLASSES) % 3


def sample_latents(n: int, seed: int = 0) -> dict:
    """The latents of n images: class (n,), top (n, 5), mid (n, 20), low (n, 21), and what rendering
    needs (part positions, sizes, angles, hues, frequencies, phases, background)."""
    g = torch.Generator().manual_seed(seed)
    T, theta, a, _ = _class_layouts()
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    c = torch.randint(0, CLASSES, (n,), generator=g)
    s, phi = 0.55 + 0.3 * u(n), 2 * math.pi * u(n)
    center = (u(n, 2) - 0.5) * 0.24
    rot = torch.stack([torch.stack([phi.cos(), -phi.sin()], -1), torch.stack([phi.sin(), phi.cos()], -1)], -2)
    offs = torch.einsum("nij,npj->npi", rot, T[c].double())
    pos = center[:, None] + s[:, None, None] * offs + 0.04 * torch.randn(n, PARTS, 2, generator=g, dtype=torch.float64)
    r = s[:, None] * (a[c].double()[:, None] + 0.05 * u(n, PARTS))
    psi = phi[:, None] + theta[c].double() + 0.3 * torch.randn(n, PARTS, generator=g, dtype=torch.float64)
    hue, freq, rho = u(n, PARTS), (1 + 1.5 * u(n, PARTS)) / r, 2 * math.pi * u(n, PARTS)
    bg = 0.15 + 0.3 * u(n)
    top = torch.stack([s, phi.cos(), phi.sin(), center[:, 0], center[:, 1]], 1)
    mid = torch.cat([pos, r[..., None], psi.cos()[..., None], psi.sin()[..., None]], -1).flatten(1)
    low = torch.cat([torch.stack([(2 * math.pi * hue).cos(), (2 * math.pi * hue).sin(), freq * r, rho.cos(),
                                  rho.sin()], -1).flatten(1), bg[:, None]], 1)
    return dict(label=c, top=top.float(), mid=mid.float(), low=low.float(), pos=pos, r=r, psi=psi, hue=hue,
                freq=freq, rho=rho, bg=bg, seed=seed)


def _hsv(h, s, v):
    """HSV -> RGB, elementwise (the last dim of the result is RGB)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v[..., None] - v[..., None] * s * (torch.minimum(k, 4 - k).clamp(0, 1))


def render(z: dict) -> torch.Tensor:
    """The images (n, 3, 32, 32) uint8 of latents `z` (sample_latents)."""
    n = len(z["label"])
    shape = _class_layouts()[3][z["label"]]
    lin = torch.linspace(-1, 1, SIZE, dtype=torch.float64)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    img = z["bg"][:, None, None, None].expand(n, SIZE, SIZE, 3).clone()
    for j in range(PARTS):
        dx, dy = xx[None] - z["pos"][:, j, 0, None, None], yy[None] - z["pos"][:, j, 1, None, None]
        c, s = z["psi"][:, j].cos()[:, None, None], z["psi"][:, j].sin()[:, None, None]
        u, v = c * dx + s * dy, -s * dx + c * dy  # part coordinates
        r = z["r"][:, j, None, None]
        inside = torch.stack([u ** 2 + v ** 2 < r ** 2, (u.abs() < r * 0.85) & (v.abs() < r * 0.85),
                              u.abs() + v.abs() < r * 1.2], 0)[shape, torch.arange(n)]
        stripe = torch.cos(2 * math.pi * z["freq"][:, j, None, None] * u + z["rho"][:, j, None, None])
        rgb = _hsv(z["hue"][:, j, None, None].expand_as(u), torch.tensor(0.75, dtype=torch.float64),
                   0.55 + 0.4 * stripe)
        img = torch.where(inside[..., None], rgb, img)
    g = torch.Generator().manual_seed(z["seed"] + 99)
    img = img + 0.03 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 3, 1, 2).contiguous()


def make(n: int, seed: int = 0):
    """(images (n, 3, 32, 32) uint8, class labels (n,), latents {"top", "mid", "low"} float32)."""
    z = sample_latents(n, seed)
    return render(z), z["label"], {k: z[k] for k in LEVELS}


# ---- how linearly features recover each level --------------------------------------------

def ridge_r2(xtr, ztr, xte, zte, alpha: float = 1e-2) -> float:
    """Held-out R^2 of a ridge regression from features x to latents z (both standardized on the
    training split; alpha relative to the number of training rows), averaged over z's dimensions."""
    xtr, xte, ztr, zte = (t.double() for t in (xtr, xte, ztr, zte))
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    zmu, zsd = ztr.mean(0), ztr.std(0).clamp_min(1e-8)
    ztr, zte = (ztr - zmu) / zsd, (zte - zmu) / zsd
    d = xtr.shape[1]
    w = torch.linalg.solve(xtr.T @ xtr + alpha * len(xtr) * torch.eye(d, dtype=xtr.dtype), xtr.T @ ztr)
    res = (zte - xte @ w).pow(2).sum(0)
    tot = (zte - zte.mean(0)).pow(2).sum(0).clamp_min(1e-12)
    return float((1 - res / tot).mean())


def recovery(xtr, ltr, ztr: dict, xte, lte, zte: dict, probe) -> dict:
    """Per level: R^2 of the continuous latents (ridge), and for the top level also the class
    probe accuracy (`probe`: umae.research.evaluate.linear_probe); with each level's true dimension."""
    out = {f"r2_{lv}": ridge_r2(xtr, ztr[lv], xte, zte[lv]) for lv in LEVELS}
    out["class_acc"] = probe(xtr, ltr, xte, lte)
    out["true_dims"] = dict(LEVEL_DIMS, top_classes=CLASSES)
    return out


def sample_grid(path: str, rows: int = 4, cols: int = 10, seed: int = 0) -> None:
    """A PNG of sample images, one column per class (docs/hierarchical_samples.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, _ = make(rows * cols * 4, seed)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.0))
    for c in range(cols):
        idx = (y == c).nonzero().flatten()[:rows]
        for r, i in enumerate(idx.tolist()):
            axes[r, c].imshow(x[i].permute(1, 2, 0).numpy())
        for r in range(rows):
            axes[r, c].axis("off")
        axes[0, c].set_title(f"class {c}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
