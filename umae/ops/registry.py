"""The one list of umae's ops. Each op module (umae/ops/<op>_op.py) builds its entry (umae/ops/_common.py
`Op`) by reference: the public function, the reference, the fused function and the custom op it
calls, the implementations per device with their dtypes, the parity tolerances, and for Triton
ops the kernel module and the launchers registered at the CUDA key. What the benchmarks and tests do
with an op is theirs: its case and parity grid in umae/bench/cases.py, its test file in tests/umae_testing.py.

`umae.ops` (`choose`, `backend_info`, `use_impl`, the public ops), `umae.__all__`, `umae bench`,
the compile check and the tests read this list. What adding an op touches: docs/design.md, "How to
add an op" (tests/test_layout.py checks it).
"""
from __future__ import annotations

from . import (masked_mse_op, patchify_op, random_masking_op, restore_tokens_op, tubelet_patchify_op, uniformity_op,
               videomae_loss_op)
from ._common import Op

_ENTRIES = (
    patchify_op.PATCHIFY,
    patchify_op.UNPATCHIFY,
    masked_mse_op.MASKED_MSE_LOSS,
    masked_mse_op.MAE_LOSS,
    random_masking_op.RANDOM_MASKING,
    restore_tokens_op.RESTORE_TOKENS,
    uniformity_op.UNIFORMITY_LOSS,
    tubelet_patchify_op.TUBELET_PATCHIFY,
    tubelet_patchify_op.TUBELET_UNPATCHIFY,
    videomae_loss_op.VIDEOMAE_LOSS,
)

OPS: dict[str, Op] = {op.name: op for op in _ENTRIES}


def get(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; umae's ops: {', '.join(OPS)}") from None
