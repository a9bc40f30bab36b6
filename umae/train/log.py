"""Training logs without per-step host syncs: the loss statistics are summed on the device and
read (and averaged over ranks) only every --log-every steps; rank 0 writes log.jsonl,
TensorBoard scalars (when installed) and a progress bar."""
from __future__ import annotations

import json
import math
import os
import time

import torch

FIELDS = ("loss", "loss_mae", "loss_unif")
PROBE_FIELDS = ("loss_probe", "probe_acc")  # with --online-probe
LOSS_FIELDS = FIELDS + PROBE_FIELDS[:1]  # the losses: a non-finite one stops the run


class DeviceStats:
    """Sums of the logged terms since the last read, kept on the device: (loss, loss_mae,
    loss_unif[, loss_probe, probe_acc][, grad_norm]). Every micro-batch's loss terms are added
    (with --accum-iter, weighted 1/accum: a step's mean), so a non-finite loss in any of them makes
    its sum non-finite and the read at a log step sees it without a per-step check."""

    def __init__(self, device, probe: bool = False, grad_norm: bool = False):
        self.fields = FIELDS + (PROBE_FIELDS if probe else ()) + (("grad_norm",) if grad_norm else ())
        self.sum = torch.zeros(len(self.fields), device=device)
        # 0, or NaN once a step's gradient had a NaN or inf (with a finite loss: the weights would turn
        # non-finite unseen): read with the sums, not logged
        self.grad_check = torch.zeros((), device=device)
        # the same for the weights, checked after the update of a step that saves a checkpoint
        self.weight_check = torch.zeros((), device=device)
        self.count = 0
        self._grad = "grad_norm" in self.fields

    def add_micro(self, out, batch: int, weight: float = 1.0) -> None:
        """One micro-batch's loss terms, weighted (1 / --accum-iter)."""
        vals = [out.loss, out.loss_mae, out.loss_unif]
        if "probe_acc" in self.fields:
            vals += [out.loss_probe, out.probe_correct / batch]
        v = torch.stack([v.detach().float() for v in vals])
        self.sum[:len(vals)] += v if weight == 1 else v * weight

    def add_step(self, grad_norm=None) -> None:
        """Closes an optimizer step (its micro-batches were added by add_micro)."""
        if self._grad and grad_norm is not None:
            self.sum[-1] += grad_norm.detach().float()
        self.count += 1

    def add_grads(self, grads):
        """A step's gradients (before the optimizer step): 0 * their total norm makes grad_check NaN if
        any is not finite, on the device (one fused norm; no host sync). Returns the step's flag, a
        0-d float tensor: 1 when its gradient is not finite (None without gradients)."""
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shards
        if not grads:
            return None
        total = torch.stack(torch._foreach_norm(grads)).float().sum()
        self.grad_check += total * 0
        return (~torch.isfinite(total)).float()

    def add_weights(self, params) -> None:
        """The weights after an update: 0 * their total norm makes weight_check NaN if any is not finite
        (an lr or a weight decay that overflowed them with a finite gradient), on the device."""
        params = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP: this rank's shards
        if params:
            self.weight_check += torch.stack(torch._foreach_norm([p.detach() for p in params])).float().sum() * 0

    def add(self, out, batch: int, grad_norm=None) -> None:
        """A step of one micro-batch."""
        self.add_micro(out, batch)
        self.add_step(grad_norm)

    def read(self, world: int) -> dict:
        """Means since the last read, over steps and ranks: the one host sync of a log step."""
        s = torch.cat([self.sum / max(self.count, 1), self.grad_check.view(1), self.weight_check.view(1)])
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(s)
            s /= world
        vals = s.tolist()
        self.sum.zero_()
        self.grad_check.zero_()
        self.weight_check.zero_()
        self.count = 0
        return dict(zip(self.fields, vals[:-2]), grads_finite=math.isfinite(vals[-2]),
                    weights_finite=math.isfinite(vals[-1]))


def _lines(path: str):
    """log.jsonl's lines as text; a ValueError naming the file and line for one that is not UTF-8 (not a
    torn line: a damaged record, which a rewrite would lose)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"the run's log {path!r} is damaged: line {n} is not UTF-8 text ({e.reason} at "
                                 f"byte {e.start}); mend or delete that line to continue the run") from None


def check_log(path: str) -> None:
    """keep_until's read of the log, before a run starts (on rank 0, whose answer every rank hears)."""
    if os.path.exists(path):
        for _ in _lines(path):
            pass


def keep_until(path: str, step: int) -> None:
    """Drops log.jsonl's records after `step` (the step a run starts from), so that a resumed run
    (or a fresh one into the same folder) logs each step once: the records a killed run wrote
    after its last checkpoint are written again by the resumed one. Rewritten to a .tmp and
    renamed; a line torn by the kill is dropped with them."""
    if not os.path.exists(path):
        return
    keep = []
    for line in _lines(path):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a torn last line
            pass
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class Logger:
    def __init__(self, out: str, rank: int, total: int, start_step: int, progress: bool, desc: str = "umae train"):
        self.rank = rank
        self.file = None
        if rank == 0:
            path = os.path.join(out, "log.jsonl")
            keep_until(path, start_step)
            self.file = open(path, "a", encoding="utf-8")
        self.tb = None
        if rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: TensorBoard drops the events after the resumed step, as keep_until the records
                self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=start_step + 1)
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
