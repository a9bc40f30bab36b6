"""A call's exact costs, the same on any device: the ops it dispatches and the bytes it keeps for backward.

- `aten_calls`: the ops that reach the kernels (a TorchDispatchMode sees them below autograd, after
  composite ops have decomposed): ATen's, and umae's kernel ops together with the ATen calls their
  kernels make inside. On a GPU each is at least one kernel launch and one trip through the
  dispatcher, so the count predicts a call's host time where no GPU is at hand.
- `saved_bytes`: the bytes the forward saves for the backward (saved_tensors_hooks), each storage
  once, beyond those of the tensors the caller names as already held (a step's parameters, buffers
  and inputs): the activation memory of a training step.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_AFTER_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


class _Dispatches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        if func.namespace == "umae":
            # a umae kernel's own ATen calls dispatch too: the mode on again while it runs, the op itself
            # sent on below this key (else it would come back here)
            first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            with self:
                return func.redispatch(torch._C._dispatch_keys(first) & _AFTER_PYTHON, *args, **kwargs)
        return func(*args, **kwargs)


def measure(fn, held=()) -> dict:
    """Runs fn once: {"aten_calls": ops dispatched, "saved_bytes": bytes saved for backward, each storage
    once, not counting the storages of the tensors in `held`}."""
    skip = {t.untyped_storage().data_ptr() for t in held}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    counter = _Dispatches()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
        fn()
    return dict(aten_calls=counter.calls, saved_bytes=sum(seen.values()))
