"""Training logs without per-step host syncs: the loss statistics are summed on the device and
read (and averaged over ranks) only every --log-every steps; rank 0 writes log.jsonl,
TensorBoard scalars (when installed) and a progress bar."""
from __future__ import annotations

import json
import os
import time

import torch

FIELDS = ("loss", "loss_mae", "loss_unif")


class DeviceStats:
    """Sums of (loss, loss_mae, loss_unif) since the last read, kept on the device."""

    def __init__(self, device):
        self.sum = torch.zeros(len(FIELDS), device=device)
        self.count = 0

    def add(self, out) -> None:
        self.sum += torch.stack([getattr(out, f).detach().float() for f in FIELDS])
        self.count += 1

    def read(self, world: int) -> dict:
        """Means since the last read, over steps and ranks: the one host sync of a log step."""
        s = self.sum / max(self.count, 1)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(s)
            s /= world
        vals = s.tolist()
        self.sum.zero_()
        self.count = 0
        return dict(zip(FIELDS, vals))


class Logger:
    def __init__(self, out: str, rank: int, total: int, start_step: int, progress: bool, desc: str = "umae train"):
        self.rank = rank
        self.file = open(os.path.join(out, "log.jsonl"), "a") if rank == 0 else None
        self.tb = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out, "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None
        self.bar = None
        if rank == 0 and progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start_step, desc=desc, unit="step")
        self.records: list[dict] = []
        self.t0, self.imgs = time.perf_counter(), 0

    def images(self, n: int) -> None:
        self.imgs += n

    def step(self) -> None:
        if self.bar:
            self.bar.update(1)

    def log(self, step: int, epoch: int, lr: float, stats: dict) -> None:
        now = time.perf_counter()  # after stats were read: the device has finished these steps
        rec = dict(step=step, epoch=epoch, lr=lr, **stats, img_per_s=self.imgs / max(now - self.t0, 1e-9))
        self.t0, self.imgs = now, 0
        if self.rank != 0:
            return
        self.records.append(rec)
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb:
            for k in (*FIELDS, "lr", "img_per_s"):
                self.tb.add_scalar(k, rec[k], step)
        if self.bar:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", unif=f"{rec['loss_unif']:.4f}",
                                 img_s=f"{rec['img_per_s']:.0f}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
