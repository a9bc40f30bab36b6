"""The training steps (MAE's engine_pretrain.py). Nothing in the loop reads a device value on
the host except at log steps (every --log-every optimizer steps) and checkpoints: the loss
statistics are read there, and a non-finite loss since the last read stops the run before
anything is saved (NonFiniteLoss), as MAE's per-step check would, without its per-step sync."""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from . import checkpoint
from .lr_sched import lr_at, set_lr
from .config import TrainConfig
from .log import LOSS_FIELDS, DeviceStats, Logger


class NonFiniteLoss(RuntimeError):
    """The loss was not finite: the run stopped; the last checkpoint is the last good state."""

NOISE_SEED_STRIDE = 1_000_003  # masking noise seed = seed * stride + micro step


@dataclasses.dataclass
class Loop:
    """What the epoch loop needs, built once by main.train."""
    cfg: TrainConfig  # the run's settings
    model: torch.nn.Module  # the bare model (checkpoints)
    fwd: object  # what is called: the model, its DDP wrapper, or their torch.compile
    net: torch.nn.Module  # the model, its DDP wrapper, or the model sharded by FSDP2 (no_sync)
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int
    world: int
    num_patches: int
    total: int
    warmup: int
    lr: float
    batches_per_epoch: int
    amp_dtype: torch.dtype | None
    logger: Logger
    stats: DeviceStats
    run_info: dict
    num_masked: int | None = None  # video models: the tube mask's count per clip (the loader draws the masks)
    last_ckpt: tuple | None = None  # (path, step) of the last checkpoint saved or resumed from
    last_read: int = 0  # the step of the last statistics read


def masking_noise(loop: Loop, micro: int) -> torch.Tensor:
    """Noise per global batch from (seed, micro step); each rank takes its slice, so a DDP run
    masks as one process would and a resumed run as an unbroken one."""
    a = loop.cfg
    g = torch.Generator().manual_seed((a.seed * NOISE_SEED_STRIDE + micro) % (1 << 63))  # any --seed fits
    noise = torch.rand(a.batch_size * loop.world, loop.num_patches, generator=g)
    return noise[loop.rank * a.batch_size:(loop.rank + 1) * a.batch_size]


def last_checkpoint(loop: Loop) -> str:
    return (f"{loop.last_ckpt[0]} (step {loop.last_ckpt[1]})" if loop.last_ckpt else
            "none (the run saved no checkpoint before this)")


def check_finite(loop: Loop, step: int, stats: dict, grads_finite: bool = True, weights_finite: bool = True) -> None:
    bad = [k for k in LOSS_FIELDS if k in stats and not math.isfinite(stats[k])]
    if not bad and grads_finite and not weights_finite:  # finite losses and gradients, an update that overflowed
        raise NonFiniteLoss(
            f"the weights are not finite after the update of step {step} (the loss and the gradient were finite: the "
            f"lr or the weight decay overflowed them). Stopped without saving; the last checkpoint: "
            f"{last_checkpoint(loop)}. Resume from it with a lower --lr / --blr or --weight-decay.")
    if not bad and not grads_finite:  # a finite loss, a NaN or inf gradient
        raise NonFiniteLoss(
            f"the gradient is not finite (a NaN or inf in some parameter's gradient, the loss finite) at a step in "
            f"{loop.last_read + 1}..{step}. Stopped without saving; the last checkpoint: {last_checkpoint(loop)}. "
            "Resume from it with a lower --blr or --lr, --clip-grad (e.g. 1.0), or --amp bf16 instead of fp16.")
    if not bad:
        return
    terms = ", ".join(f"{k} {stats[k]:.4g}" for k in LOSS_FIELDS if k in stats)
    last = last_checkpoint(loop)
    raise NonFiniteLoss(
        f"the loss is not finite ({', '.join(bad)}) at a step in {loop.last_read + 1}..{step}; means over those "
        f"steps: {terms}. Stopped without saving; the last checkpoint: {last}. Resume from it with a lower "
        "--blr or --lr, --clip-grad (e.g. 1.0), or --amp bf16 instead of fp16.")


