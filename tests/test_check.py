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


def test_check_passes_here_with_a_row_per_op_impl_dtype_and_junit(tmp_path, capsys):
    junit = tmp_path / "check.xml"
    assert main(["check", "--junit", str(junit)]) == 0
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
    def wrong(features, normalize, exclude_diagonal, eps):
        # below autograd, so by hand: L = |Z^T Z|_F^2 / B^2 of the rows z = f / |f| (the default call)
        assert normalize and not exclude_diagonal
        f = features.double()
        n = f.norm(dim=1, keepdim=True)
        z = f / n
        gram = z.T @ z
        dz = 4 * z @ gram / f.shape[0] ** 2
        df = (dz - z * (z * dz).sum(1, keepdim=True)) / n
        return (gram.pow(2).sum() / f.shape[0] ** 2).float(), (df * factor).to(features.dtype)

    with _cpu_kernel("uniformity_loss_with_grad", wrong):
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
