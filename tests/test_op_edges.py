"""Edges of the ops where a backend returned a silent wrong result or crashed:
random_masking with L = 0, double backward, bad ids_restore on the Triton path, non-floating
targets, D = 0 features, numpy scalars as arguments, a negative unpatchify image_size."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from utils import (DEVICES, HANG_GUARD, TOL, assert_close, assert_runs, cpu_impls, cuda_only, fused_impls, randn,
                   random_mask, triton_cpu)

import umae
from umae.bench.cases import CASES
from umae import ops
from umae.ops import _backend, registry
from umae.ops._backend import triton_interpreted
from umae.ops.random_masking_op import random_masking_reference

MASKING_IMPLS = fused_impls("random_masking")
RESTORE_IMPLS = fused_impls("restore_tokens")
UNIFORMITY_IMPLS = fused_impls("uniformity_loss")
LOSS_IMPLS = fused_impls("mae_loss")
DOUBLE_BACKWARD = r"double backward \(a gradient of its gradient.*is not supported by the fused .*use the reference"


# ---- random_masking with L = 0 ----------------------------------------------------------------

@pytest.mark.parametrize("device,impl", MASKING_IMPLS)
@pytest.mark.parametrize("x_dtype,cls_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
@pytest.mark.parametrize("with_pos", [False, True])
def test_random_masking_no_tokens_keeps_the_cls_token(device, impl, x_dtype, cls_dtype, with_pos):
    # the C++ kernel returned uninitialized memory in the cls row, the Triton kernel zeros
    N, D = 3, 20
    x = randn(N, 0, D, dtype=x_dtype, device=device, requires_grad=True)
    cls = randn(1, 1, D, dtype=cls_dtype, device=device, requires_grad=True)
    pos = randn(1, 0, D, dtype=x_dtype, device=device) if with_pos else None
    assert_runs("random_masking", impl, x, pos, cls)
    noise = torch.rand(N, 0, device=device)
    got = umae.random_masking(x, 0.75, noise, pos, cls)
    ref = random_masking_reference(x, 0.75, noise, pos, cls)
    assert got[0].shape == (N, 1, D) and got[0].dtype == ref[0].dtype
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    assert torch.equal(got[0][:, 0], cls[0].expand(N, D).to(got[0].dtype))
    g = randn(N, 1, D, dtype=got[0].dtype, device=device)
    gx, gc = torch.autograd.grad(got[0], (x, cls), g)
    rx, rc = torch.autograd.grad(ref[0], (x, cls), g)
    assert gx.shape == (N, 0, D) and torch.equal(gc, rc)


# ---- double backward ----------------------------------------------------------------------------

def _penalty_grads(fn, inputs):
    """d/d(inputs) of a gradient penalty |d f/d(inputs)|^2, f = sum(w * fn(*inputs)^2): needs fn's
    second derivative (its backward differentiated w.r.t. the incoming gradient)."""
    out = fn(*inputs)
    w = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    acc = torch.promote_types(out.dtype, torch.float32)
    f = (w * out.to(acc) ** 2).sum()
    grads = torch.autograd.grad(f, inputs, create_graph=True)
    penalty = sum(g.to(acc).pow(2).sum() for g in grads)
    return torch.autograd.grad(penalty, inputs)


def _fused_vs_reference_second_order(fn, inputs, tol):
    got = _penalty_grads(fn, inputs)
    with umae.use_backend("reference"):
        ref = _penalty_grads(fn, inputs)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert b.abs().max() > 0, "a second-order term that is 0 tests nothing"
        assert_close(a, b, name=f"second-order grad of input {i}", **tol)


@pytest.mark.parametrize("device,impl", MASKING_IMPLS)
@pytest.mark.parametrize("has_cls", [True, False])
def test_random_masking_double_backward(device, impl, has_cls):
    x = randn(2, 13, 6, device=device, requires_grad=True)
    pos = randn(1, 13, 6, device=device, requires_grad=True)
    cls = randn(1, 1, 6, device=device, requires_grad=True)
    noise = torch.rand(2, 13, device=device)
    assert_runs("random_masking", impl, x, pos, cls)
    inputs = (x, pos, cls) if has_cls else (x, pos)
    _fused_vs_reference_second_order(lambda *t: umae.random_masking(t[0], 0.6, noise, *t[1:])[0], inputs,
                                      TOL[torch.float32])


@pytest.mark.parametrize("device,impl", RESTORE_IMPLS)
@pytest.mark.parametrize("has_cls", [True, False])
def test_restore_tokens_double_backward(device, impl, has_cls):
    N, L, D, keep = 2, 13, 6, 5
    c = int(has_cls)
    ids = torch.argsort(torch.rand(N, L, device=device), 1)
    x = randn(N, c + keep, D, device=device, requires_grad=True)
    tok = randn(1, 1, D, device=device, requires_grad=True)
    pos = randn(1, c + L, D, device=device, requires_grad=True)
    assert_runs("restore_tokens", impl, x, tok, pos)
    _fused_vs_reference_second_order(lambda a, b, p: umae.restore_tokens(a, ids, b, p, has_cls=has_cls), (x, tok, pos),
                                     TOL[torch.float32])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_patchify_unpatchify_double_backward(device):
    # linear: the backward of patchify's backward (unpatchify) is patchify again, through the C++ ops' autograd
    imgs = randn(1, 2, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    x = randn(1, 6, 8, dtype=torch.float64, device=device, requires_grad=True)
    if not _backend.EXT_LOADED:
        pytest.skip(_backend.EXT_REASON)
    assert ops.implementation("patchify", imgs) == ops.implementation("unpatchify", x) != "reference"
    assert torch.autograd.gradgradcheck(lambda t: umae.patchify(t, 2) ** 2, (imgs,))
    assert torch.autograd.gradgradcheck(lambda t: umae.unpatchify(t, 2, (4, 6), 2) ** 2, (x,))
    _fused_vs_reference_second_order(lambda t: umae.patchify(t, 2), (imgs,), TOL[torch.float64])
    _fused_vs_reference_second_order(lambda t: umae.unpatchify(t, 2, (4, 6), 2), (x,), TOL[torch.float64])


CREATE_GRAPH_WARNING = "ignore:Using backward\\(\\) with create_graph=True:UserWarning"


def _refuses_second_order(loss_fn, inp, ref_grad):
    """create_graph=True alone works (the first-order gradient, requiring grad); differentiating that
    gradient (a penalty, a Hessian-vector product) raises, never 0 or 'not used in the graph'."""
    loss = loss_fn(inp)
    (g,) = torch.autograd.grad(loss, inp, create_graph=True)
    assert g.requires_grad
    assert_close(g, ref_grad, name="first-order grad under create_graph", **TOL[torch.float32])
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(g.pow(2).sum(), inp)  # a gradient penalty through the op
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.grad(g, inp, torch.ones_like(g))  # a Hessian-vector product
    loss_fn(inp).backward(create_graph=True)  # and .backward(create_graph=True), the grad only read
    assert_close(inp.grad, ref_grad, name="grad after backward(create_graph=True)", **TOL[torch.float32])
    inp.grad = None


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
@pytest.mark.parametrize("device,impl", LOSS_IMPLS)
@pytest.mark.parametrize("op", ["mae_loss", "masked_mse_loss"])
def test_loss_double_backward_is_refused(device, impl, op):
    # was: 0 where the reference gives a second derivative, and a penalty "not used in the graph"
    imgs = randn(2, 3, 8, 8, device=device)
    pred = randn(2, 4, 48, device=device, requires_grad=True)
    mask = random_mask(2, 4, device, ratio=0.5)
    mask[:, 0] = 1
    target = umae.patchify(imgs, 4)
    if op == "mae_loss":
        fn = lambda p: umae.mae_loss(p, imgs, mask, 4)  # noqa: E731
    else:
        fn = lambda p: umae.masked_mse_loss(p, target, mask)  # noqa: E731
    assert_runs(op, impl, pred, imgs)
    with umae.use_backend("reference"):
        (ref,) = torch.autograd.grad(fn(pred), pred)
        # the reference's own second derivative exists (is what the fused path would drop)
        (g,) = torch.autograd.grad(fn(pred), pred, create_graph=True)
        assert torch.autograd.grad(g.pow(2).sum(), pred)[0].abs().max() > 0
    _refuses_second_order(fn, pred, ref)


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
@pytest.mark.parametrize("device,impl", UNIFORMITY_IMPLS)
def test_uniformity_double_backward_is_refused(device, impl):
    # the C++ op's first-order gradient did not require grad: terms built on it were dropped silently
    f = randn(6, 5, device=device, requires_grad=True)
    assert_runs("uniformity_loss", impl, f)
    with umae.use_backend("reference"):
        (ref,) = torch.autograd.grad(umae.uniformity_loss(f), f)
    _refuses_second_order(umae.uniformity_loss, f, ref)


@pytest.mark.filterwarnings(CREATE_GRAPH_WARNING)
@pytest.mark.parametrize("impl", cpu_impls("uniformity_loss"))
def test_uniformity_global_batch_double_backward_is_refused(impl, tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        f = randn(6, 5, requires_grad=True)
        with umae.use_backend("reference"):
            (ref,) = torch.autograd.grad(umae.uniformity_loss(f), f)
        _refuses_second_order(lambda t: umae.uniformity_loss(t, process_group=dist.group.WORLD), f, ref)
    finally:
        dist.destroy_process_group()


# ---- bad ids_restore ----------------------------------------------------------------------------

BAD_IDS = {
    "negative": ([0, -1, 2, 3], "-1 at 1"),
    "far negative": ([0, 1, -100000000, 3], "-100000000 at 2"),
    "too large": ([0, 1, 2, 4], "4 at 3"),  # was silently a mask token
    "far too large": ([0, 1, 2**40, 3], f"{2**40} at 2"),
    "repeated": ([0, 1, 1, 3], "1 at 2"),
}


@pytest.mark.parametrize("device,impl", RESTORE_IMPLS)
@pytest.mark.parametrize("case", list(BAD_IDS))
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
    out = k.forward(x, ids, tok, pos, has_cls=True)
    g = randn(N, 1 + L, D)
    gx, gtok = k.backward(g, ids, (N, 1 + keep, D), torch.float32, has_cls=True)
    tol = TOL[torch.float32]
    assert_close(out[:, 0], x[:, 0] + pos[:, 0], name="cls", **tol)
    assert_close(out[:, 1], x[:, 1] + pos[:, 1], name="kept", **tol)
    for o in (3, 6):
        assert_close(out[:, o], tok[:, 0] + pos[:, o], name=f"mask token {o}", **tol)
    for o in (2, 4, 5):  # bad ids: neither a token of x nor the mask token
        assert_close(out[:, o], pos[:, o], name=f"bad id row {o}", **tol)
    assert_close(gx[:, :2], g[:, :2], name="grad cls and kept", **tol)  # row 0 not overwritten by id -1
    assert_close(gtok, g[0, 3] + g[0, 6], name="grad mask token", **tol)  # the valid mask-token rows only


# ---- non-floating targets, D = 0 ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.complex64, torch.bool])
def test_masked_mse_refuses_non_floating_target(backend, dtype):
    pred, mask = randn(2, 4, 12), random_mask(2, 4)
    target = torch.ones(2, 4, 12, dtype=dtype)
    with pytest.raises(TypeError, match=rf"target must be float32, float16, bfloat16 or float64, got {dtype}"):
        umae.masked_mse_loss(pred, target, mask, backend=backend)
    with pytest.raises(TypeError, match=rf"imgs must be float32, float16, bfloat16 or float64, got {dtype}"):
        umae.mae_loss(pred, torch.ones(2, 3, 4, 4, dtype=dtype), mask, 2, backend=backend)


@pytest.mark.parametrize("impl", cpu_impls("uniformity_loss"))
@pytest.mark.parametrize("normalize", [True, False])
def test_uniformity_refuses_zero_features(impl, normalize):
    # the Triton path raised ZeroDivisionError; every path refuses (a D = 0 row cannot be L2-normalized)
    f = torch.zeros(4, 0)
    assert_runs("uniformity_loss", impl, f)
    for backend in (None, "reference"):
        with pytest.raises(ValueError, match=r"features must have at least one column \(D >= 1\): a 0-dimensional "
                           rf"feature has no {'direction to normalize' if normalize else 'similarity'}.*\(4, 0\)"):
            umae.uniformity_loss(f, normalize, backend=backend)


def test_cpp_uniformity_refuses_zero_features():
    if not _backend.EXT_LOADED:
        pytest.skip(_backend.EXT_REASON)
    with pytest.raises(RuntimeError, match=r"features must have at least one column"):
        torch.ops.umae.uniformity_loss(torch.zeros(4, 0), True, False, 1e-12)


# ---- numpy scalars, bools, image_size ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_numpy_scalars_are_accepted(backend):
    imgs = randn(2, 3, 8, 12)
    ref = umae.patchify(imgs, 4, backend=backend)
    for p in (np.int64(4), np.int32(4), np.uint8(4)):
        assert torch.equal(umae.patchify(imgs, p, backend=backend), ref)
        assert torch.equal(umae.unpatchify(ref, p, (np.int64(8), np.int16(12)), np.int64(3), backend=backend), imgs)
    pred, mask = randn(2, 6, 48), random_mask(2, 6)
    assert torch.equal(umae.mae_loss(pred, imgs, mask, np.int64(4), backend=backend),
                       umae.mae_loss(pred, imgs, mask, 4, backend=backend))
    x, noise = randn(2, 10, 4), torch.rand(2, 10)
    want = umae.random_masking(x, 0.7, noise, backend=backend)
    for r in (np.float32(0.7), np.float64(0.7)):
        got = umae.random_masking(x, r, noise, backend=backend)
        assert got[0].shape == want[0].shape and all(torch.equal(u, v) for u, v in zip(got, want))
    assert umae.random_masking(x, np.float32(0.25), noise, backend=backend)[0].shape == (2, 7, 4)  # int(10 * 0.75)


@pytest.mark.parametrize("call, err, match", [
    (lambda: umae.patchify(randn(1, 3, 8, 8), True), ValueError, "patch_size must be a positive int, got True"),
    (lambda: umae.patchify(randn(1, 3, 8, 8), np.True_), ValueError, "patch_size must be a positive int, got np.True_"),
    (lambda: umae.patchify(randn(1, 3, 8, 8), np.float64(4.0)), ValueError, "patch_size must be a positive int"),
    (lambda: umae.patchify(randn(1, 3, 8, 8), np.int64(0)), ValueError, "patch_size must be a positive int, got np"),
    (lambda: umae.random_masking(randn(1, 4, 2), True), ValueError, r"mask_ratio must be .*\), got True"),
    (lambda: umae.random_masking(randn(1, 4, 2), np.True_), ValueError, "mask_ratio must be a number"),
    (lambda: umae.random_masking(randn(1, 4, 2), np.float32(1.0)), ValueError, "mask_ratio must be a number"),
    (lambda: umae.random_masking(randn(1, 4, 2), torch.tensor(0.5)), ValueError, "mask_ratio must be a number"),
    (lambda: umae.unpatchify(randn(1, 4, 12), 2, -8), ValueError, "image_size must be positive, got -8"),
    (lambda: umae.unpatchify(randn(1, 4, 12), 2, (8, -8)), ValueError, r"image_size must be positive, got \(8, -8\)"),
    (lambda: umae.unpatchify(randn(1, 0, 12), 2, 0), ValueError, "image_size must be positive, got 0"),
    (lambda: umae.unpatchify(randn(1, 4, 12), 2, 4.0), TypeError, "image_size must be an int or a pair"),
    (lambda: umae.unpatchify(randn(1, 4, 12), 2, (4, True)), TypeError, "image_size must be an int or a pair"),
    (lambda: umae.unpatchify(randn(1, 4, 12), 2, 4, channels=True), ValueError, "channels must be a positive int"),
])
def test_bad_scalars_are_refused(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---- gradients of any layout, and the mask's gradient ------------------------------------------

# every op's case at sizes where the CPU kernels run inline (their grain) and where most split into tasks
LAYOUT_SHAPES = [dict(N=2, img=16, p=8, C=3, D=16, Dd=16, B=5), dict(N=9, img=48, p=8, C=3, D=200, Dd=136, B=70)]


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=["tiny", "larger"])
@pytest.mark.parametrize("op", list(registry.OPS))
@pytest.mark.parametrize("layout", ["sum", "strided"])
def test_backward_reads_any_gradient_layout(op, shape, layout):
    # the backward kernels read the incoming gradient by its strides: a .sum()'s is one value broadcast
    # (every stride 0), a transposed one has no unit stride; both gave copies before, now neither does
    torch.manual_seed(0)
    case = CASES[op](shape, torch.float32, "cpu")
    assert ops.implementation(op, *case.grad_inputs) == "cpp-cpu"

    def grads(backend):
        with umae.use_backend(backend):
            out = case.forward()
        out = out[0] if isinstance(out, tuple) else out
        if layout == "sum":
            return torch.autograd.grad(out.sum(), case.grad_inputs)
        g = torch.randn(tuple(reversed(out.shape)), generator=torch.Generator().manual_seed(1))
        if out.dim():  # out's shape, no unit stride (a loss's gradient is one number)
            g = g.permute(*reversed(range(out.dim())))
            assert g.stride(-1) != 1
        return torch.autograd.grad(out, case.grad_inputs, g)

    for got, ref, x in zip(grads("fused"), grads("reference"), case.grad_inputs):
        tol = registry.get(op).parity.grad[torch.float32]
        scale = float(ref.abs().max()) if registry.get(op).parity.grad_scaled else 1.0
        assert_close(got, ref, name=f"{op} grad of {tuple(x.shape)}", atol=tol["atol"] * max(scale, 1e-30),
                     rtol=tol["rtol"])


@pytest.mark.parametrize("op", ["mae_loss", "masked_mse_loss"])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64])
def test_loss_gradient_of_a_float_mask(op, mask_dtype):
    # the masked mean is in the kernel: a float mask that requires grad gets the reference's gradient
    # from the saved per-patch errors, (rows - loss) / sum(mask); a soft mask too
    dtype = torch.float64 if mask_dtype == torch.float64 else torch.float32
    imgs = randn(2, 3, 8, 8, dtype=dtype)
    pred = randn(2, 4, 48, dtype=dtype, requires_grad=True)
    mask = torch.rand(2, 4, dtype=mask_dtype).requires_grad_()
    target = umae.patchify(imgs, 4)
    fn = (lambda p, m: umae.mae_loss(p, imgs, m, 4)) if op == "mae_loss" else \
        (lambda p, m: umae.masked_mse_loss(p, target, m))
    assert ops.implementation(op, pred, imgs) == "cpp-cpu"
    got = torch.autograd.grad(fn(pred, mask), (pred, mask))
    with umae.use_backend("reference"):
        ref = torch.autograd.grad(fn(pred, mask), (pred, mask))
    for g, r, name in zip(got, ref, ("pred", "mask")):
        assert g.dtype == r.dtype, name
        assert_close(g, r, name=f"grad {name}", **TOL[dtype])
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(fn, (pred.detach().requires_grad_(), mask.detach().requires_grad_()))
    # a mask with nothing removed: loss 0, the reference's gradient (the rows, divided by 1)
    zero = torch.zeros(2, 4, dtype=mask_dtype, requires_grad=True)
    got = torch.autograd.grad(fn(pred, zero), zero)[0]
    with umae.use_backend("reference"):
        ref = torch.autograd.grad(fn(pred, zero), zero)[0]
    assert_close(got, ref, name="grad of an all-zero mask", **TOL[dtype])


def test_the_cached_decision_follows_the_switch():
    # the fused-or-reference decision is cached per call key: set_backend / use_impl / backend= change it
    x = randn(2, 3, 8, 8)
    with umae.use_backend("fused"):
        assert _backend.fused(registry.get("patchify"), (x,), None)
        with umae.use_backend("reference"):
            assert not _backend.fused(registry.get("patchify"), (x,), None)
            assert _backend.fused(registry.get("patchify"), (x,), "fused")
        assert not _backend.fused(registry.get("patchify"), (x,), "reference")
        assert _backend.fused(registry.get("patchify"), (x,), None)
        spec, f = registry.get("uniformity_loss"), randn(5, 4, dtype=torch.float64)
        assert _backend.fused(spec, (f,), None)
        if triton_interpreted():
            with ops.use_impl("triton-interpreter"):
                assert not _backend.fused(spec, (f,), None)  # the Triton kernel takes no fp64
                assert _backend.fused(spec, (f.float(),), None)
            assert _backend.fused(spec, (f,), None)


# ---- forward-mode AD ----------------------------------------------------------------------------

FORWARD_AD = r"umae::.*forward-mode AD \(torch.func.jvp, torch.autograd.forward_ad\) is not supported by the fused"


def _jvp_cases():
    """op -> (its input, a function of it through the public op), fp64 (the C++ kernels take it)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    imgs, mask, noise = r(2, 3, 8, 8), (torch.rand(2, 4, generator=g) < 0.5).double(), torch.rand(2, 4, generator=g)
    target, ids = umae.patchify(imgs, 4, backend="reference"), torch.argsort(torch.rand(2, 4, generator=g), 1)
    pos, cls, tok, pos2 = r(1, 4, 16), r(1, 1, 16), r(1, 1, 16), r(1, 5, 16)
    return {"patchify": (imgs, lambda v: umae.patchify(v, 4)),
            "unpatchify": (r(2, 4, 48), lambda v: umae.unpatchify(v, 4, 8, 3)),
            "masked_mse_loss": (r(2, 4, 48), lambda v: umae.masked_mse_loss(v, target, mask)),
            "mae_loss": (r(2, 4, 48), lambda v: umae.mae_loss(v, imgs, mask, 4)),
            "random_masking": (r(2, 4, 16), lambda v: umae.random_masking(v, 0.5, noise, pos, cls)[0]),
            "restore_tokens": (r(2, 3, 16), lambda v: umae.restore_tokens(v, ids, tok, pos2)),
            "uniformity_loss": (r(5, 16), lambda v: umae.uniformity_loss(v))}


@pytest.mark.parametrize("op", list(registry.OPS))
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused_not_zero(op, api):
    # was: zero tangents (func.jvp) or none (forward_ad) from every fused op, without a word
    import torch.autograd.forward_ad as fwAD

    x, fn = _jvp_cases()[op]
    assert ops.implementation(op, x) == "cpp-cpu"
    tan = torch.randn_like(x)

    def tangent(backend):
        with umae.use_backend(backend):
            if api == "func.jvp":
                return torch.func.jvp(fn, (x,), (tan,))[1]
            with fwAD.dual_level():
                return fwAD.unpack_dual(fn(fwAD.make_dual(x, tan))).tangent
    ref = tangent("reference")
    assert ref is not None and ref.abs().max() > 0  # the reference's tangent exists
    with pytest.raises(RuntimeError, match=FORWARD_AD):
        tangent("fused")