@contextlib.contextmanager
def _no_sync(net):
    """No gradient reduction for this micro-batch (accumulation): DDP's no_sync, FSDP2's switch."""
    if hasattr(net, "no_sync"):
        with net.no_sync():
            yield
        return
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def skip_nonfinite_step(loop: Loop, nonfinite) -> None:
    """A step whose gradient is not finite does not reach the weights: the fused AdamW skips its
    update on the device where `found_inf` is 1 (GradScaler's mechanism, no host sync); the run
    stops at the next read, with the loss's or the gradient's message."""
    if nonfinite is None or not loop.opt.defaults.get("fused"):
        return
    if loop.world > 1 and getattr(loop.cfg, "fsdp", False):  # each rank holds shards: all skip together
        import torch.distributed as dist

        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
    loop.opt.found_inf = nonfinite


def train_steps(loop: Loop, loader, step: int, micro: int) -> tuple[int, int]:
    """Runs the loader's batches up to the last step; returns (step, micro step)."""
    a = loop.cfg
    probe = "probe_acc" in loop.stats.fields
    for imgs, *masks, labels in loader:
        epoch = micro // loop.batches_per_epoch
        imgs = imgs.to(loop.device, non_blocking=True)
        if masks:  # a video model's clips and their tube masks, drawn in the loader; the count known
            args = (masks[0].to(loop.device, non_blocking=True), loop.num_masked)
        else:
            noise = masking_noise(loop, micro).to(loop.device, non_blocking=True)
            args = (a.mask_ratio, noise, *((labels.to(loop.device, non_blocking=True),) if probe else ()))
        last = (micro + 1) % a.accum_iter == 0
        sync = contextlib.nullcontext() if (last or loop.world == 1) else _no_sync(loop.net)
        with sync:
            with torch.autocast(loop.device.type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
                out = loop.fwd(imgs, *args)
            loop.scaler.scale(out.loss / a.accum_iter).backward()
        # every micro-batch's losses reach the statistics: a NaN in any of them (not only the
        # last) stops the run at the next read, before a checkpoint of its NaN parameters
        loop.stats.add_micro(out, imgs.shape[0], 1 / a.accum_iter)
        micro += 1
        loop.logger.images(imgs.shape[0] * loop.world)
        if not last:
            continue
        set_lr(loop.opt, lr_at(step, loop.total, loop.warmup, loop.lr, a.min_lr))
        grad_norm = None
        if a.clip_grad is not None:  # on the true gradient: unscaled first (fp16)
            loop.scaler.unscale_(loop.opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), a.clip_grad)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the norm over every rank's shards
                grad_norm = grad_norm.full_tensor()
        if not loop.scaler.is_enabled():  # fp16's scaler skips a step whose gradient is not finite itself
            skip_nonfinite_step(loop, loop.stats.add_grads([p.grad for p in loop.model.parameters()
                                                           if p.grad is not None]))
        loop.scaler.step(loop.opt)
        loop.opt.__dict__.pop("found_inf", None)  # this step's flag only
        loop.scaler.update()
        loop.opt.zero_grad(set_to_none=True)
        step += 1
        loop.logger.step()
        loop.stats.add_step(grad_norm)
        save = (a.ckpt_every and step % a.ckpt_every == 0) or step == loop.total
        if save:  # what is saved must be finite: read with the losses below
            loop.stats.add_weights(list(loop.model.parameters()))
        if step % a.log_every == 0 or save:  # every rank reads (all-reduced): all stop together
            stats = loop.stats.read(loop.world)
            grads_finite, weights_finite = stats.pop("grads_finite"), stats.pop("weights_finite")
            loop.logger.log(step, epoch, loop.opt.param_groups[0]["lr"], stats)
            check_finite(loop, step, stats, grads_finite, weights_finite)
            loop.last_read = step
        states = checkpoint.full_states(loop.model, loop.opt, a.fsdp and loop.world > 1) if save else None  # FSDP: every rank
        if save and loop.rank == 0:
            try:
                path = checkpoint.save(a.out, step, states, loop.scaler, loop.run_info, loop.model.arch_config())
            except OSError as e:  # disk full, ...: say which checkpoint is still the last good one
                raise OSError(e.errno, f"{e.strerror}; the last checkpoint, intact: {last_checkpoint(loop)}",
                              e.filename) from e
            loop.last_ckpt = (path, step)
        if step >= loop.total:
            break
    return step, micro
