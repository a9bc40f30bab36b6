"""`umae check`, the parity check for a user's CI: it passes here, and it fails (exit 1, the row
named) when an op's kernel is replaced by a wrong one."""
import contextlib
import warnings
import xml.etree.ElementTree as ET

import pytest
import torch

import umae
from umae.ops import registry
from umae.cli.main import main
from umae.ops.patchify_op import patchify_reference


@contextlib.contextmanager
def _cpu_kernel(name, fn):
    """`fn` as the CPU kernel of umae::<name> while the block runs (the C++ kernel after it)."""
    lib = torch.library.Library("umae", "IMPL")
    try:
        with warnings.catch_warnings():  # the override is the point: torch warns about it
            warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
            lib.impl(name, fn, "CPU")
        yield
    finally:
        lib._destroy()


# ---- kernels wrong in one place: the check's grid reaches each --------------------------------

def _uniformity(read=lambda f: f, wrong=lambda f, normalize, exclude_diagonal: False, loss_factor=1.05,
                grad_factor=1.05):
    """A CPU kernel pair for umae::uniformity_loss(_with_grad), below autograd (so by hand): the loss and
    its gradient in float64 on the features as `read` reads them, scaled by the factors where `wrong` says."""

    def with_grad(features, normalize, exclude_diagonal, eps):
        acc = torch.promote_types(features.dtype, torch.float32)
        f = read(features).double()
        B = f.shape[0]
        n = f.norm(dim=1, keepdim=True).clamp_min(eps) if normalize else torch.ones(B, 1, dtype=f.dtype)
        z = f / n
        s = z @ z.T
        if exclude_diagonal:
            s.fill_diagonal_(0)
        c = 1.0 / (B * (B - 1) if exclude_diagonal else B * B)
        dz = 4 * c * s @ z
        df = (dz - z * (z * dz).sum(1, keepdim=True)) / n if normalize else dz
        k = wrong(features, normalize, exclude_diagonal)
        return ((s.pow(2).sum() * c) * (loss_factor if k else 1)).to(acc), (df * (grad_factor if k else 1)).to(acc)

    return {"uniformity_loss_with_grad": with_grad, "uniformity_loss": lambda *a: with_grad(*a)[0]}


def _row_major(f):
    # reads f as if it were row-major: what the Triton S Z product did with a transposed z (B <= D)
    return f.as_strided(f.shape, (f.shape[1], 1)) if f.shape[0] <= f.shape[1] else f


def _gram_under_autocast(features, normalize, exclude_diagonal, eps):
    # the C++ Gram path before autocast was excluded inside the kernel: at::mm came back in bf16
    z = torch.nn.functional.normalize(features.float(), dim=1)
    g = z.T @ z
    if g.dtype != torch.float32:
        raise RuntimeError(f"expected scalar type Float but found {g.dtype}")
    return _uniformity()["uniformity_loss_with_grad"](features, normalize, exclude_diagonal, eps)


def _masking_backward(double_pos=False):
    def backward(grad_out, ids_restore, has_cls, need_x, need_pos, need_cls, x_dtype, pos_dtype, cls_dtype):
        # x + pos's gradient: kept row i (rank ids_restore[n, i] < len_keep) gets its output row's, the rest 0
        N, L = ids_restore.shape
        c = int(has_cls)
        keep = grad_out.shape[1] - c
        g = grad_out.double()
        src = (ids_restore.clamp(max=max(keep - 1, 0)) + c)[..., None].expand(N, L, g.shape[2])
        gx = torch.where((ids_restore < keep)[..., None], g.gather(1, src), 0.0)
        empty = grad_out.new_empty((0,))
        return (gx.to(x_dtype) if need_x else empty.to(x_dtype),
                (gx.sum(0, keepdim=True) * (2 if double_pos else 1)).to(pos_dtype) if need_pos else empty.to(pos_dtype),
                g[:, :1].sum(0, keepdim=True).to(cls_dtype) if need_cls else empty.to(cls_dtype))

    return {"random_masking_backward": backward}


def _masking_wrong_from_the_4th_sample():
    from umae.ops.random_masking_op import random_masking_reference

    def forward(x, noise, pos_embed, cls_token, len_keep):
        out, mask, ids = random_masking_reference(x, 1 - (len_keep + 0.5) / x.shape[1], noise, pos_embed, cls_token)
        out = out.clone()
        out[3:] = out[3:].roll(1, dims=1)
        return out, mask, ids

    return {"random_masking": forward}


