"""The backend switch, backend_info, and the C++/CUDA build."""
import contextlib
import glob
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from umae_testing import DEVICES, HANG_GUARD, OP_TESTS, randn

import umae
from umae import bench, ops
from umae.ops import _common, registry
from umae.ops._common import triton_interpreted
from umae.bench import cases


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
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=HANG_GUARD)


def test_env_var_read_once_at_import():
    r = _run("import os, umae; print(umae.get_backend()); os.environ['UMAE_BACKEND']='fused'; "
             "print(umae.get_backend())", UMAE_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reference", "reference"]
    # an invalid value: the import works, the first op (or get_backend) refuses it, naming the variable
    r = _run("import torch, umae\nx = torch.rand(1, 3, 4, 4)\ntry:\n    umae.patchify(x, 2)\nexcept ValueError as e:\n"
             "    print(e)\numae.set_backend('fused')\nprint(tuple(umae.patchify(x, 2).shape))", UMAE_BACKEND="bogus")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["UMAE_BACKEND='bogus' is not a backend; set it to one of fused, reference or unset it",
                                     "(1, 4, 12)"], r.stdout


def test_backend_info_reports_every_op_and_reason():
    info = umae.backend_info(["cpu", "cuda"])
    assert list(info) == list(registry.OPS)
    assert info["patchify"]["cpu"].startswith("cpp-cpu")
    with umae.use_backend("reference"):
        assert all(v["cpu"].startswith("reference: backend is 'reference'") for v in umae.backend_info(["cpu"]).values())
    assert "backend = " in umae.format_backend_info()


def test_triton_on_cpu_without_interpreter_falls_back_and_says_so(monkeypatch):
    assert ops.choose("uniformity_loss", "cpu")[0] == "cpp-cpu"  # the C++ kernel comes first on CPU
    with ops.use_impl("triton-interpreter"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        impl, why = ops.choose("uniformity_loss", "cpu")
        assert impl == "reference" and "Triton needs a GPU" in why
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert ops.choose("uniformity_loss", "cpu")[0] == "triton-interpreter"
        assert ops.choose("patchify", "cpu")[0] == "cpp-cpu"  # an op without that impl keeps its own
    with pytest.raises(ValueError, match="use_impl takes one of"):
        with ops.use_impl("tpu"):
            pass


def test_cuda_kernels_chosen_only_for_an_arch_the_extension_holds():
    ok = _common.cuda_arch_ok
    assert ok((9, 0), ["9.0"]) and not ok((8, 0), ["9.0"]) and not ok((10, 0), ["9.0"]) and not ok((12, 0), ["9.0"])
    assert ok((8, 6), ["8.0"]) and not ok((8, 0), ["8.6"])  # SASS runs on later minors of its major
    assert ok((10, 0), ["9.0+PTX"]) and ok((9, 0), ["8.0", "9.0a"])  # PTX runs on later archs
    from umae.ops import _build

    assert isinstance(_build.CUDA_ARCHS, list)  # setup.py records what it built


def test_extension_loaded():
    assert _common.EXT_LOADED, _common.EXT_REASON


@pytest.mark.skipif(torch.version.cuda is None, reason="torch built without CUDA: setup.py builds CPU sources only")
def test_cuda_sources_compiled_for_sm90():
    # setup.py compiles csrc/cuda/*.cu with nvcc for sm_90 whenever torch has CUDA and nvcc is found
    # (no GPU needed), so on our CPU machines this is the compile check of the CUDA kernels.
    if os.environ.get("UMAE_NO_CUDA") == "1":
        pytest.skip("UMAE_NO_CUDA=1 build")
    for op in ("patchify", "unpatchify", "patch_mse", "patch_mse_with_rows", "patch_mse_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"umae::{op}", "CUDA"), f"no CUDA kernel for {op}"
    (so,) = glob.glob(os.path.join(os.path.dirname(umae.__file__), "_C*.so"))
    blob = open(so, "rb").read()
    assert b".nv_fatbin" in blob and b"SM_900" in blob, "extension has no sm_90 device code"


@pytest.fixture
def cuda_extension():
    """(the built extension's path, csrc/) when it holds sm_90 code; skips CPU-only builds."""
    if torch.version.cuda is None:
        pytest.skip("torch built without CUDA: setup.py builds CPU sources only")
    if os.environ.get("UMAE_NO_CUDA") == "1":
        pytest.skip("UMAE_NO_CUDA=1 build")
    from umae.verify import audit

    ext = audit.extension()
    assert ext, "no sm_90 extension with its csrc/ beside it"
    return ext


def test_cuda_kernels_static_audit(cuda_extension):
    # the extension's sm_90 kernels, read with cuobjdump / nvdisasm (umae.verify.audit.cuda_audit):
    # no spills, shared memory in bounds, >= 25% H100 occupancy, and every 16-byte access of the
    # vectorized instantiations compiled to one 128-bit LDG / STG
    from umae.verify import audit

    rows = audit.cuda_audit(*cuda_extension)
    problems = [f"{r['name']}: {p}" for r in rows for p in audit.cuda_problems(r)]
    assert not problems, "\n".join(problems)
    families = {r["name"].split("<")[0] for r in rows}
    assert families == {"patchify_kernel", "unpatchify_kernel", "patch_mse_kernel"}, families
    for fam in families:  # each has its 16-byte instantiations, and they move data with 128-bit accesses
        assert any(r["pack"] > 0 for r in rows if r["name"].startswith(fam + "<")), fam


_BAD_PTX = """
.extern .shared .align 16 .b8 smem[];
.entry k(
	.param .u64 k_param_0
)
{
	.reg .b64 %rd<4>;
	ld.param.u64 %rd1, [k_param_0];
	mov.u32 %r1, smem;
	{ .reg .b64 %tmp;
	  cvt.u64.u32 %tmp, %r1;
	  cvta.shared.u64 %rd2, %tmp; }
	add.s64 %rd3, %rd2, 16;
	ld.global.nc.v4.u32 {%r2,%r3,%r4,%r5}, [%rd1];
	st.global.v4.b32 [%rd3], {%r2, %r3, %r4, %r5};
	ret;
}
"""


def test_shared_address_check_flags_a_global_store_to_shared():
    from umae.verify import audit

    assert audit.shared_addresses_used_as_global(_BAD_PTX) == ["k: st.global.v4.b32 [%rd3]"]
    assert audit.shared_addresses_used_as_global(_BAD_PTX.replace("st.global", "st.shared")) == []


def test_cuda_kernels_never_use_a_shared_address_globally(cuda_extension):
    # The first GPU run (bench/results/h200/2026-11-27-first) faulted at the first patchify launch
    # (cudaErrorInvalidAddressSpace): the strips' shared side went through ld.global.nc / st.global.
    # It compiled and passed every CPU test; the embedded PTX shows it (setup.py builds '+PTX').
    from umae.verify import audit

    ptx = audit.extension_ptx(cuda_extension[0])
    assert ptx.count(".entry") >= 40 and ".shared" in ptx, "the extension embeds no PTX of its kernels"
    bad = audit.shared_addresses_used_as_global(ptx)
    assert not bad, "\n".join(bad)


# ---- the registry is the one list of ops, and backend_info says what runs -------------

class _UmaeOps(TorchDispatchMode):
    """Records the umae:: custom ops that execute (the fused kernels); references run aten only."""

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "umae":
            self.ran.append((func.name(), {a.device.type for a in args if isinstance(a, torch.Tensor)}))
        return func(*args, **(kwargs or {}))


# every op's benchmark case at a size the interpreter runs in milliseconds
TINY = dict(N=2, img=8, p=4, C=3, D=24, Dd=16, clips=2, frames=4, ts=2, ratio=0.75)


def _preferences(device):
    """None (the registry's order) and every implementation name the device has."""
    return [None] + sorted({i.name for op in registry.OPS.values() for i in op.impls_for(device)})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("op", list(registry.OPS))
def test_backend_info_is_what_runs(op, dtype, device):
    from umae.verify import jit

    spec = registry.get(op)
    triton_fns = [f for o in registry.OPS.values() if o.kernels for f in jit.kernels_of(o.kernels)]
    for prefer in _preferences(device):
        for backend in ("fused", "reference"):
            with umae.use_backend(backend), (ops.use_impl(prefer) if prefer else contextlib.nullcontext()):
                said = umae.backend_info([device], dtype)[op][device].split(":")[0]
                case = bench.case(op, TINY, dtype, device)
                with _UmaeOps() as rec, jit.recording(triton_fns, run=True) as launches:
                    out = case.forward()
                    outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t.requires_grad]
                    torch.autograd.grad(outs, case.grad_inputs, [torch.ones_like(t) for t in outs])
            where = f"{op} {dtype} {device} prefer={prefer} backend={backend}"
            if said == "reference":
                assert rec.ran == [] and launches == [], f"{where}: backend_info says reference, but {rec.ran} ran"
                continue
            assert rec.ran, f"{where}: backend_info says {said}, but only the reference ran"
            assert all(devs == {device} for _, devs in rec.ran), rec.ran
            impl = next(i for i in spec.impls if i.name == said or (said, i.name) == ("triton-interpreter", "triton"))
            ran = {name.split(".")[0] for name, _ in rec.ran}
            # the op's one custom op (or, below the C++ autograd of uniformity_loss, its _with_grad)
            assert any(n.startswith(spec.schema) for n in ran), f"{where}: {said} said, {ran} ran"
            # its kernel: Triton launches exactly when a Triton implementation is said to run
            assert bool(launches) == (impl.kind == "triton"), f"{where}: {said} said, {len(launches)} Triton launches"


def test_fp64_runs_the_reference_where_a_kernel_does_not_take_it():
    # the Triton kernels compute in fp32 at most; the C++ CPU kernels take fp64 (gradcheck)
    for op in ("random_masking", "restore_tokens", "uniformity_loss"):
        assert ops.choose(op, "cpu", (torch.float64,))[0] == "cpp-cpu"
        assert ops.choose(op, "cuda", (torch.float64,))[0] == "reference"
        with ops.use_impl("triton-interpreter"):
            assert ops.choose(op, "cpu", (torch.float64,))[0] == "reference"
    assert ops.choose("mae_loss", "cuda", (torch.float32, torch.float64))[0] in ("reference",)
    assert ops.choose("patchify", "cpu", (torch.float64,))[0] == "cpp-cpu"


def test_model_fused_false_runs_only_references():
    import timm

    import umae.models  # noqa: F401

    m = timm.create_model("umae_vit_micro_patch4_32", fused=False)
    with _UmaeOps() as rec:
        m(torch.randn(2, 3, 32, 32)).loss.backward()
    assert rec.ran == []
    m.fused = True
    with _UmaeOps() as rec:
        m(torch.randn(2, 3, 32, 32)).loss.backward()
    # below the C++ autograd: the loss's kernel with the rows it saves, and its backward
    assert {name for name, _ in rec.ran} >= {"umae::patch_mse_with_rows", "umae::patch_mse_backward"}


def test_registry_entries_are_complete():
    assert umae.__all__[-len(registry.OPS):] == list(registry.OPS)  # the ops, after the switch and patch API
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, op in registry.OPS.items():
        assert callable(getattr(umae, name)) and callable(op.reference) and callable(op.fused)
        assert callable(cases.CASES[name]), name
        assert os.path.isfile(os.path.join(root, OP_TESTS[name])), name
        assert {i.device for i in op.impls} == {"cpu", "cuda"}, name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.schema, "CPU"), op.schema
        if op.kernels:  # Triton: its launchers are the CUDA kernels of the op (and of its backward)
            from umae.verify import jit

            assert jit.kernels_of(op.kernels), name
            assert op.schema.split("::")[1] in op.triton_kernels, name
            for k in op.triton_kernels:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"umae::{k}", "CUDA"), k
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        ops.choose("nope", "cpu")


