"""Builds umae and its C++/CUDA extension `umae._C`.

The CPU sources always build. The CUDA sources build when torch has CUDA and nvcc
is found (no GPU needed: on a CPU machine this is the sm_90 compile check).
UMAE_NO_CUDA=1 forces a CPU-only build.
"""
import glob
import os
import re
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """CUDA_HOME, resolving an `nvcc` on the PATH that is a wrapper script exec'ing the real one."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        m = re.search(rb"exec\s+(\S+/bin/nvcc)", head) if head.startswith(b"#!") else None
    except OSError:
        m = None
    real = m.group(1).decode() if m else os.path.realpath(nvcc)
    return os.path.dirname(os.path.dirname(real))


def _cpu_arch():
    """The CPU kernels are built for the machine that builds them (as torch.compile's are):
    `-march=native`, unless UMAE_CPU_ARCH names another target (e.g. x86-64-v2 for a build that
    must run on older CPUs than the build machine's)."""
    return f"-march={os.environ.get('UMAE_CPU_ARCH', 'native')}"


def _cuda_archs(torch) -> str:
    """The visible GPUs' architectures, the newest with its PTX; with none visible (a CPU build
    machine: the sm_90 compile check), Hopper. TORCH_CUDA_ARCH_LIST, when set, wins (e.g. "8.0;9.0;10.0+PTX")."""
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    else:
        caps = [(9, 0)]
    # the newest arch's PTX too: the static audit reads it (tests/test_backend.py), and newer GPUs JIT it
    return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"


def _extension():
    try:
        import torch
    except ImportError:
        raise SystemExit("umae's extension compiles against the torch it will run with: install torch first, then "
                         "build with `pip install [-e] . --no-build-isolation` (an isolated build has no torch, or "
                         "another one), or `python setup.py build_ext --inplace`") from None

    cuda_home = _real_cuda_home()
    with_cuda = (torch.version.cuda is not None and cuda_home is not None
                 and os.environ.get("UMAE_NO_CUDA", "0") != "1")
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_archs(torch))
    # what umae.ops._common reads to pick a CUDA kernel only for a GPU the extension holds code for
    with open(os.path.join(HERE, "umae", "ops", "_build.py"), "w") as f:
        f.write('"""Written by setup.py at build time."""\n'
                f"CUDA_ARCHS = {os.environ['TORCH_CUDA_ARCH_LIST'].replace(';', ' ').split() if with_cuda else []!r}\n")
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # read at import time from the old env
    sources = ["csrc/umae_ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc")]
    # torch picks the C++ standard its headers need. -fopenmp: at::parallel_for is inline OpenMP in
    # torch's headers (without it every kernel runs on one thread); libgomp.so.1 resolves to the copy
    # torch already loaded. The ISA: see _cpu_arch.
    cxx = ["-O3", "-fopenmp", _cpu_arch()]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        try:  # the toolkit may lack headers torch's CUDA headers want; the pip CUDA package has them
            import nvidia

            inc = os.path.join(nvidia.__path__[0], "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
        except ImportError:
            pass
        return cpp_extension.CUDAExtension(
            "umae._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=["-fopenmp"],
        ), cpp_extension
    return cpp_extension.CppExtension("umae._C", sources, include_dirs=include_dirs,
                                      extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]), cpp_extension


ext, cpp_extension = _extension()

setup(
    name="umae",
    version="0.1.0",
    description="Fused kernels for Masked Autoencoder and U-MAE training",
    license="BSD-3-Clause",
    packages=["umae", "umae.ops", "umae.models", "umae.data", "umae.train", "umae.research", "umae.bench", "umae.cli",
              "umae.kernels"],
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "timm>=1.0", "numpy"],
    extras_require={"hf": ["transformers"]},  # umae.patch on transformers ViTMAE
    entry_points={"console_scripts": ["umae=umae.cli.main:main"]},
)
