"""Setup of a training run (MAE's main_pretrain.py) from its TrainConfig (config.py): processes
and devices, model, data, optimizer and resume, then the epochs; `umae train`'s `main`.

AdamW (betas 0.9/0.95, weight decay 0.05 except 1-d parameters and biases, MAE's rule, through
timm's param_groups_weight_decay; fused: a non-finite step skipped on the device), lr = blr * effective batch /
256, gradient accumulation, optional gradient clipping, AMP (bf16 by default on GPUs that have
it, or fp16 with a grad scaler; TF32 matmuls on CUDA), torchrun DDP with the uniformity loss
over the global batch, U-MAE's online linear probe, a stop on a non-finite loss, exact resume.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from .. import data as D
from ..data import video as V
from ..models import is_video
from .._files import check_recorded_config, load_weights, read_checkpoint
from ..runtime import adamw_impl, default_workers
from . import checkpoint
from .config import CHANGEABLE, RESUME_KEYS, TrainConfig, add_args, check_range, open_out, parse_device, validate
from .engine import Loop, train_steps
from .log import DeviceStats, Logger, check_log

__all__ = ["CHANGEABLE", "RESUME_KEYS", "TrainConfig", "add_args", "adamw_impl", "check_range", "default_workers",
           "check_fresh_out", "lock_out", "main", "param_groups", "parse_device", "resolve_amp", "train", "validate"]

HELP = "MAE / U-MAE pretraining (torchrun for DDP)"


def _canonical(key: str, value):
    """A setting as recorded and compared on resume: --data folders by where they are (realpath),
    not how they were typed. A checkpoint from before the record was canonical holds the path
    as typed: it is resolved from the current directory, as it was compared then."""
    if key == "data" and isinstance(value, str) and value not in D.NAMED_SETS:
        return os.path.realpath(value)
    return value


def lock_out(out: str) -> int:
    """Creates --out and holds an exclusive lock on its .lock for the run: a second writer into
    the same folder is refused (it would replace the checkpoints and interleave log.jsonl). A
    flock dies with its process, so a killed run leaves no stale lock. Returns the lock's fd."""
    import fcntl

    fd = open_out(out, ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise ValueError(f"--out {out!r} is in use by another umae train run"
                         + (f" (pid {holder})" if holder else "") + "; wait for it or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    for f in os.listdir(out):  # a checkpoint a killed run was writing: under the lock, no one is
        if f.startswith("checkpoint-") and f.endswith(".pt.tmp"):
            os.remove(os.path.join(out, f))
    return fd


def _held(out: str) -> list[str]:
    """What a run left in --out: its checkpoints and a non-empty log.jsonl."""
    if not os.path.isdir(out):
        return []
    names = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-") and f.endswith(".pt"))
    log = os.path.join(out, "log.jsonl")
    return names + (["log.jsonl"] if os.path.isfile(log) and os.path.getsize(log) > 0 else [])


def check_fresh_out(cfg: TrainConfig) -> None:
    """A fresh run (no --resume) into an --out that holds another run's checkpoints or log.jsonl
    is refused (it would truncate that log and mix the two runs' checkpoints), unless --overwrite:
    then they (and its TensorBoard events) are removed first. A resumed run continues in the folder of
    its checkpoint: into an --out that holds a run and is not that folder, it is refused too (its log
    would lose records and the two runs' checkpoints would mix). Rank 0 only: it writes the folder."""
    held = _held(cfg.out)
    if not held:
        return
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    if cfg.resume:
        home = os.path.dirname(os.path.abspath(cfg.resume))
        if os.path.realpath(home) != os.path.realpath(cfg.out):
            raise ValueError(f"--out {cfg.out!r} holds another run ({shown}), and --resume {cfg.resume!r} is not one "
                             f"of its checkpoints: resume into the checkpoint's own folder (--out {home}) or choose an "
                             "empty --out")
        return
    if not cfg.overwrite:
        raise ValueError(f"--out {cfg.out!r} holds another run ({shown}): continue it with --resume "
                         f"{os.path.join(cfg.out, checkpoint.LAST)}, choose another --out, or pass --overwrite "
                         "to delete its log and checkpoints first")
    for f in os.listdir(cfg.out):
        if f == "log.jsonl" or (f.startswith("checkpoint-") and (f.endswith(".pt") or f.endswith(".pt.tmp"))):
            os.remove(os.path.join(cfg.out, f))
    tb = os.path.join(cfg.out, "tb")
    if os.path.isdir(tb):
        for f in os.listdir(tb):
            if f.startswith("events.out.tfevents."):
                os.remove(os.path.join(tb, f))


def _numbered(out: str) -> dict[int, str]:
    """{step: path} of the numbered checkpoints in out."""
    import re

    found = (re.fullmatch(r"checkpoint-(\d+)\.pt", f) for f in (os.listdir(out) if os.path.isdir(out) else ()))
    return {int(m.group(1)): os.path.join(out, m.group(0)) for m in found if m}


def later_checkpoints(cfg: TrainConfig, step: int) -> list[str]:
    """A resume from step `step` into its own run's folder, which holds checkpoints of later steps:
    the resumed run would replace them (and the log's records after `step`). Refused unless
    --overwrite; with it, returns them (rank 0 removes them once every check has passed:
    drop_later). Every rank decides alike (they read the same folder): all stop, or none."""
    if os.path.realpath(os.path.dirname(os.path.abspath(cfg.resume))) != os.path.realpath(cfg.out):
        return []
    numbered = _numbered(cfg.out)
    later = [numbered[k] for k in sorted(numbered) if k > step]
    if later and not cfg.overwrite:
        # the newest by its number: checkpoint-last.pt may lag it (a kill between the save and its link)
        raise ValueError(f"--resume {cfg.resume!r} is at step {step}, and --out {cfg.out!r} holds the run's later "
                         f"checkpoints ({', '.join(map(os.path.basename, later))}): resuming there would replace them "
                         f"and its log after step {step}. Resume from {later[-1]} to continue the run, give another "
                         "--out to branch from this step, or pass --overwrite to replace them")
    return later


def drop_later(cfg: TrainConfig, later: list[str]) -> None:
    """Removes the later checkpoints of an --overwrite resume; checkpoint-last.pt then is the resumed one."""
    if later:
        for path in later:
            os.remove(path)
        checkpoint.link_last(cfg.out, os.path.realpath(cfg.resume))


def _lock_on_rank0(cfg: TrainConfig, rank: int, world: int):
    """Rank 0 holds the lock (the other ranks write nothing) and checks that a fresh run's --out
    holds no other run (check_fresh_out); every rank learns whether it may go on, so a refused run
    stops on all ranks instead of leaving them waiting for rank 0."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = lock_out(cfg.out)
            check_fresh_out(cfg)
            if cfg.resume:  # the log the resumed run rewrites: damaged, it stops every rank here
                check_log(os.path.join(cfg.out, "log.jsonl"))
        except ValueError as e:
            err = e
            if lock is not None:
                os.close(lock)
                lock = None
    if world > 1:
        import torch.distributed as dist

        msg = [None if err is None else str(err)]
        dist.broadcast_object_list(msg, src=0)
        if msg[0] is not None and err is None:
            err = ValueError(f"rank 0 stopped the run: {msg[0]}")
    if err is not None:
        raise err
    return lock


TOKENS = ("cls_token", "mask_token")


def param_groups(model, weight_decay, decay_tokens=True):
    """MAE's rule (its add_weight_decay, timm's param_groups_weight_decay): no decay on 1-d
    parameters and biases. decay_tokens=False also exempts cls_token and mask_token (as timm's
    ViTs' no_weight_decay, and umae before 0.2)."""
    from timm.optim import param_groups_weight_decay

    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=() if decay_tokens else TOKENS)


def init_distributed() -> tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def make_optimizer(model, cfg: TrainConfig, lr, device):
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_tokens), lr=lr, betas=(0.9, 0.95),
                             **adamw_impl(device))


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto': bf16 on a CUDA device that supports it (SDPA then reaches its flash kernel), fp32
    elsewhere (the CPU stays fp32 unless asked)."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"


