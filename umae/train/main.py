"""Setup of a training run (MAE's main_pretrain.py): arguments, processes and devices, model,
data, optimizer and resume, then the epochs.

AdamW (betas 0.9/0.95, weight decay 0.05 except 1-d parameters and biases, MAE's rule, through
timm's param_groups_weight_decay; fused on CUDA, foreach on CPU), lr = blr * effective batch /
256, gradient accumulation, optional gradient clipping, AMP (bf16 by default on GPUs that have
it, or fp16 with a grad scaler; TF32 matmuls on CUDA), torchrun DDP with the uniformity loss
over the global batch, U-MAE's online linear probe, a stop on a non-finite loss, exact resume.
"""
from __future__ import annotations

import argparse
import os

import torch

from .. import data as D
from . import checkpoint
from .engine import Loop, train_steps
from .log import DeviceStats, Logger


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin",
                   help="'builtin' (procedurally generated shapes10, no download), 'digits' (scikit-learn's real "
                        "handwritten digits, no download), a CIFAR-10/100 folder in torchvision's format, or an "
                        "ImageFolder directory")
    p.add_argument("--builtin-size", type=int, default=D.BUILTIN_SIZE, help="images in the builtin training set")
    p.add_argument("--model", default="umae_vit_tiny_patch4_32")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused kernels (default) or the pure-PyTorch references")
    p.add_argument("--lamb", type=float, default=0.01, help="uniformity weight (0 = plain MAE)")
    p.add_argument("--cls-double-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="U-MAE's cls feature as its official forward: the encoder norm applied twice")
    p.add_argument("--online-probe", action="store_true",
                   help="train U-MAE's online linear classifier on the detached cls feature; log its accuracy")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--accum-iter", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr * effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--decay-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="weight-decay cls_token and mask_token, as MAE's rule (only 1-d parameters and biases "
                        "are exempt); default: on, or the resumed checkpoint's choice")
    p.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm (default: off, as MAE)")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on a GPU that supports it, none (fp32) otherwise")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/umae")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N optimizer steps (0: at the end)")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume from. Its run's settings (" + ", ".join(CHANGEABLE) + ") must match "
                        "this run's (pass the same values) unless named in --resume-override; --lr, --blr, --steps, "
                        "--amp, --clip-grad and the like may change")
    p.add_argument("--resume-override", default="", metavar="SETTING[,SETTING]",
                   help="with --resume: settings that may differ from the checkpoint's, e.g. lamb,mask_ratio (the "
                        "checkpoint records each change)")
    p.add_argument("--num-workers", type=int, default=None, help="loader processes (default: the machine's cores)")
    p.add_argument("--log-every", type=int, default=10,
                   help="optimizer steps between log records (the only host syncs of the loop)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true")


def check_range(args, names, low: float, strict: bool = False, optional: bool = False) -> None:
    """ValueError naming the flag and its value unless each of `names` is >= low (> low when
    strict; None passes when optional). NaN fails."""
    for k in names:
        v = getattr(args, k)
        if v is None and optional:
            continue
        if v is None or not (v > low if strict else v >= low):
            raise ValueError(f"--{k.replace('_', '-')} must be {'>' if strict else '>='} {low:g}, got {v}")


def parse_device(name: str | None, flag: str = "--device") -> torch.device | None:
    """torch.device(name), or a ValueError naming the flag: an unknown device, or a CUDA one
    without a GPU (or past the GPUs there are)."""
    if not name:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{flag} {name!r} is not a device (e.g. cpu, cuda, cuda:1): "
                         f"{str(e).splitlines()[0]}") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{flag} {name!r}: no CUDA GPU is available here")
        if device.index is not None and device.index >= n:
            raise ValueError(f"{flag} {name!r}: there are {n} CUDA GPU(s)")
    return device


