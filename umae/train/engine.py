"""One training epoch (MAE's engine_pretrain.py). Nothing in the loop reads a device value
on the host except at log steps (every --log-every optimizer steps) and checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from . import checkpoint
from .lr_sched import lr_at, set_lr
from .log import DeviceStats, Logger

NOISE_SEED_STRIDE = 1_000_003  # masking noise seed = seed * stride + micro step


@dataclasses.dataclass
class Loop:
    """What the epoch loop needs, built once by main.train."""
    args: object
    model: torch.nn.Module  # the bare model (checkpoints)
    fwd: object  # what is called: the model, its DDP wrapper, or their torch.compile
    net: torch.nn.Module  # the model or its DDP wrapper (no_sync)
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int
    world: int
    num_patches: int
    total: int
    warmup: int
    lr: float
    amp_dtype: torch.dtype | None
    logger: Logger
    stats: DeviceStats
    run_info: dict


def masking_noise(loop: Loop, micro: int) -> torch.Tensor:
    """Noise per global batch from (seed, micro step); each rank takes its slice, so a DDP run
    masks as one process would and a resumed run as an unbroken one."""
    a = loop.args
    g = torch.Generator().manual_seed(a.seed * NOISE_SEED_STRIDE + micro)
    noise = torch.rand(a.batch_size * loop.world, loop.num_patches, generator=g)
    return noise[loop.rank * a.batch_size:(loop.rank + 1) * a.batch_size]


def train_one_epoch(loop: Loop, loader, epoch: int, step: int, micro: int) -> tuple[int, int]:
    """Runs the loader's batches (or up to the last step); returns (step, micro step)."""
    a = loop.args
    for imgs, _ in loader:
        noise = masking_noise(loop, micro)
        imgs, noise = imgs.to(loop.device, non_blocking=True), noise.to(loop.device, non_blocking=True)
        last = (micro + 1) % a.accum_iter == 0
        sync = contextlib.nullcontext() if (last or loop.world == 1) else loop.net.no_sync()
        with sync:
            with torch.autocast(loop.device.type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
                out = loop.fwd(imgs, a.mask_ratio, noise)
            loop.scaler.scale(out.loss / a.accum_iter).backward()
        micro += 1
        loop.logger.images(imgs.shape[0] * loop.world)
        if not last:
            continue
        set_lr(loop.opt, lr_at(step, loop.total, loop.warmup, loop.lr, a.min_lr))
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        loop.opt.zero_grad(set_to_none=True)
        step += 1
        loop.logger.step()
        loop.stats.add(out)
        if step % a.log_every == 0 or step == loop.total:
            loop.logger.log(step, epoch, loop.opt.param_groups[0]["lr"], loop.stats.read(loop.world))
        if loop.rank == 0 and ((a.ckpt_every and step % a.ckpt_every == 0) or step == loop.total):
            checkpoint.save(a.out, step, loop.model, loop.opt, loop.scaler, loop.run_info)
        if step >= loop.total:
            break
    return step, micro