def train(cfg: TrainConfig) -> list[dict]:
    """Runs training; returns the logged records (rank 0; other ranks: empty). `cfg`: a
    TrainConfig, or parsed `umae train` flags (converted). `cfg` itself is not changed."""
    from .. import models  # noqa: F401  (registers the models with timm)

    cfg = TrainConfig.from_args(cfg)
    validate(cfg)
    rank, world = init_distributed()
    device = pick_device(cfg)
    lock = _lock_on_rank0(cfg, rank, world)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if lock is not None:
            os.close(lock)


def main(args) -> int:
    """`umae train`."""
    cfg = TrainConfig.from_args(args)
    recs = train(cfg)
    if recs:
        unit = "clips/s" if is_video(cfg.model) else "img/s"  # the log's img_per_s counts samples
        print(f"done: {recs[-1]['step']} steps, loss {recs[-1]['loss']:.4f}, {recs[-1]['img_per_s']:.0f} {unit}; "
              f"checkpoints and log.jsonl in {cfg.out}")
    return 0


def check_lr(cfg: TrainConfig, lr: float) -> None:
    """The peak lr (--lr, or --blr's) with --min-lr and --weight-decay: the schedule anneals from lr down to
    min_lr (above it, it would climb), and AdamW's decoupled decay multiplies every weight by
    1 - lr x weight_decay per step (above 1 it flips their signs; at 1e40 it overflowed them at once)."""
    source = "--lr" if cfg.lr is not None else f"--blr's lr ({cfg.blr:g} x global batch / 256)"
    if cfg.min_lr > lr:
        raise ValueError(f"--min-lr {cfg.min_lr:g} is above the peak lr {lr:g} ({source}): the schedule anneals "
                         "from the lr down to --min-lr")
    if lr * cfg.weight_decay > 1:
        raise ValueError(f"--weight-decay {cfg.weight_decay:g} with the peak lr {lr:g} ({source}): AdamW multiplies "
                         f"every weight by 1 - lr x weight_decay = {1 - lr * cfg.weight_decay:.3g} per step, which "
                         "flips (and past 2 grows) them; lr x weight_decay must be at most 1")