def validate(args):
    import timm

    if not timm.is_model(args.model):
        from ..models import CONFIGS
        raise ValueError(f"--model {args.model!r} is not registered; umae models: {', '.join(CONFIGS)}")
    if not 0 <= args.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    check_range(args, ("batch_size", "accum_iter", "epochs", "log_every", "builtin_size"), 1)
    check_range(args, ("steps", "ckpt_every", "lamb", "weight_decay", "min_lr"), 0)  # --steps 0: use --epochs
    check_range(args, ("warmup_steps", "num_workers"), 0, optional=True)
    check_range(args, ("blr",), 0, strict=True)
    check_range(args, ("lr", "clip_grad"), 0, strict=True, optional=True)
    parse_device(args.device)
    if overrides(args) and not args.resume:
        raise ValueError(f"--resume-override {args.resume_override!r} needs --resume")
    bad = set(overrides(args)) - set(CHANGEABLE)
    if bad:
        raise ValueError(f"--resume-override {args.resume_override!r}: {', '.join(sorted(bad))} cannot be "
                         f"overridden; these can: {', '.join(CHANGEABLE)}")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint")


def overrides(args) -> list[str]:
    return [k.strip().replace("-", "_") for k in (getattr(args, "resume_override", "") or "").split(",") if k.strip()]


