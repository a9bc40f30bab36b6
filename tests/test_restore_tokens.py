"""restore_tokens: every fused implementation (the C++ CPU kernel; the Triton kernels, interpreted on
CPU, native on CUDA) vs the reference, its edges (ids that are not a permutation, double backward)."""
import subprocess
import sys
import pytest
import torch
from umae_testing import (DTYPES, HANG_GUARD, LAYOUT_SHAPES, TOL, assert_backward_reads_any_gradient_layout,
                          assert_close, assert_forward_mode_ad_refused, assert_grid_row, assert_runs,
                          assert_second_order_matches, cpu_impls, cuda_only, fused_impls, grid_params, needs_ext, randn,
                          runs_impl, sampled, triton_cpu)

from umae.ops import registry

import umae
from umae.ops.random_masking_op import len_keep_for
from umae.ops.restore_tokens_op import restore_tokens_reference

# (N, L, D), as random_masking's
SHAPES = [(3, 49, 64), (2, 196, 768), (2, 197, 384), (1, 256, 192), (1, 1024, 1000), (2, 37, 33)]
IMPLS = fused_impls("restore_tokens")
CPU_IMPLS = cpu_impls("restore_tokens")


def _custom_op(op):
    """The op's one torch.library op (every implementation is a kernel of it)."""
    return getattr(torch.ops.umae, registry.get(op).schema.split("::")[1]).default


def _grads(outs, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(outs, inputs, g)


@sampled(key={"device,impl": IMPLS, "dtype": DTYPES}, crossed={"N,L,D": SHAPES}, paired={"has_cls": [True, False]})
@runs_impl
def test_restore_tokens_parity(device, impl, dtype, N, L, D, has_cls):
    keep = len_keep_for(L, 0.75)
    ids = torch.argsort(torch.rand(N, L, device=device), dim=1)
    x = randn(N, keep + int(has_cls), D, dtype=dtype, device=device, requires_grad=True)
    tok = randn(1, 1, D, dtype=dtype, device=device, requires_grad=True)
    pos = randn(1, L + int(has_cls), D, dtype=dtype, device=device, requires_grad=True)
    assert_runs("restore_tokens", impl, x, tok, pos)
    out = umae.restore_tokens(x, ids, tok, pos, has_cls)
    ref = restore_tokens_reference(x, ids, tok, pos, has_cls)
    assert out.dtype == ref.dtype
    assert torch.equal(out, ref)  # one fp32 add, one round-to-nearest-even, as in random_masking
    g = randn(*ref.shape, dtype=dtype, device=device)
    for a, b, name in zip(_grads(out, (x, tok, pos), g), _grads(ref, (x, tok, pos), g), ("x", "mask_token", "pos")):
        assert_close(a, b, name=f"grad {name}", **TOL[dtype])


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_non_contiguous(device, impl):
    ids = torch.argsort(torch.rand(3, 64, device=device), 1)
    xm = randn(3, 1 + len_keep_for(64, 0.75), 2 * 48, device=device)[:, :, ::2]
    tok = randn(1, 1, 48, device=device)
    pos = randn(1, 48, 65, device=device).transpose(1, 2)
    assert not (xm.is_contiguous() or pos.is_contiguous())
    assert torch.equal(umae.restore_tokens(xm[:, 1:], ids, tok, has_cls=False),
                       restore_tokens_reference(xm[:, 1:], ids, tok, has_cls=False))
    assert torch.equal(umae.restore_tokens(xm, ids, tok, pos), restore_tokens_reference(xm, ids, tok, pos))


@pytest.mark.parametrize("device,impl", IMPLS)
@runs_impl
def test_opcheck(device, impl):
    ids = torch.argsort(torch.rand(2, 49, device=device), 1)
    xk = randn(2, 13, 24, device=device, requires_grad=True)
    tok = randn(1, 1, 24, device=device, requires_grad=True)
    dpos = randn(1, 50, 24, device=device, requires_grad=True)
    torch.library.opcheck(_custom_op("restore_tokens"), (xk, ids, tok, dpos, True))


@pytest.mark.parametrize("check", [torch.autograd.gradcheck,
                                   pytest.param(torch.autograd.gradgradcheck, marks=pytest.mark.slow)],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("impl", [p for p in CPU_IMPLS if p.values[0] == "cpp-cpu"])
@runs_impl
def test_gradcheck_float64_cpp(impl, check):
    # the C++ kernel takes fp64: its backward (and the backward of that) against finite differences
    N, L, D = 2, 11, 5
    ids = torch.argsort(torch.rand(N, L), 1)
    xk = randn(N, 5, D, dtype=torch.float64, requires_grad=True)
    tok, dpos = randn(1, 1, D, dtype=torch.float64, requires_grad=True), randn(1, L + 1, D, dtype=torch.float64, requires_grad=True)
    assert_runs("restore_tokens", impl, xk, tok, dpos)
    assert check(lambda a, b, c: umae.restore_tokens(a, ids, b, c), (xk, tok, dpos))


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.umae.restore_tokens(randn(2, 4, 4), torch.stack([torch.zeros(9, dtype=torch.int64), torch.arange(9)]),
                                               randn(1, 1, 4), None, True),
     r"ids_restore\[0\] must be a permutation"),
    (lambda: torch.ops.umae.restore_tokens(randn(2, 4, 4), torch.arange(9).expand(2, 9), randn(1, 1, 5), None, True),
     "mask_token must be"),
])
@needs_ext
def test_cpp_kernel_refuses_bad_input(call, match):
    # the C++ op is reachable directly (torch.ops.umae.*): it checks its arguments itself
    with pytest.raises(RuntimeError, match=match):
        call()