def _check_resume(cfg: TrainConfig, prev: dict, run_info: dict, step: int, total: int) -> None:
    """Refuses a resume that would change the model's structure, or (unless --resume-override
    names them) the run's settings, or that has nothing left to train; records the overrides."""
    differ = [k for k in RESUME_KEYS if k in prev and prev[k] != run_info[k]]
    if differ:
        raise ValueError(f"--resume {cfg.resume!r}: the checkpoint was trained with "
                         + ", ".join(f"{k}={prev[k]!r}" for k in differ) + "; this run has "
                         + ", ".join(f"{k}={run_info[k]!r}" for k in differ))
    allowed = cfg.overrides()
    changed = [k for k in CHANGEABLE if k in prev and _canonical(k, prev[k]) != _canonical(k, run_info[k])]
    if ("world_size" in changed and prev.get("global_batch") == run_info["global_batch"]
            and "accum_iter" not in changed and run_info["exact_ddp_grad"]):
        # another number of processes, each micro step's batch across them the same (so the same data per
        # step, epochs, lr); not with --no-exact-ddp-grad, whose uniformity gradient scales with 1 / processes
        allowed = allowed + ["world_size", "batch_size"]
        run_info["resume_note"] = (
            f"resuming a {prev['world_size']}-process run in {run_info['world_size']}: its global batch of "
            f"{run_info['global_batch']} kept (--batch-size {run_info['batch_size']} x {run_info['world_size']} "
            f"processes x --accum-iter {run_info['accum_iter']}), lr {run_info['lr']:g}")
    refused = [k for k in changed if k not in allowed]
    if refused:
        said = [f"{prev[k]} processes (this run: {run_info[k]})" if k == "world_size" else
                f"--{k.replace('_', '-')} {prev[k]!r} (this run: {run_info[k]!r})" for k in refused]
        how = "pass the checkpoint's values"
        if "world_size" in refused:
            said[refused.index("world_size")] += (f", a global batch of {prev.get('global_batch', '?')} (this run: "
                                                  f"{run_info['global_batch']})")
            per = run_info["world_size"] * prev.get("accum_iter", run_info["accum_iter"])
            how = f"run {prev['world_size']} processes" + (
                f", keep the global batch with --batch-size {prev['global_batch'] // per}"
                + (f" --accum-iter {prev['accum_iter']}" if prev.get("accum_iter") != run_info["accum_iter"] else "")
                if prev.get("global_batch", 0) % per == 0 and run_info["exact_ddp_grad"] else "")
        raise ValueError(f"--resume {cfg.resume!r}: the checkpoint's run has " + ", ".join(said) + f"; {how}, or "
                         "pass --resume-override " + ",".join(refused) + " to change them")
    run_info["resume_overrides"] = list(prev.get("resume_overrides", [])) + (
        [dict(step=step, **{k: [prev[k], run_info[k]] for k in changed})] if changed else [])
    if step >= total:
        raise ValueError(f"--resume {cfg.resume!r} is at step {step}, and this run ends at step {total} ("
                         + (f"--steps {cfg.steps}" if cfg.steps else f"--epochs {cfg.epochs}")
                         + "): nothing left to train; pass a larger --steps")


