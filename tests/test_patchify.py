"""patchify / unpatchify: fused (C++ CPU, CUDA) vs the reference, forward and backward."""
import numpy as np
import pytest
import torch
from umae_testing import (DEVICES, DTYPES, LAYOUT_SHAPES, TOL, assert_backward_reads_any_gradient_layout,
                          assert_forward_mode_ad_refused, assert_grid_row, assert_second_order_matches, cuda_only,
                          grid_params, needs_ext, randn, runs_impl)

import umae
from umae import ops
from umae.ops.patchify_op import patchify_reference, unpatchify_reference

SHAPES = [  # (N, C, H, W, p): odd batches, C 1 and 3, H != W, L not a power of two
    (3, 3, 32, 48, 4), (1, 1, 28, 14, 14), (5, 3, 16, 16, 2), (2, 3, 64, 48, 16), (7, 1, 6, 10, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,H,W,p", SHAPES)
def test_patchify_parity(device, dtype, N, C, H, W, p):
    imgs = randn(N, C, H, W, dtype=dtype, device=device, requires_grad=True)
    out = umae.patchify(imgs, p)
    ref = patchify_reference(imgs, p)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref)  # a permutation: bitwise
    g = randn(*ref.shape, dtype=dtype, device=device)
    (gi,) = torch.autograd.grad(out, imgs, g)
    (gr,) = torch.autograd.grad(ref, imgs, g)
    assert torch.equal(gi, gr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,H,W,p", SHAPES)
def test_unpatchify_parity(device, dtype, N, C, H, W, p):
    h, w = H // p, W // p
    x = randn(N, h * w, p * p * C, dtype=dtype, device=device, requires_grad=True)
    out = umae.unpatchify(x, p, (H, W), channels=C)
    ref = unpatchify_reference(x, p, h, w, C)
    assert torch.equal(out, ref)
    assert torch.equal(umae.patchify(out, p), x)  # exact inverse
    g = randn(*ref.shape, dtype=dtype, device=device)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = randn(4, 40, 36, 3, device=device)
    imgs = base.permute(0, 3, 1, 2)[:, :, 4:, ::1]  # channels-last view, offset rows
    assert not imgs.is_contiguous()
    assert torch.equal(umae.patchify(imgs, 4), patchify_reference(imgs, 4))
    x = randn(4, 20, 48 * 2, device=device)[:, :, ::2]  # strided last dim
    assert torch.equal(umae.unpatchify(x, 4, (16, 20)), unpatchify_reference(x, 4, 4, 5, 3))


def test_square_image_size_int_and_default_channels():
    x = randn(2, 16, 48)
    assert umae.unpatchify(x, 4, 16).shape == (2, 3, 16, 16)


def test_gradcheck_float64():
    imgs = randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: umae.patchify(t, 2), (imgs,))
    x = randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: umae.unpatchify(t, 2, (6, 4), channels=2), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.umae.patchify.default, (randn(3, 3, 12, 8, device=device, requires_grad=True), 4))
    torch.library.opcheck(torch.ops.umae.unpatchify.default,
                          (randn(3, 6, 48, device=device, requires_grad=True), 4, 3, 2, 3))


def test_empty_batch_is_empty():
    assert umae.patchify(torch.randn(0, 3, 8, 8), 4).shape == (0, 4, 48)


def test_reference_backend_uses_reference(monkeypatch):
    import umae.ops.patchify_op as mod

    calls = []
    monkeypatch.setattr(mod, "patchify_reference", lambda *a: calls.append(a) or patchify_reference(*a))
    imgs = randn(1, 3, 8, 8)
    umae.patchify(imgs, 4)
    assert not calls
    with umae.use_backend("reference"):
        umae.patchify(imgs, 4)
    assert len(calls) == 1