def test_importing_umae_changes_no_global_state():
    code = """
import os, torch
import torch._functorch.config as fc, torch._inductor.config as ic
env, f0, i0 = dict(os.environ), fc.get_config_copy(), ic.get_config_copy()
import umae, umae.models, umae.cli.main
umae.cli.main.build_parser()
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert fc.get_config_copy() == f0, "torch._functorch.config changed"
assert ic.get_config_copy() == i0, "torch._inductor.config changed"
print("unchanged")
"""
    r = _run(code)
    assert r.returncode == 0 and "unchanged" in r.stdout, r.stderr[-3000:]


def test_the_kernels_folder_does_not_shadow_pypi_kernels():
    # kernels/ is umae.kernels; in a process started in the repo root (python -c, python -m) it is
    # also a top-level `kernels`, PyPI's name, which transformers imports when it is installed. A
    # namespace package (no __init__.py), it yields to a regular package anywhere on sys.path: no
    # sys.modules rewriting
    import importlib.metadata

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import kernels, umae.kernels.uniformity as u; print(getattr(kernels, '__file__', None)); "
            "print(list(kernels.__path__)); print(u.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr
    top_file, top_path, ours = r.stdout.splitlines()
    folder = os.path.realpath(os.path.join(root, "kernels"))
    assert os.path.dirname(os.path.realpath(ours)) == folder
    assert not os.path.exists(os.path.join(folder, "__init__.py"))
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert top_file == "None" and folder in top_path  # nothing else: the folder, as a namespace
    else:
        assert top_file != "None" and os.path.dirname(os.path.realpath(top_file)) != folder  # PyPI's package
    import re

    rewrite = re.compile(r"sys\.modules\[[^\]]*\]\s*=[^=]|sys\.modules\.(update|pop|setdefault)\(")
    for path in (os.path.join(root, p) for p in ("umae", "kernels")):  # and nothing rewrites the module table
        for dirpath, _, files in os.walk(path):
            for f in files:
                if f.endswith(".py"):
                    assert not rewrite.search(open(os.path.join(dirpath, f)).read()), f


