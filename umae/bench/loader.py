"""`umae bench --ops loader`: images/s of the training input pipeline alone (decode, MAE's
augmentation, collate; no model), with 0 workers and with the machine's cores, on the builtin
data and on an ImageFolder of JPEGs written for the run. A CPU measurement on any machine: the
loader runs on the host."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .._table import Col, format_table

OP = "loader"
# shape -> the data, the model's image size, the batch, the images per pass
SHAPES = {
    "builtin32": dict(data="builtin", size=32, batch=128, images=2048),
    # ImageNet-like files: 500 x 375 JPEGs (quality 90), cropped and resized to 224
    "jpeg224": dict(data="jpeg", size=224, batch=64, images=384, hw=(375, 500)),
}


def write_jpeg_folder(path: str, n: int, hw=(375, 500), classes: int = 4, seed: int = 0) -> str:
    """n smooth-plus-noise RGB JPEGs in `classes` class folders (an ImageFolder)."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c in range(classes):
        os.makedirs(os.path.join(path, f"class{c}"), exist_ok=True)
    for i in range(n):
        smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=hw, mode="bicubic")[0]
        a = ((smooth * 200 + 30 * torch.rand(3, *hw, generator=g)).clamp(0, 255)).to(torch.uint8)
        Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).numpy())).save(
            os.path.join(path, f"class{i % classes}", f"{i:05d}.jpg"), quality=90)
    return path


def time_loader(data_module, ds, size: int, batch: int, workers: int) -> dict:
    """One pass over ds: time to the first batch (the workers' start) and images/s after it.
    data_module: umae.data, or another version of it (the before / after comparison)."""
    aug = data_module.Augmented(ds, size, seed=0)
    loader = torch.utils.data.DataLoader(aug, batch_size=batch, shuffle=False, drop_last=True, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    it = iter(loader)
    x, _ = next(it)
    t1 = time.perf_counter()
    n = 0
    for x, _ in it:
        n += x.shape[0]
    t2 = time.perf_counter()
    return dict(first_batch_ms=(t1 - t0) * 1e3, img_per_s=n / max(t2 - t1, 1e-9), dtype=str(x.dtype),
                sample=tuple(x.shape[1:]))


def open_shape(data_module, name: str, tmp: str):
    s = SHAPES[name]
    if s["data"] == "jpeg":
        return data_module.open_dataset(write_jpeg_folder(os.path.join(tmp, name), s["images"], s["hw"]))
    return data_module.open_dataset("builtin", True, builtin_size=s["images"])


def rows(shapes=None, workers=None, data_module=None):
    """One row per (shape, workers)."""
    from .. import data
    from ..runtime import default_workers

    D = data_module or data
    workers = workers or sorted({0, default_workers()})
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes or SHAPES:
            if name not in SHAPES:
                continue
            s, ds = SHAPES[name], open_shape(D, name, tmp)
            for w in workers:
                timed = time_loader(D, ds, s["size"], s["batch"], w)
                yield dict(op=OP, shape=name, workers=w, batch=s["batch"], **timed)


COLUMNS = [Col("op", "op", width=8, align="<"), Col("shape", "shape", width=10, align="<"), Col("workers", "workers"),
           Col("batch", "batch"), Col("first batch ms", "first_batch_ms", ".1f"), Col("img/s", "img_per_s", ".0f", 9)]


def format_rows(rs) -> str:
    return format_table(rs, COLUMNS)