P = lambda *s: randn(*s)  # noqa: E731


@pytest.mark.parametrize("call, match", [
    (lambda: umae.restore_tokens(P(2, 13, 8), torch.zeros(2, 49, dtype=torch.int32), P(1, 1, 8)), "ids_restore must be int64"),
    (lambda: umae.restore_tokens(P(2, 60, 8), torch.zeros(2, 49, dtype=torch.int64), P(1, 1, 8)), "x must have between"),
    (lambda: umae.restore_tokens(P(2, 13, 8), torch.zeros(2, 49, dtype=torch.int64), P(1, 1, 8), P(1, 49, 8)),
     r"pos_embed must have shape \(1, 50, 8\)"),
    (lambda: umae.restore_tokens(P(2, 13, 8), torch.zeros(2, 49, dtype=torch.int64), P(1, 8)), "mask_token must have shape"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("has_cls", [True, False])
@runs_impl
def test_restore_tokens_double_backward(device, impl, has_cls):
    N, L, D, keep = 2, 13, 6, 5
    c = int(has_cls)
    ids = torch.argsort(torch.rand(N, L, device=device), 1)
    x = randn(N, c + keep, D, device=device, requires_grad=True)
    tok = randn(1, 1, D, device=device, requires_grad=True)
    pos = randn(1, c + L, D, device=device, requires_grad=True)
    assert_runs("restore_tokens", impl, x, tok, pos)
    assert_second_order_matches(lambda a, b, p: umae.restore_tokens(a, ids, b, p, has_cls=has_cls), (x, tok, pos),
                                     TOL[torch.float32])


BAD_IDS = {
    "negative": ([0, -1, 2, 3], "-1 at 1"),
    "far negative": ([0, 1, -100000000, 3], "-100000000 at 2"),
    "too large": ([0, 1, 2, 4], "4 at 3"),  # was silently a mask token
    "far too large": ([0, 1, 2**40, 3], f"{2**40} at 2"),
    "repeated": ([0, 1, 1, 3], "1 at 2"),
}


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_IDS))
@runs_impl
def test_restore_tokens_refuses_ids_that_are_not_a_permutation(device, impl, case):
    row, what = BAD_IDS[case]
    if device == "cuda":
        pytest.skip("on CUDA the Triton path's check is a device-side assert (torch._assert_async): it would "
                    "poison the CUDA context of the test process")
    ids = torch.stack([torch.tensor([3, 2, 1, 0]), torch.tensor(row)]).to(device)
    x, tok = randn(2, 3, 8, device=device), randn(1, 1, 8, device=device)
    assert_runs("restore_tokens", impl, x, tok)
    with pytest.raises(RuntimeError, match=rf"ids_restore\[1\] must be a permutation of 0\.\.3 .*but has {what}"):
        umae.restore_tokens(x, ids, tok)


@cuda_only
def test_restore_tokens_bad_ids_on_cuda_are_a_device_side_assert():
    # the Triton path's check on CUDA is torch._assert_async (no host sync); an assert poisons the CUDA
    # context, hence a process of its own
    code = ("import torch, umae\n"
            "x, tok = torch.randn(1, 3, 8, device='cuda'), torch.randn(1, 1, 8, device='cuda')\n"
            "assert umae.ops.implementation('restore_tokens', x, tok) == 'triton'\n"
            "umae.restore_tokens(x, torch.tensor([[0, 1, -1, 3]], device='cuda'), tok)\n"
            "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD)
    assert r.returncode != 0 and "assert" in r.stderr.lower(), r.stderr[-3000:]


@triton_cpu
def test_restore_tokens_triton_kernels_never_address_memory_by_a_bad_id(monkeypatch):
    # the launchers' check bypassed: the kernels themselves read and write nothing for an id out of
    # [0, L) (were: -1 read and wrote the cls row, ids >= L were mask tokens, and further ones read and
    # wrote out of bounds: `free(): invalid next size`, a segfault at -100000000)
    from umae.kernels import restore_tokens as k

    monkeypatch.setattr(k, "check_ids", lambda ids: None, raising=False)
    N, L, D, keep = 1, 6, 8, 2
    ids = torch.tensor([[0, -1, 3, 6, 9, 5]])  # output rows 1 + l: 1 kept, 3 and 6 mask tokens, 2, 4, 5 bad
    x, tok, pos = randn(N, 1 + keep, D), randn(1, 1, D), randn(1, 1 + L, D)
    out = torch.empty(N, 1 + L, D)
    k.forward(x, ids, tok, pos, out, has_cls=True)
    g = randn(N, 1 + L, D)
    gx = torch.empty(N, 1 + keep, D)
    gtok = k.backward(g, ids, gx, has_cls=True)
    tol = TOL[torch.float32]
    assert_close(out[:, 0], x[:, 0] + pos[:, 0], name="cls", **tol)
    assert_close(out[:, 1], x[:, 1] + pos[:, 1], name="kept", **tol)
    for o in (3, 6):
        assert_close(out[:, o], tok[:, 0] + pos[:, o], name=f"mask token {o}", **tol)
    for o in (2, 4, 5):  # bad ids: neither a token of x nor the mask token
        assert_close(out[:, o], pos[:, o], name=f"bad id row {o}", **tol)
    assert_close(gx[:, :2], g[:, :2], name="grad cls and kept", **tol)  # row 0 not overwritten by id -1
    assert_close(gtok, g[0, 3] + g[0, 6], name="grad mask token", **tol)  # the valid mask-token rows only


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=["tiny", "larger"])
@pytest.mark.parametrize("layout", ["sum", "strided"])
def test_backward_reads_any_gradient_layout(shape, layout):
    assert_backward_reads_any_gradient_layout("restore_tokens", shape, layout)


@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused_not_zero(api):
    assert_forward_mode_ad_refused("restore_tokens", api)


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("restore_tokens"))
@runs_impl
def test_restore_tokens_grid(device, impl, dtype, variant):
    # shapes, flags, layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("restore_tokens", device, impl, dtype, variant)
