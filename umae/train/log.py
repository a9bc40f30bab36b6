"""Training logs without per-step host syncs: the loss statistics are summed on the device and
read (and averaged over ranks) only every --log-every steps; rank 0 writes log.jsonl,
TensorBoard scalars (when installed) and a progress bar."""
from __future__ import annotations

import json
import os
import time

import torch

FIELDS = ("loss", "loss_mae", "loss_unif")
PROBE_FIELDS = ("loss_probe", "probe_acc")  # with --online-probe
LOSS_FIELDS = FIELDS + PROBE_FIELDS[:1]  # the losses: a non-finite one stops the run


class DeviceStats:
    """Sums of the logged terms since the last read, kept on the device: (loss, loss_mae,
    loss_unif[, loss_probe, probe_acc][, grad_norm]). A non-finite loss makes its sum non-finite,
    so the read at a log step sees it without a per-step check."""

    def __init__(self, device, probe: bool = False, grad_norm: bool = False):
        self.fields = FIELDS + (PROBE_FIELDS if probe else ()) + (("grad_norm",) if grad_norm else ())
        self.sum = torch.zeros(len(self.fields), device=device)
        self.count = 0

    def add(self, out, batch: int, grad_norm=None) -> None:
        vals = [out.loss, out.loss_mae, out.loss_unif]
        if "probe_acc" in self.fields:
            vals += [out.loss_probe, out.probe_correct / batch]
        if grad_norm is not None:
            vals.append(grad_norm)
        self.sum += torch.stack([v.detach().float() for v in vals])
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
        return dict(zip(self.fields, vals))


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
            for k, v in rec.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, step)
        if self.bar:
            extra = dict(probe=f"{rec['probe_acc']:.3f}") if "probe_acc" in rec else {}
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", unif=f"{rec['loss_unif']:.4f}", **extra,
                                 img_s=f"{rec['img_per_s']:.0f}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