@pytest.mark.parametrize("call, match", [
    (lambda: umae.patchify(torch.randn(3, 8, 8), 4), "imgs must have 4 dims"),
    (lambda: umae.patchify(torch.randn(1, 3, 10, 8), 4), r"imgs height and width \(10, 8\)"),
    (lambda: umae.patchify(torch.randn(1, 3, 8, 8), 0), "patch_size must be a positive int"),
    (lambda: umae.patchify(torch.ones(1, 3, 8, 8, dtype=torch.int32), 4), "imgs must be float32"),
    (lambda: umae.patchify([1, 2], 4), "imgs must be a torch.Tensor"),
    (lambda: umae.unpatchify(torch.randn(1, 5, 48), 4, 8), r"x must have shape \(N, 4, 48\)"),
    (lambda: umae.unpatchify(torch.randn(1, 4, 48), 4, (8, 9)), "image_size"),
    (lambda: umae.unpatchify(torch.randn(1, 4, 48), 4, "8"), "image_size must be an int"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@cuda_only
def test_cuda_large_offsets_int64():
    # N*L*K beyond 2**31 elements would overflow int32 offsets.
    imgs = torch.randn(14300, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    out = umae.patchify(imgs, 16)
    assert out.numel() > 2**31
    assert torch.equal(out[-1], patchify_reference(imgs[-1:], 16)[0])


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("patchify"))
@runs_impl
def test_patchify_grid(device, impl, dtype, variant):
    # shapes, flags, layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("patchify", device, impl, dtype, variant)


@pytest.mark.parametrize("device,impl,dtype,variant", grid_params("unpatchify"))
@runs_impl
def test_unpatchify_grid(device, impl, dtype, variant):
    # shapes, flags, layouts (transposed, strided, expanded) and autocast: umae check's rows
    assert_grid_row("unpatchify", device, impl, dtype, variant)


# ---- edges: second order, argument types, gradient layouts, forward-mode AD ----

@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@needs_ext
def test_patchify_unpatchify_double_backward(device):
    # linear: the backward of patchify's backward (unpatchify) is patchify again, through the C++ ops' autograd
    imgs = randn(1, 2, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    x = randn(1, 6, 8, dtype=torch.float64, device=device, requires_grad=True)
    assert ops.implementation("patchify", imgs) == ops.implementation("unpatchify", x) != "reference"
    assert torch.autograd.gradgradcheck(lambda t: umae.patchify(t, 2) ** 2, (imgs,))
    assert torch.autograd.gradgradcheck(lambda t: umae.unpatchify(t, 2, (4, 6), 2) ** 2, (x,))
    assert_second_order_matches(lambda t: umae.patchify(t, 2), (imgs,), TOL[torch.float64])
    assert_second_order_matches(lambda t: umae.unpatchify(t, 2, (4, 6), 2), (x,), TOL[torch.float64])


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_numpy_scalars_are_accepted(backend):
    imgs = randn(2, 3, 8, 12)
    ref = umae.patchify(imgs, 4, backend=backend)
    for p in (np.int64(4), np.int32(4), np.uint8(4)):
        assert torch.equal(umae.patchify(imgs, p, backend=backend), ref)
        assert torch.equal(umae.unpatchify(ref, p, (np.int64(8), np.int16(12)), np.int64(3), backend=backend), imgs)


@pytest.mark.parametrize("call, err, match", [
    (lambda: umae.patchify(randn(1, 3, 8, 8), True), ValueError, "patch_size must be a positive int, got True"),
    (lambda: umae.patchify(randn(1, 3, 8, 8), np.True_), ValueError, "patch_size must be a positive int, got np.True_"),
    (lambda: umae.patchify(randn(1, 3, 8, 8), np.float64(4.0)), ValueError, "patch_size must be a positive int"),
    (lambda: umae.patchify(randn(1, 3, 8, 8), np.int64(0)), ValueError, "patch_size must be a positive int, got np"),
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


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=["tiny", "larger"])
@pytest.mark.parametrize("op", ["patchify", "unpatchify"])
@pytest.mark.parametrize("layout", ["sum", "strided"])
def test_backward_reads_any_gradient_layout(op, shape, layout):
    assert_backward_reads_any_gradient_layout(op, shape, layout)


@pytest.mark.parametrize("op", ["patchify", "unpatchify"])
@pytest.mark.parametrize("api", ["func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused_not_zero(op, api):
    assert_forward_mode_ad_refused(op, api)