def lock_out(out: str) -> int:
    """Creates --out and holds an exclusive lock on its .lock for the run: a second writer into
    the same folder is refused (it would replace the checkpoints and interleave log.jsonl). A
    flock dies with its process, so a killed run leaves no stale lock. Returns the lock's fd."""
    import fcntl

    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be written: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise ValueError(f"--out {out!r} is in use by another umae train run"
                         + (f" (pid {holder})" if holder else "") + "; wait for it or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_on_rank0(out: str, rank: int, world: int):
    """Rank 0 holds the lock (the other ranks write nothing); every rank learns whether it got it,
    so a refused run stops on all ranks instead of leaving them waiting for rank 0."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = lock_out(out)
        except ValueError as e:
            err = e
    if world > 1:
        import torch.distributed as dist

        ok = [err is None]
        dist.broadcast_object_list(ok, src=0)
        if not ok[0] and err is None:
            err = ValueError(f"--out {out!r}: rank 0 could not take the run's lock (its message says why)")
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


def pick_device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def adamw_impl(device) -> dict:
    """One multi-tensor kernel per step: fused on CUDA, foreach elsewhere."""
    return dict(fused=True, foreach=None) if device.type == "cuda" else dict(fused=None, foreach=True)


def make_optimizer(model, args, lr, device):
    return torch.optim.AdamW(param_groups(model, args.weight_decay, args.decay_tokens), lr=lr, betas=(0.9, 0.95),
                             **adamw_impl(device))


def resolve_amp(amp: str, device: torch.device) -> str:
    """'auto': bf16 on a CUDA device that supports it (SDPA then reaches its flash kernel), fp32
    elsewhere (the CPU stays fp32 unless asked)."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# what a resumed run must share with its checkpoint (the model's structure and the optimizer's groups)
RESUME_KEYS = ("model", "probe_classes", "decay_tokens")
# what it must share unless --resume-override names it: a change makes the run another experiment
CHANGEABLE = ("lamb", "mask_ratio", "seed", "data", "builtin_size", "norm_pix_loss", "cls_double_norm")


def train(args) -> list[dict]:
    """Runs training; returns the logged records (rank 0; other ranks: empty)."""
    from .. import models  # noqa: F401  (registers the models with timm)

    validate(args)
    rank, world = init_distributed()
    device = pick_device(args)
    lock = _lock_on_rank0(args.out, rank, world)
    try:
        return _train(args, rank, world, device)
    finally:
        if lock is not None:
            os.close(lock)


def _check_resume(args, prev: dict, run_info: dict, step: int, total: int) -> None:
    """Refuses a resume that would change the model's structure, or (unless --resume-override
    names them) the run's settings, or that has nothing left to train; records the overrides."""
    differ = [k for k in RESUME_KEYS if k in prev and prev[k] != run_info[k]]
    if differ:
        raise ValueError(f"--resume {args.resume!r}: the checkpoint was trained with "
                         + ", ".join(f"{k}={prev[k]!r}" for k in differ) + "; this run has "
                         + ", ".join(f"{k}={run_info[k]!r}" for k in differ))
    allowed = overrides(args)
    changed = [k for k in CHANGEABLE if k in prev and prev[k] != run_info[k]]
    refused = [k for k in changed if k not in allowed]
    if refused:
        raise ValueError(f"--resume {args.resume!r}: the checkpoint's run has "
                         + ", ".join(f"--{k.replace('_', '-')} {prev[k]!r} (this run: {run_info[k]!r})"
                                     for k in refused)
                         + "; pass the checkpoint's values, or --resume-override " + ",".join(refused)
                         + " to change them")
    run_info["resume_overrides"] = list(prev.get("resume_overrides", [])) + (
        [dict(step=step, **{k: [prev[k], run_info[k]] for k in changed})] if changed else [])
    if step >= total:
        raise ValueError(f"--resume {args.resume!r} is at step {step}, and this run ends at step {total} ("
                         + (f"--steps {args.steps}" if args.steps else f"--epochs {args.epochs}")
                         + "): nothing left to train; pass a larger --steps")


def _train(args, rank, world, device) -> list[dict]:
    import timm
    import torch.distributed as dist

    torch.manual_seed(args.seed)

    if device.type == "cuda":  # fp32 matmuls (the non-autocast ones) on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.amp = resolve_amp(args.amp, device)
    ck = checkpoint.read(args.resume) if args.resume else None
    if ck:
        checkpoint.check_resumable(ck, args.resume)
    prev = (ck.get("run") or {}) if ck else {}
    if args.decay_tokens is None:  # a checkpoint from before the rule recorded it had tokens exempt
        args.decay_tokens = prev.get("decay_tokens", False) if ck else True

    ds = D.open_dataset(args.data, train=True, seed=args.seed, builtin_size=args.builtin_size)
    probe_classes = D.num_classes(ds) if args.online_probe else 0
    model = timm.create_model(args.model, fused=args.fused, lamb=args.lamb, norm_pix_loss=args.norm_pix_loss,
                              cls_double_norm=args.cls_double_norm, probe_classes=probe_classes)
    model.to(device)
    gb = args.batch_size * world
    if len(ds) < gb:
        raise ValueError(f"the data set has {len(ds)} images, fewer than one global batch ({gb})")
    aug = D.Augmented(ds, model.img_size, args.seed)
    sampler = D.ResumableSampler(len(ds), gb, args.seed, rank, world)
    batches_per_epoch = sampler.batches_per_epoch()
    total = args.steps if args.steps > 0 else args.epochs * batches_per_epoch // args.accum_iter
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total // 20)
    eff_batch = gb * args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    run_info = dict(model=args.model, fused=args.fused, lamb=args.lamb, mask_ratio=args.mask_ratio, data=args.data,
                    builtin_size=args.builtin_size, seed=args.seed, norm_pix_loss=args.norm_pix_loss,
                    cls_double_norm=args.cls_double_norm, probe_classes=probe_classes,
                    decay_tokens=args.decay_tokens, amp=args.amp)

    opt = make_optimizer(model, args, lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step = 0
    if ck:
        _check_resume(args, prev, run_info, ck["step"], total)
        step = checkpoint.restore(ck, model, opt, scaler, args.resume)
        del ck
        for group in opt.param_groups:  # the saved groups carry the saving machine's choice
            group.update(adamw_impl(device))
    if world > 1:
        model.unif_process_group = dist.group.WORLD
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    loop = Loop(args=args, model=model, fwd=torch.compile(net) if args.compile else net, net=net, opt=opt,
                scaler=scaler, device=device, rank=rank, world=world, num_patches=model.patch_embed.num_patches,
                total=total, warmup=warmup, lr=lr, batches_per_epoch=batches_per_epoch,
                amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp),
                logger=Logger(args.out, rank, total, step, progress=not args.no_progress,
                              desc=getattr(args, "progress_desc", "umae train")),
                stats=DeviceStats(device, probe=bool(probe_classes), grad_norm=args.clip_grad is not None),
                run_info=run_info, last_ckpt=(args.resume, step) if args.resume else None, last_read=step)

    # one loader for the rest of the run: its workers live across epochs
    micro = step * args.accum_iter
    sampler.epoch, sampler.start_batch = divmod(micro, batches_per_epoch)
    sampler.num_batches = (total - step) * args.accum_iter
    workers = default_workers() if args.num_workers is None else args.num_workers
    loader = torch.utils.data.DataLoader(aug, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    try:
        train_steps(loop, loader, step, micro)
    finally:
        loop.logger.close()
    if world > 1:
        dist.barrier()
    return loop.logger.records