# ---- edges: second order, argument types, gradient layouts, forward-mode AD ----

def test_the_cached_decision_follows_the_switch():
    # the fused-or-reference decision is cached per call key: set_backend / use_impl / backend= change it
    x = randn(2, 3, 8, 8)
    with umae.use_backend("fused"):
        assert _common.fused(registry.get("patchify"), (x,), None)
        with umae.use_backend("reference"):
            assert not _common.fused(registry.get("patchify"), (x,), None)
            assert _common.fused(registry.get("patchify"), (x,), "fused")
        assert not _common.fused(registry.get("patchify"), (x,), "reference")
        assert _common.fused(registry.get("patchify"), (x,), None)
        spec, f = registry.get("uniformity_loss"), randn(5, 4, dtype=torch.float64)
        assert _common.fused(spec, (f,), None)
        if triton_interpreted():
            with ops.use_impl("triton-interpreter"):
                assert not _common.fused(spec, (f,), None)  # the Triton kernel takes no fp64
                assert _common.fused(spec, (f.float(),), None)
            assert _common.fused(spec, (f,), None)


def test_a_first_call_under_compile_traces_the_decision():
    # nothing is asked of the dispatcher at import: the first call of a process may come under
    # torch.compile(fullgraph=True), where the decision's queries must be constants, not graph breaks
    code = ("import torch, umae\n"
            "f = torch.compile(lambda x: umae.patchify(x, 4).sum() + umae.uniformity_loss(x.flatten(1)), "
            "fullgraph=True, backend='eager')\n"
            "x = torch.randn(2, 3, 8, 8)\n"
            "print(bool(torch.allclose(f(x), umae.patchify(x, 4).sum() + umae.uniformity_loss(x.flatten(1)))))")
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-3000:]