def _read_resume(cfg: TrainConfig, device: torch.device):
    """(the checkpoint to resume from or None, its run record, the config with `amp` and
    `decay_tokens` resolved: auto amp for the device, decay_tokens as the checkpoint chose)."""
    ck = read_checkpoint(cfg.resume, "--resume") if cfg.resume else None
    if ck:
        checkpoint.check_resumable(ck, cfg.resume)
    prev = (ck.get("run") or {}) if ck else {}
    decay_tokens = cfg.decay_tokens
    if decay_tokens is None:  # a checkpoint from before the rule recorded it had tokens exempt
        # MCG-NJU's optimizer exempts the mask token (its no_weight_decay); MAE's decays it
        decay_tokens = prev.get("decay_tokens", False) if ck else not is_video(cfg.model)
    return ck, prev, dataclasses.replace(cfg, amp=resolve_amp(cfg.amp, device), decay_tokens=decay_tokens)


def _run_info(cfg: TrainConfig, probe_classes: int, world: int, lr: float) -> dict:
    """What the checkpoints record of the run (and a resume compares): its settings, the number of
    processes and what derives from it, the global batch per optimizer step and the peak lr."""
    return dict(model=cfg.model, fused=cfg.fused, lamb=cfg.lamb, mask_ratio=cfg.mask_ratio,
                data=_canonical("data", cfg.data),
                builtin_size=cfg.builtin_size, seed=cfg.seed, norm_pix_loss=cfg.norm_pix_loss,
                cls_double_norm=cfg.cls_double_norm, probe_classes=probe_classes,
                decay_tokens=cfg.decay_tokens, amp=cfg.amp, batch_size=cfg.batch_size, accum_iter=cfg.accum_iter,
                world_size=world, global_batch=cfg.batch_size * world * cfg.accum_iter, lr=lr,
                exact_ddp_grad=cfg.exact_ddp_grad, fsdp=cfg.fsdp,
                **(dict(sampling_rate=cfg.sampling_rate) if is_video(cfg.model) else {}))