def _restore_backward(double_pos=False):
    def backward(grad_out, ids_restore, len_x, has_cls, need_pos, x_dtype, tok_dtype, pos_dtype):
        # output row c + i is x's row c + ids_restore[n, i] where that is < len_x - c, the mask token elsewhere
        N, L = ids_restore.shape
        c, D = int(has_cls), grad_out.shape[2]
        keep = len_x - c
        g = grad_out.double()
        kept = ids_restore < keep
        gx = torch.zeros(N, len_x, D, dtype=torch.float64)
        gx[:, :c] = g[:, :c]
        rows = g[:, c:]
        n_idx, i_idx = kept.nonzero(as_tuple=True)
        gx[n_idx, c + ids_restore[n_idx, i_idx]] = rows[n_idx, i_idx]
        gtok = rows[~kept].sum(0).view(1, 1, D)
        gpos = g.sum(0, keepdim=True) * (2 if double_pos else 1)
        return (gx.to(x_dtype), gtok.to(tok_dtype),
                gpos.to(pos_dtype) if need_pos else grad_out.new_empty((0,)).to(pos_dtype))

    return {"restore_tokens_backward": backward}


@contextlib.contextmanager
def _cpu_kernels(kernels: dict, autocast_fallthrough=()):
    """`kernels` ({op: fn}) at the CPU key while the block runs; the ops in `autocast_fallthrough` pass
    autocast through to their kernels (as every op did before the kernels excluded it)."""
    lib = torch.library.Library("umae", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
            for name, fn in kernels.items():
                lib.impl(name, fn, "CPU")
            for name in autocast_fallthrough:
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        lib._destroy()


def test_check_passes_here_with_a_row_per_op_impl_dtype_and_junit(tmp_path, capsys):
    junit = tmp_path / "check.xml"
    # the C++ kernels (the interpreted Triton ones: each op's test_grid runs the same rows)
    assert main(["check", "--impls", "cpp-cpu", "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "FAIL" not in out
    cases = ET.parse(junit).getroot()
    assert cases.get("failures") == "0"
    names = {(c.get("classname").split(".")[-1], c.get("name")) for c in cases.iter("testcase")}
    for op in registry.OPS:
        for dtype in ("float32", "bfloat16", "float16"):
            for check in ("forward", "backward"):
                assert (op, f"cpu-cpp-cpu-{dtype}-{check}") in names, (op, dtype, check)
        assert (op, "cpu-cpp-cpu-float32-opcheck") in names, op


def test_check_fails_on_a_wrong_forward_and_names_the_row(tmp_path, capsys):
    def wrong(imgs, p):  # one element off
        out = patchify_reference(imgs, p).contiguous()
        out.view(-1)[7] += 1
        return out

    with _cpu_kernel("patchify", wrong):
        rc = main(["check", "--ops", "patchify", "--impls", "cpp-cpu", "--dtypes", "float32", "--no-opcheck",
                   "--junit", str(tmp_path / "j.xml")])
    out = capsys.readouterr().out
    assert rc == 1
    bad = [line for line in out.splitlines() if "FAIL" in line]
    assert bad and all(line.split()[:5] == ["patchify", "cpu", "cpp-cpu", "float32", "forward"] for line in bad), out
    assert "1 failed" in out
    failures = [c for c in ET.parse(tmp_path / "j.xml").getroot().iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["cpu-cpp-cpu-float32-forward"]


@pytest.mark.parametrize("factor", [1.0, 1.03])
def test_check_fails_on_a_gradient_off_by_a_few_percent(capsys, factor):
    # the uniformity loss's autograd asks one kernel for the loss and its gradient: the loss right,
    # the gradient right (it passes) or 3% large (it fails)
    with _cpu_kernels(_uniformity(wrong=lambda *a: True, loss_factor=1.0, grad_factor=factor)):
        rc = main(["check", "--ops", "uniformity_loss", "--impls", "cpp-cpu", "--dtypes", "float32", "--no-opcheck"])
    out = capsys.readouterr().out
    assert rc == (factor != 1.0)
    rows = {tuple(line.split()[:5]): line for line in out.splitlines() if line.startswith("uniformity_loss")}
    assert "pass" in rows[("uniformity_loss", "cpu", "cpp-cpu", "float32", "forward")], out
    want = "FAIL" if factor != 1.0 else "pass"
    assert want in rows[("uniformity_loss", "cpu", "cpp-cpu", "float32", "backward")], out


def test_check_refuses_a_device_it_does_not_have(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["check", "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_check_fails_on_a_zero_loss_gradient_in_every_dtype(capsys, dtype):
    # a mean's gradient is small (1 / the removed pixels): compared at a tolerance of absolute size
    # it could be 0 and pass; the check compares it relative to its own size
    def zero(grad, mask, pred, target, patch_size, norm_pix, eps):
        return torch.zeros_like(pred)

    with _cpu_kernel("patch_mse_backward", zero):
        rc = main(["check", "--ops", "mae_loss", "--impls", "cpp-cpu", "--dtypes", dtype, "--no-opcheck"])
    out = capsys.readouterr().out
    assert rc == 1
    rows = {tuple(line.split()[:5]): line for line in out.splitlines() if line.startswith("mae_loss")}
    assert "pass" in rows[("mae_loss", "cpu", "cpp-cpu", dtype, "forward")], out
    assert "FAIL" in rows[("mae_loss", "cpu", "cpp-cpu", dtype, "backward")], out


def test_check_fails_when_nothing_fused_ran(capsys, monkeypatch):
    # UMAE_BACKEND=reference in the environment does not make the check compare the reference with
    # itself; with no implementation to compare (--impls of another device) it exits 1, not 0
    with umae.use_backend("reference"):
        assert main(["check", "--ops", "patchify", "--dtypes", "float32", "--no-opcheck"]) == 0
    assert "cpp-cpu" in capsys.readouterr().out
    assert main(["check", "--ops", "patchify", "--impls", "triton", "--no-opcheck"]) == 1
    assert "nothing passed" in capsys.readouterr().err


WRONG = {  # what is wrong -> (op, its kernels, what the failing input's name must show)
    "uniformity only with exclude_diagonal": (
        "uniformity_loss", _uniformity(wrong=lambda f, n, e: e), "exclude_diagonal=1"),
    "uniformity only with normalize=False": (
        "uniformity_loss", _uniformity(wrong=lambda f, n, e: not n), "normalize=0"),
    "uniformity only for B > D": (
        "uniformity_loss", _uniformity(wrong=lambda f, n, e: f.shape[0] > f.shape[1]), "B=70,D=16"),
    "uniformity only for non-row-major input": (
        "uniformity_loss", _uniformity(wrong=lambda f, n, e: not f.is_contiguous()), ""),
    "uniformity reads a transposed input as row-major (B <= D)": (
        "uniformity_loss", _uniformity(read=_row_major), ""),
    "uniformity's Gram re-cast by autocast (B > D)": (
        "uniformity_loss", dict(_uniformity(), uniformity_loss_with_grad=_gram_under_autocast), ""),
    "random_masking doubles pos_embed's gradient": (
        "random_masking", _masking_backward(double_pos=True), "pos_embed=1"),
    "random_masking wrong from the 4th sample on": (
        "random_masking", _masking_wrong_from_the_4th_sample(), ""),
    "restore_tokens doubles pos_embed's gradient": (
        "restore_tokens", _restore_backward(double_pos=True), "pos_embed=1"),
}


@pytest.mark.parametrize("what", list(WRONG))
def test_check_fails_a_kernel_wrong_in_one_place(capsys, what):
    op, kernels, shown = WRONG[what]
    fallthrough = ("uniformity_loss", "uniformity_loss_with_grad") if "autocast" in what else ()
    with _cpu_kernels(kernels, fallthrough):
        rc = main(["check", "--ops", op, "--impls", "cpp-cpu", "--dtypes", "float32", "--no-opcheck"])
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if "FAIL" in line]
    assert rc == 1 and bad, out
    assert all(shown in line for line in bad), out


@pytest.mark.parametrize("op,kernels", [("uniformity_loss", _uniformity()), ("random_masking", _masking_backward()),
                                        ("restore_tokens", _restore_backward())])
def test_the_wrong_kernels_are_right_without_their_fault(capsys, op, kernels):
    # the harness of the test above: the same Python kernels without the fault pass the check
    with _cpu_kernels(kernels):
        rc = main(["check", "--ops", op, "--impls", "cpp-cpu", "--dtypes", "float32", "--no-opcheck"])
    assert rc == 0, capsys.readouterr().out
