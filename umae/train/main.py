"""Setup of a training run (MAE's main_pretrain.py): arguments, processes and devices, model,
data, optimizer and resume, then the epochs.

AdamW (betas 0.9/0.95, weight decay 0.05 except biases, norms, tokens; fused on CUDA, foreach
on CPU), lr = blr * effective batch / 256, gradient accumulation, AMP (bf16, or fp16 with a
grad scaler), torchrun DDP with the uniformity loss over the global batch, exact resume.
"""
from __future__ import annotations

import argparse
import os

import torch

from .. import data as D
from . import checkpoint
from .engine import Loop, train_one_epoch
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
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/umae")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N optimizer steps (0: at the end)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10,
                   help="optimizer steps between log records (the only host syncs of the loop)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true")


def validate(args):
    import timm

    if not timm.is_model(args.model):
        from ..models import CONFIGS
        raise ValueError(f"--model {args.model!r} is not registered; umae models: {', '.join(CONFIGS)}")
    if not 0 <= args.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    for k in ("batch_size", "accum_iter", "epochs", "log_every"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint")


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


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
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95), **adamw_impl(device))


def train(args) -> list[dict]:
    """Runs training; returns the logged records (rank 0; other ranks: empty)."""
    import timm
    import torch.distributed as dist

    from .. import models  # noqa: F401  (registers the models with timm)

    validate(args)
    rank, world = init_distributed()
    device = pick_device(args)
    torch.manual_seed(args.seed)

    model = timm.create_model(args.model, fused=args.fused, lamb=args.lamb, norm_pix_loss=args.norm_pix_loss)
    model.to(device)
    ds = D.open_dataset(args.data, train=True, seed=args.seed, builtin_size=args.builtin_size)
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

    opt = make_optimizer(model, args, lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step = 0
    if args.resume:
        step = checkpoint.load(args.resume, model, opt, scaler)
        for group in opt.param_groups:  # the saved groups carry the saving machine's choice
            group.update(adamw_impl(device))
    if world > 1:
        model.unif_process_group = dist.group.WORLD
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    os.makedirs(args.out, exist_ok=True)
    run_info = dict(model=args.model, fused=args.fused, lamb=args.lamb, mask_ratio=args.mask_ratio, data=args.data,
                    builtin_size=args.builtin_size, seed=args.seed, norm_pix_loss=args.norm_pix_loss)
    loop = Loop(args=args, model=model, fwd=torch.compile(net) if args.compile else net, net=net, opt=opt,
                scaler=scaler, device=device, rank=rank, world=world, num_patches=model.patch_embed.num_patches,
                total=total, warmup=warmup, lr=lr,
                amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp),
                logger=Logger(args.out, rank, total, step, progress=not args.no_progress,
                                desc=getattr(args, "progress_desc", "umae train")),
                stats=DeviceStats(device), run_info=run_info)

    micro = step * args.accum_iter
    try:
        while step < total:
            epoch, start = divmod(micro, batches_per_epoch)
            sampler.epoch, sampler.start_batch, aug.epoch = epoch, start, epoch
            loader = torch.utils.data.DataLoader(aug, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                                 num_workers=args.num_workers, pin_memory=device.type == "cuda")
            step, micro = train_one_epoch(loop, loader, epoch, step, micro)
    finally:
        loop.logger.close()
    if world > 1:
        dist.barrier()
    return loop.logger.records
