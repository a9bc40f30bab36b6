#!/usr/bin/env bash
# The GPU machine's stack, here: a second venv (.venv-compat) with the versions the lent GPU image
# runs -- torch 2.11.0, torchvision 0.26.0, triton 3.6.0, setuptools 81.0.0 (torch 2.11 wants < 82)
# with wheel 0.48.0, pip 24.0, timm 1.0.29, transformers 5.17.0 -- and the tests that depend on the
# stack run on it: the build (C++ and CUDA sources), the kernels' parity (C++, Triton interpreter),
# opcheck and compile, umae.patch on transformers and timm models (the quick tier of those files),
# the video references against the GPU machine's transformers,
# and the sm_90 compile of the Triton kernels with the GPU machine's triton (run only here when this
# runs). The tree is copied to .compat/ first (tracked and untracked-not-ignored files), so its
# build never touches the main checkout's in-place extension, and built the way the GPU machine
# builds it (scripts/gpu_check.sh): setup.py build_ext --inplace, no pip.
#
# It also stands in for a baseline x86-64 machine: the extension is built for x86-64-v3 (AVX2, no
# AVX-512), PyTorch's own kernels are dispatched at AVX2 and oneDNN and MKL are capped at AVX2 (they
# pick their kernels themselves), while the main suite runs native: the suite passes on both.
#
#   bash scripts/compat.sh [pytest args]   set up (once) and run the tests
#   bash scripts/compat.sh --setup-only    the venv, the copy and its build (scripts/test.sh starts
#                                          this beside the main suite)
#   bash scripts/compat.sh --tests-only    the tests of a set-up copy
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=all
case "${1:-}" in --setup-only) PHASE=setup; shift ;; --tests-only) PHASE=tests; shift ;; esac
V=$PWD/.venv-compat
T=$PWD/.compat/tree
export MAX_JOBS=${MAX_JOBS:-2} UMAE_CPU_ARCH=${UMAE_CPU_ARCH:-x86-64-v3} ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2} MKL_ENABLE_INSTRUCTIONS=${MKL_ENABLE_INSTRUCTIONS:-AVX2}
# Inductor's compiled-kernel cache is keyed by the generated source, not by torch's version: in the
# shared /tmp/torchinductor_$USER, torch 2.11 loaded a kernel .so built by the main suite's torch
# and segfaulted. Each stack keeps its own; Triton's too (a fresh clone compiles from scratch).
export TORCHINDUCTOR_CACHE_DIR=$PWD/.compat/torchinductor TRITON_CACHE_DIR=$PWD/.compat/triton
# pip installs without byte-compiling (--no-compile: 12k files, most never imported); the processes
# write the .pyc of what they import, once, into the venv (these machines set PYTHONDONTWRITEBYTECODE,
# under which every process of the suite compiled torch's modules from source again)
export PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$V/pycache

if [ $PHASE != tests ]; then
  PY=${PYTHON:-python3.11}
  command -v "$PY" >/dev/null || PY=python3
  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"
  if ! "$V/bin/python" - 2>/dev/null <<'EOF'
import importlib.metadata as m
want = {"torch": "2.11.0", "torchvision": "0.26.0", "triton": "3.6.0", "setuptools": "81.0.0", "wheel": "0.48.0",
        "timm": "1.0.29", "transformers": "5.17.0"}
assert all(m.version(k).split("+")[0] == v for k, v in want.items())
import numpy, sklearn, matplotlib, tqdm, pytest, pytest_benchmark, pytest_timeout, xdist, ninja  # noqa
EOF
  then
    "$V/bin/pip" install -q pip==24.0
    "$V/bin/pip" install -q --no-compile torch==2.11.0 torchvision==0.26.0 triton==3.6.0 setuptools==81.0.0 wheel==0.48.0 \
      timm==1.0.29 transformers==5.17.0 numpy scikit-learn matplotlib tqdm ninja pytest pytest-benchmark \
      pytest-timeout pytest-xdist
  fi
  rm -rf "$T" && mkdir -p "$T"
  git ls-files -co --exclude-standard -z | xargs -0 cp -P --parents -t "$T"
  (cd "$T" && "$V/bin/python" setup.py build_ext --inplace > ../build.log 2>&1) || { tail -30 .compat/build.log; exit 1; }
fi
[ $PHASE = setup ] && exit 0

cd "$T"
"$V/bin/python" -c "import torch, triton; print('compat stack: torch', torch.__version__, 'triton', triton.__version__,
      '| extension -march=$UMAE_CPU_ARCH, torch CPU dispatch', torch.backends.cpu.get_cpu_capability(),
      '| oneDNN/MKL capped at AVX2')"
# the quick tier of what depends on the stack, plus the sm_90 compile (gpucheck); -n: pytest-xdist
exec "$V/bin/python" -m pytest -m "not slow and not dist" -n "${UMAE_TEST_WORKERS:-2}" --dist worksteal \
  tests/test_patchify.py tests/test_masked_mse.py tests/test_random_masking.py tests/test_restore_tokens.py \
  tests/test_uniformity.py tests/test_check.py tests/test_backend.py tests/test_patching.py tests/test_model.py \
  tests/test_timm_api.py tests/test_finetune.py tests/test_videomae.py tests/test_video_models.py \
  tests/test_triton_compile.py "$@"
