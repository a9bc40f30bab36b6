"""The backend switch, backend_info, and the C++/CUDA build."""
import glob
import os
import subprocess
import sys

import pytest
import torch

import umae
from umae import _backend


def test_set_and_use_backend():
    assert umae.get_backend() == "fused"
    with umae.use_backend("reference"):
        assert umae.get_backend() == "reference"
        with umae.use_backend("fused"):
            assert umae.get_backend() == "fused"
        assert umae.get_backend() == "reference"
    assert umae.get_backend() == "fused"
    with pytest.raises(ValueError, match="backend must be one of"):
        umae.set_backend("fast")


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("UMAE_BACKEND",)}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_env_var_read_once_at_import():
    r = _run("import os, umae; print(umae.get_backend()); os.environ['UMAE_BACKEND']='fused'; "
             "print(umae.get_backend())", UMAE_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reference", "reference"]
    r = _run("import umae", UMAE_BACKEND="bogus")
    assert r.returncode != 0 and "backend must be one of" in r.stderr


def test_backend_info_reports_every_op_and_reason():
    info = umae.backend_info(["cpu", "cuda"])
    assert set(info) == set(_backend.OPS)
    assert info["patchify"]["cpu"].startswith("cpp-cpu")
    with umae.use_backend("reference"):
        assert all(v["cpu"].startswith("reference: backend is 'reference'") for v in umae.backend_info(["cpu"]).values())
    assert "backend = " in umae.format_backend_info()


def test_triton_on_cpu_without_interpreter_falls_back_and_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    impl, why = _backend.choose("uniformity_loss", "cpu")
    assert impl == "reference" and "Triton needs a GPU" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.choose("uniformity_loss", "cpu")[0] == "triton-interpreter"


def test_extension_loaded():
    assert _backend.EXT_LOADED, _backend.EXT_REASON


@pytest.mark.skipif(torch.version.cuda is None, reason="torch built without CUDA: setup.py builds CPU sources only")
def test_cuda_sources_compiled_for_sm90():
    # setup.py compiles csrc/cuda/*.cu with nvcc for sm_90 whenever torch has CUDA and nvcc is found
    # (no GPU needed), so on our CPU machines this is the compile check of the CUDA kernels.
    if os.environ.get("UMAE_NO_CUDA") == "1":
        pytest.skip("UMAE_NO_CUDA=1 build")
    for op in ("patchify", "unpatchify", "patch_mse", "patch_mse_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"umae::{op}", "CUDA"), f"no CUDA kernel for {op}"
    (so,) = glob.glob(os.path.join(os.path.dirname(umae.__file__), "_C*.so"))
    blob = open(so, "rb").read()
    assert b".nv_fatbin" in blob and b"SM_900" in blob, "extension has no sm_90 device code"