def _make_loader(cfg: TrainConfig, aug, sampler, step: int, total: int, device) -> tuple:
    """(one loader for the rest of the run, its workers alive across epochs; the micro step it starts at)."""
    micro = step * cfg.accum_iter
    sampler.epoch, sampler.start_batch = divmod(micro, sampler.batches_per_epoch())
    sampler.num_batches = (total - step) * cfg.accum_iter
    workers = default_workers() if cfg.num_workers is None else cfg.num_workers
    loader = torch.utils.data.DataLoader(aug, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    return loader, micro


def _distributed(model, world: int, device, fsdp: bool):
    """The model in DDP when there are several processes (the uniformity loss then over the global
    batch), or sharded by FSDP2 (fully_shard per encoder and decoder block, then the rest): each
    rank holds a shard of the parameters, gradients and optimizer state. Both average the ranks'
    gradients, so the uniformity term's exact_ddp_grad scaling holds for either."""
    if world == 1:
        return model
    import torch.distributed as dist

    model.unif_process_group = dist.group.WORLD
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for blk in [*model.blocks, *model.decoder_blocks]:
            fully_shard(blk)
        return fully_shard(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _schedule(cfg: TrainConfig, n_images: int, world: int) -> tuple:
    """(the sampler's global batch per micro step, batches per epoch, optimizer steps, peak lr), checked."""
    gb = cfg.batch_size * world
    if n_images < gb:
        raise ValueError(f"the data set has {n_images} images, fewer than one global batch ({gb})")
    batches_per_epoch = n_images // gb
    total = cfg.steps if cfg.steps > 0 else cfg.epochs * batches_per_epoch // cfg.accum_iter
    if total == 0:  # was: a run of no step, exit 0
        raise ValueError(f"--epochs {cfg.epochs} of {batches_per_epoch} batches at --accum-iter {cfg.accum_iter} make no "
                         "optimizer step: raise --epochs, lower --accum-iter, or give --steps")
    lr = cfg.lr if cfg.lr is not None else cfg.blr * gb * cfg.accum_iter / 256
    check_lr(cfg, lr)
    return gb, batches_per_epoch, total, lr


def _resume_weights(cfg: TrainConfig, ck: dict, prev: dict, run_info: dict, model, total: int, rank: int) -> None:
    """A resumed run's checks (its settings, its recorded architecture) and the checkpoint's weights into
    the whole model, before any sharding."""
    _check_resume(cfg, prev, run_info, ck["step"], total)
    note = run_info.pop("resume_note", None)
    if rank == 0 and note:
        print(f"umae train: {note}", file=sys.stderr)
    check_recorded_config(model, ck, cfg.resume, "--resume", cfg.model)
    load_weights(model, ck["model"], cfg.resume, "--resume")


def _train(cfg: TrainConfig, rank, world, device) -> list[dict]:
    import timm
    import torch.distributed as dist

    torch.manual_seed(cfg.seed)
    if device.type == "cuda":  # fp32 matmuls (the non-autocast ones) on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ck, prev, cfg = _read_resume(cfg, device)
    later = later_checkpoints(cfg, ck["step"]) if ck else []
    video = is_video(cfg.model)
    if video:
        model = timm.create_model(cfg.model, fused=cfg.fused, lamb=cfg.lamb, norm_pix_loss=cfg.norm_pix_loss,
                                  mask_ratio=cfg.mask_ratio, exact_ddp_grad=cfg.exact_ddp_grad).to(device)
        frames = V.builtin_frames(model.num_frames, cfg.sampling_rate)
        ds = V.open_video(cfg.data, True, cfg.seed, cfg.builtin_size, frames)
        probe_classes = 0
    else:
        ds = D.open_dataset(cfg.data, train=True, seed=cfg.seed, builtin_size=cfg.builtin_size)
        probe_classes = D.num_classes(ds) if cfg.online_probe else 0
        model = timm.create_model(cfg.model, fused=cfg.fused, lamb=cfg.lamb, norm_pix_loss=cfg.norm_pix_loss,
                                  cls_double_norm=cfg.cls_double_norm, exact_ddp_grad=cfg.exact_ddp_grad,
                                  probe_classes=probe_classes).to(device)
    gb, batches_per_epoch, total, lr = _schedule(cfg, len(ds), world)
    run_info = _run_info(cfg, probe_classes, world, lr)
    if ck:
        _resume_weights(cfg, ck, prev, run_info, model, total, rank)
    sharded = cfg.fsdp and world > 1
    net = _distributed(model, world, device, sharded)
    opt = make_optimizer(model, cfg, lr, device)  # over the sharded parameters under FSDP
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    step = 0
    if ck:
        step = checkpoint.restore(ck, opt, scaler, cfg.resume, model=model, sharded=sharded)
        del ck
        for group in opt.param_groups:  # the saved groups carry the saving machine's choice
            group.update(adamw_impl(device))
    loop = Loop(cfg=cfg, model=model, fwd=torch.compile(net, mode=cfg.compile_mode) if cfg.compile else net, net=net, opt=opt,
                scaler=scaler, device=device, rank=rank, world=world,
                num_patches=model.num_tokens if video else model.patch_embed.num_patches,
                num_masked=model.num_masked if video else None,
                total=total, warmup=cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total // 20),
                lr=lr, batches_per_epoch=batches_per_epoch,
                amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp),
                logger=Logger(cfg.out, rank, total, step, progress=not cfg.no_progress, desc=cfg.progress_desc),
                stats=DeviceStats(device, probe=bool(probe_classes), grad_norm=cfg.clip_grad is not None),
                run_info=run_info, last_ckpt=(cfg.resume, step) if cfg.resume else None, last_read=step)
    if rank == 0:  # every check has passed (the log's too, read by the Logger): what --overwrite replaces goes now
        drop_later(cfg, later)
    sampler = D.ResumableSampler(len(ds), gb, cfg.seed, rank, world)
    aug = (V.VideoAugmented(ds, model.img_size, model.num_frames, cfg.sampling_rate, cfg.seed, model.grid,
                            cfg.mask_ratio) if video else D.Augmented(ds, model.img_size, cfg.seed))
    loader, micro = _make_loader(cfg, aug, sampler, step, total, device)
    try:
        train_steps(loop, loader, step, micro)
    finally:
        loop.logger.close()
    if world > 1:
        dist.barrier()
    return loop.logger.records
