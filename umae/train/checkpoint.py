"""Checkpoints: model, optimizer, grad scaler, step and the run's settings, serialized once
per save; checkpoint-last.pt is a hard link to (or, where links fail, a copy of) that file."""
from __future__ import annotations

import os
import shutil

import torch

LAST = "checkpoint-last.pt"


def save(out: str, step: int, model, opt, scaler, run: dict) -> str:
    ck = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step, run=run)
    path = os.path.join(out, f"checkpoint-{step}.pt")
    torch.save(ck, path + ".tmp")
    os.replace(path + ".tmp", path)
    last = os.path.join(out, LAST)
    try:
        if os.path.lexists(last + ".tmp"):
            os.remove(last + ".tmp")
        os.link(path, last + ".tmp")
    except OSError:  # a file system without hard links
        shutil.copyfile(path, last + ".tmp")
    os.replace(last + ".tmp", last)
    return path


def read(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(ck: dict, model, opt, scaler) -> int:
    """Restores a read checkpoint's states in place; returns the step to continue from."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    return ck["step"]
