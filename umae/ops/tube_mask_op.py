"""VideoMAE's tube masking (MCG-NJU/VideoMAE `TubeMaskingGenerator`): one spatial mask per clip,
repeated over its tubelets, drawn on the device without a host sync; the same function on CPU
serves data loaders (the video ops check the masks they take with `_common.video_mask`)."""
from __future__ import annotations

import torch

from . import _common


def tube_mask(batch: int, tubelets: int, height: int, width: int, ratio: float,
              generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """bool (batch, tubelets * height * width), True = masked, tokens ordered (t, h, w).

    Each row masks int(ratio * height * width) positions of its spatial grid, drawn uniformly
    without replacement, at every tubelet (so every row masks the same count: what VideoMAE's
    loss and decoder need). `height` and `width` count patches. The draw is torch.rand of the
    generator (or torch's default one) on `device` (the generator's device by default), ranked on
    the device: no host sync, and the same seed gives the same mask on the same device type.
    """
    dims = [_common.as_int(v) for v in (batch, tubelets, height, width)]
    if any(v is None or v < 0 for v in dims) or any(v == 0 for v in dims[1:]):
        raise ValueError(f"batch must be a non-negative int and tubelets, height and width positive ints, got "
                         f"{batch!r}, {tubelets!r}, {height!r}, {width!r}")
    r = _common.as_float(ratio)
    if r is None or not 0 <= r < 1:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    B, t, h, w = dims
    if device is None:
        device = generator.device if generator is not None else "cpu"
    hw = h * w
    n_masked = int(r * hw)
    noise = torch.rand(B, hw, generator=generator, device=device)
    # the n_masked smallest draws are masked: a position's rank is its place in the row's order
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    spatial = rank < n_masked
    return spatial.unsqueeze(1).expand(B, t, hw).reshape(B, t * hw)
