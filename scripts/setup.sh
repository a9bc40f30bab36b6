#!/usr/bin/env bash
# Creates .venv at the repo root (once), installs the pinned stack and builds umae with its
# C++/CUDA extension in place. Safe to re-run: it only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, timm, transformers, sklearn, pytest, pytest_benchmark, pytest_timeout, xdist, matplotlib, tqdm" 2>/dev/null; then
  # torch 2.14.1 is the newest these machines allow, and timm needs a torchvision that imports beside it.
  # (pip's byte-compiling stays on: these machines set PYTHONDONTWRITEBYTECODE=1, so the .pyc files pip
  # writes are all there are; with --no-compile every process compiled torch's modules again, and the
  # suite, which starts hundreds of them, took twice as long)
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  # transformers: umae.patch's ViTMAE support and its tests (CPU import; no weights are downloaded)
  # scikit-learn: its bundled handwritten digits (--data digits, offline)
  .venv/bin/pip install -q timm transformers scikit-learn numpy ninja pytest pytest-benchmark pytest-timeout pytest-xdist matplotlib tqdm
fi
# nvcc on the PATH may be a wrapper script; setup.py resolves the real toolkit for CUDA_HOME.
# TORCH_CUDA_ARCH_LIST unset: setup.py builds for the visible GPUs, sm_90 where there is none.
export MAX_JOBS=${MAX_JOBS:-2}
# --no-build-isolation: an isolated build would fetch its own (unpinned) torch.
.venv/bin/pip install -q -e . --no-build-isolation
