"""The parity tolerances, per dtype, written once: the tests (tests/umae_testing.py) and `umae check` read
them. Every tolerance is a multiple of the dtype's unit roundoff u (the largest relative error of
one rounding), set by what the compared paths do differently; none is tuned to one machine.
"""
from __future__ import annotations

import dataclasses

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}
U = UNIT_ROUNDOFF
# A sum of up to 2^8 terms (a patch's pixels, a token's features, the op tests' batch) in another
# order differs by up to 2^8 ulps of fp32 relative to the terms' magnitude.
SUM_TERMS = 2 ** 8


def _tol(t: float) -> dict:
    return dict(atol=t, rtol=t)


# Bitwise: copies and permutations (patchify), and values both paths round once from the same fp32 sum.
EXACT = {dt: _tol(0.0) for dt in U}
# Outputs stored in the input dtype (gradients, tokens): in bf16/fp16 each path rounds its fp32
# result once (u each), and a path may round one intermediate more (x + pos stored before the
# gather): 4u, plus the fp32 summation order (< u): 5u. In fp32 and fp64: the summation order.
TOL = {torch.float64: _tol(SUM_TERMS * U[torch.float64]), torch.float32: _tol(SUM_TERMS * U[torch.float32]),
       torch.bfloat16: _tol(5 * U[torch.bfloat16]), torch.float16: _tol(5 * U[torch.float16])}
# Scalars both paths accumulate in fp32 from the same input values (losses): the summation order
# alone, whatever the input dtype.
LOSS_TOL = {torch.float64: TOL[torch.float64],
            **{dt: _tol(SUM_TERMS * U[torch.float32]) for dt in (torch.float32, torch.bfloat16, torch.float16)}}
# Where the fused path also rounds operands to the input dtype before a matrix product (tensor
# cores) while the reference multiplies in fp32: one more rounding of each operand (2u) on top of
# TOL's 5u; in fp32, the product's sums over up to 2^12 terms (B, D).
MATMUL_TOL = {torch.float64: TOL[torch.float64], torch.float32: _tol(2 ** 12 * U[torch.float32]),
              torch.bfloat16: _tol(7 * U[torch.bfloat16]), torch.float16: _tol(7 * U[torch.float16])}


@dataclasses.dataclass(frozen=True)
class Parity:
    """How an op's fused outputs and gradients compare with its reference's: the tolerance table
    (by input dtype) of its floating outputs and of its gradients. `out_scaled` / `grad_scaled`:
    compared relative to the reference's largest element, not to 1 (a loss and its gradient are a
    mean: their size is set by the batch, and a tolerance with atol ~ rtol would let a small one
    be wrong by 100%; a matrix product's error scales with the whole row, not the element).
    Integer outputs (masks, ids) always compare bitwise. `autocast`: the reference holds an op
    autocast casts (a matmul), so under autocast both paths round to the autocast dtype and are
    compared at the coarser of its tolerance and the input dtype's; the other ops' references keep
    their precision under autocast, as their kernels do."""
    out: dict
    grad: dict
    out_scaled: bool = False
    grad_scaled: bool = False
    autocast: bool = False
