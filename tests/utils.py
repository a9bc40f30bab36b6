"""Shared test helpers. Tolerances are written once here, per dtype."""
from __future__ import annotations

import pytest
import torch

from umae import _backend, registry
from umae._backend import triton_interpreted

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
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


def assert_rounding_matters(a, b):
    """bf16 a + b rounded to nearest differs from truncation somewhere: a test that expects the
    rounding of a bf16 sum bitwise can then fail if a kernel truncates."""
    s = a.float() + b.float()
    truncated = (s.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(s.to(torch.bfloat16), truncated), "inputs where truncation and rounding agree"


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    """Fresh random values (never zeros), made in fp32 and rounded once to dtype."""
    x = torch.randn(*shape, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def random_mask(N, L, device="cpu", ratio=0.75):
    return (torch.rand(N, L, device=device) < ratio).float()

# CPU tests of Triton kernels: only under the interpreter (on a GPU machine they run on CUDA instead).
triton_cpu = pytest.mark.skipif(not triton_interpreted(),
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (the CUDA variants cover it)")


def fused_impls(op: str, device: str | None = None):
    """pytest params (device, impl) for every fused implementation of `op` this machine runs (on CPU:
    the C++ kernel and, under TRITON_INTERPRET=1, the Triton kernel). tests/conftest.py puts the
    test's `impl` first (`_backend.use_impl`); `assert_runs` checks that it is what runs."""
    out = []
    for impl in registry.get(op).impls:
        if device not in (None, impl.device) or impl.device not in DEVICES or not _backend._runnable(impl)[0]:
            continue
        out.append(pytest.param(impl.device, impl.name, id=f"{impl.device}-{impl.name}"))
    return out


def cpu_impls(op: str):
    """fused_impls on CPU, as pytest params of `impl` alone."""
    return [pytest.param(p.values[1], id=p.id) for p in fused_impls(op, "cpu")]


def assert_runs(op: str, impl: str, *tensors):
    """The parity test runs the implementation it names (else it would compare the reference with itself)."""
    got = _backend.implementation(op, *tensors)
    assert got == impl or (impl == "triton" and got == "triton-interpreter"), f"{op}: {got} runs, not {impl}"
