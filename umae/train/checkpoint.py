"""Checkpoints: model, optimizer, grad scaler, step and the run's settings, serialized once
per save; checkpoint-last.pt is a hard link to (or, where links fail, a copy of) that file.
Each file is written to a .tmp and renamed: a crash or a full disk leaves the previous
checkpoint intact and no partial file. Every record in the file carries torch's CRC-32, verified
before a checkpoint is loaded (umae._files: read_checkpoint, load_weights)."""
from __future__ import annotations

import os
import shutil

import torch

from .._files import LOAD_ERRORS, reason, write_whole

LAST = "checkpoint-last.pt"
RESUME_ENTRIES = ("model", "optimizer", "scaler", "step")


def _torch_save(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def full_states(model, opt, sharded: bool) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) in the plain layout, whatever the sharding: under
    FSDP (`sharded`) gathered from every rank (a collective: all ranks call it; rank 0 gets them,
    on the CPU), the optimizer's state keyed by position as `opt.state_dict()` keys it, so a
    checkpoint of an FSDP run resumes under DDP or in one process, and the other way round."""
    if not sharded:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options)
    if not osd:  # ranks other than 0
        return msd, osd
    pos = {name: i for i, name in enumerate(_param_names(model, opt))}
    return msd, {"state": {pos[n]: st for n, st in osd["state"].items()},
                 "param_groups": [dict(g, params=[pos[n] for n in g["params"]]) for g in osd["param_groups"]]}


def _param_names(model, opt) -> list[str]:
    """The optimizer's parameters' names, in the order of its groups (the positions of its state dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def load_optimizer(model, opt, state: dict, sharded: bool) -> None:
    """opt.load_state_dict of a plain-layout state; under FSDP each rank takes its shards of it."""
    if not sharded:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, opt)
    named = {"state": {names[i]: st for i, st in state["state"].items()},
             "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True))


def save(out: str, step: int, states: tuple[dict, dict], scaler, run: dict, config: dict | None = None) -> str:
    """Writes checkpoint-<step>.pt (and checkpoint-last.pt) from `full_states`'s (model, optimizer)
    states; `config`: the model's architecture (MaskedAutoencoderViT.arch_config)."""
    ck = dict(model=states[0], optimizer=states[1], scaler=scaler.state_dict(), step=step, run=run, config=config)
    path = os.path.join(out, f"checkpoint-{step}.pt")
    write_whole(path, lambda tmp: _torch_save(ck, tmp), tmp=path + ".tmp")
    link_last(out, path)
    return path


def link_last(out: str, path: str) -> None:
    """checkpoint-last.pt as a hard link to (where links fail, a copy of) the checkpoint at path."""
    last = os.path.join(out, LAST)

    def link(tmp):
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
    write_whole(last, link, tmp=last + ".tmp")


def check_resumable(ck: dict, path: str) -> None:
    """A ValueError naming --resume and the file unless ck has a train checkpoint's entries, of their types."""
    missing = [k for k in RESUME_ENTRIES if k not in ck]
    if "model" in missing:
        raise ValueError(f"--resume {path!r} is not a umae train checkpoint (no 'model' entry)")
    if missing:
        raise ValueError(f"--resume {path!r} is a model-only checkpoint (no {', '.join(missing)}; e.g. "
                         "facebookresearch/mae's): it cannot be resumed; `umae eval --ckpt` evaluates it")
    bad = [f"'{k}' is {type(ck[k]).__name__}, not a dict" for k in ("model", "optimizer", "scaler", "run")
           if k in ck and not isinstance(ck[k], dict)]
    step = ck["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        bad.append(f"'step' is {step!r}, not a step count")
    if bad:
        raise ValueError(f"--resume {path!r} is not a valid umae train checkpoint: " + "; ".join(bad))


def restore(ck: dict, opt, scaler, path: str = "", *, model, sharded: bool = False) -> int:
    """Restores a read checkpoint's optimizer and scaler states in place (the weights: load_weights,
    before any sharding); a ValueError naming --resume and the file for a state that does not fit.
    Returns the step to continue from."""
    try:
        load_optimizer(model, opt, ck["optimizer"], sharded)
    except LOAD_ERRORS as e:
        hint = ("; its parameter groups follow the model and --decay-tokens (a checkpoint that records no "
                "run settings is taken as --no-decay-tokens): try --decay-tokens or --no-decay-tokens"
                if "parameter group" in str(e) else "")
        raise ValueError(f"--resume {path!r}: its optimizer state does not fit this run's AdamW: {reason(e)}"
                         + hint) from None
    try:
        scaler.load_state_dict(ck["scaler"])
    except LOAD_ERRORS as e:
        raise ValueError(f"--resume {path!r}: its grad scaler state does not fit: {reason(e)}") from None
    return ck["step"]
