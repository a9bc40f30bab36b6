"""Shared test helpers. Tolerances are written once here, per dtype."""
from __future__ import annotations

import pytest
import torch

from umae._backend import triton_interpreted

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton kernels run on CPU tensors only under the interpreter (tests/conftest.py sets it where there
# is no GPU); elsewhere a CPU "fused" call is the reference and a parity test on it could not fail.
TRITON_DEVICES = (["cpu"] if triton_interpreted() else []) + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Outputs stored in the input dtype (gradients, tokens): one rounding of that dtype, plus the
# different fp32 summation order of the fused kernels.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
# Scalars accumulated in fp32 by both paths from the same input values (losses).
LOSS_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-4, rtol=1e-4),
}
# Where the fused path also rounds operands to the input dtype before a matrix product
# (tensor cores) while the reference multiplies in fp32.
MATMUL_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(actual, expected, atol, rtol, name="value"):
    """torch.testing.assert_close on fp32 copies, reporting the worst element."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    try:
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True)
    except AssertionError as err:
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        i = int(diff.flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
        raise AssertionError(f"{name}: worst at {idx}: actual {a.flatten()[i].item()!r} vs "
                             f"expected {e.flatten()[i].item()!r}\n{err}") from None


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    """Fresh random values (never zeros), made in fp32 and rounded once to dtype."""
    x = torch.randn(*shape, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def random_mask(N, L, device="cpu", ratio=0.75):
    return (torch.rand(N, L, device=device) < ratio).float()

# CPU tests of Triton kernels: only under the interpreter (on a GPU machine they run on CUDA instead).
triton_cpu = pytest.mark.skipif(not triton_interpreted(),
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (the CUDA variants cover it)")
