"""`umae train`: MAE / U-MAE pretraining with MAE's recipe.

AdamW (betas 0.9/0.95, weight decay 0.05 except biases, norms, tokens), lr = blr * batch / 256
with linear warmup and a half-cycle cosine, gradient accumulation, AMP (bf16, or fp16 with a
grad scaler), torchrun DDP with the uniformity loss over the global batch, checkpoints every N
steps with exact resume, a progress bar, JSON-lines logs (and TensorBoard when installed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time

import torch

from . import data as D


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin",
                   help="'builtin' (procedurally generated shapes10, no download), a CIFAR-10/100 folder in "
                        "torchvision's format, or an ImageFolder directory")
    p.add_argument("--builtin-size", type=int, default=4096, help="images in the builtin training set")
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
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true")


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


def lr_at(step, total, warmup, lr, min_lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def validate(args):
    import timm

    if not timm.is_model(args.model):
        from .models import CONFIGS
        raise ValueError(f"--model {args.model!r} is not registered; umae models: {', '.join(CONFIGS)}")
    if not 0 <= args.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    for k in ("batch_size", "accum_iter", "epochs"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint")


def _dist():
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def train(args) -> list[dict]:
    """Runs training; returns the logged records (rank 0: all steps, others: empty)."""
    import timm
    import torch.distributed as dist

    from . import models  # noqa: F401  (registers the models with timm)

    validate(args)
    rank, world = _dist()
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.manual_seed(args.seed)

    model = timm.create_model(args.model, fused=args.fused, lamb=args.lamb, norm_pix_loss=args.norm_pix_loss)
    model.to(device)
    ds = D.open_dataset(args.data, train=True, seed=args.seed, builtin_size=args.builtin_size)
    gb = args.batch_size * world
    if len(ds) < gb:
        raise ValueError(f"the data set has {len(ds)} images, fewer than one global batch ({gb})")
    aug = D.Augmented(ds, model.img_size, args.seed)
    sampler = D.ResumableSampler(len(ds), gb, args.seed, rank, world)
    bpe = sampler.batches_per_epoch()
    total = args.steps if args.steps > 0 else args.epochs * bpe // args.accum_iter
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total // 20)
    eff_batch = gb * args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step = 0
    if args.resume:
        ck = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        step = ck["step"]
    if world > 1:
        model.unif_process_group = dist.group.WORLD
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    fwd = torch.compile(net) if args.compile else net
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    os.makedirs(args.out, exist_ok=True)
    log_f = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    tb = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(args.out, "tb"))
        except Exception:  # tensorboard not installed
            tb = None
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="umae train", unit="step")

    L = model.patch_embed.num_patches
    records, micro = [], step * args.accum_iter
    t0, imgs_seen = time.perf_counter(), 0
    run = dict(model=args.model, fused=args.fused, lamb=args.lamb, mask_ratio=args.mask_ratio, data=args.data,
               builtin_size=args.builtin_size, seed=args.seed, norm_pix_loss=args.norm_pix_loss)
    while step < total:
        epoch, start = divmod(micro, bpe)
        sampler.epoch, sampler.start_batch, aug.epoch = epoch, start, epoch
        loader = torch.utils.data.DataLoader(aug, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
        for imgs, _ in loader:
            # masking noise per global batch from (seed, micro step): ranks slice their part, so a
            # DDP run masks exactly as a single process would, and a resumed run as an unbroken one
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + micro)
            noise = torch.rand(gb, L, generator=g)[rank * args.batch_size:(rank + 1) * args.batch_size]
            imgs, noise = imgs.to(device, non_blocking=True), noise.to(device)
            last = (micro + 1) % args.accum_iter == 0
            sync = contextlib.nullcontext() if (last or world == 1) else net.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = fwd(imgs, args.mask_ratio, noise)
                scaler.scale(out.loss / args.accum_iter).backward()
            micro += 1
            imgs_seen += imgs.shape[0] * world
            if not last:
                continue
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr, args.min_lr)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            stats = torch.stack([out.loss.detach().float(), out.loss_mae.detach().float(), out.loss_unif.detach().float()])
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            rec = dict(step=step, epoch=epoch, lr=opt.param_groups[0]["lr"], loss=float(stats[0]),
                       loss_mae=float(stats[1]), loss_unif=float(stats[2]),
                       img_per_s=imgs_seen / (time.perf_counter() - t0))
            if rank == 0:
                records.append(rec)
                if step % args.log_every == 0 or step == total:
                    log_f.write(json.dumps(rec) + "\n")
                    log_f.flush()
                    if tb:
                        for k in ("loss", "loss_mae", "loss_unif", "lr", "img_per_s"):
                            tb.add_scalar(k, rec[k], step)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", unif=f"{rec['loss_unif']:.4f}",
                                    img_s=f"{rec['img_per_s']:.0f}")
            if rank == 0 and ((args.ckpt_every and step % args.ckpt_every == 0) or step == total):
                save_checkpoint(args.out, step, model, opt, scaler, run)
            if step >= total:
                break
    if bar:
        bar.close()
    if log_f:
        log_f.close()
    if world > 1:
        dist.barrier()
    return records


def save_checkpoint(out, step, model, opt, scaler, run):
    ck = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step, run=run)
    path = os.path.join(out, f"checkpoint-{step}.pt")
    torch.save(ck, path + ".tmp")
    os.replace(path + ".tmp", path)
    last = os.path.join(out, "checkpoint-last.pt")
    torch.save(ck, last + ".tmp")
    os.replace(last + ".tmp", last)
    return path
