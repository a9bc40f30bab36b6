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
if ! .venv/bin/python -c "import torch, torchvision, timm, transformers, sklearn, av, pytest, pytest_benchmark, pytest_timeout, xdist, matplotlib, tqdm" 2>/dev/null; then
  # torch 2.14.1 is the newest these machines allow, and timm needs a torchvision that imports beside it.
  # --no-compile: pip would byte-compile all 14k files (30 s of the set-up), most of them never
  # imported; what umae imports is compiled once below, what the tests import as they import it
  # (scripts/test.sh lets the processes write their .pyc).
  .venv/bin/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
  # transformers: umae.patch's ViTMAE support and its tests (CPU import; no weights are downloaded)
  # scikit-learn: its bundled handwritten digits (--data digits, offline)
  # av (PyAV): video files (a list of videos as --data); its wheel holds FFmpeg, and it writes the tests' clips
  .venv/bin/pip install -q --no-compile timm transformers scikit-learn av numpy ninja pytest pytest-benchmark pytest-timeout \
    pytest-xdist matplotlib tqdm
fi
# nvcc on the PATH may be a wrapper script; setup.py resolves the real toolkit for CUDA_HOME.
# TORCH_CUDA_ARCH_LIST unset: setup.py builds for the visible GPUs, sm_90 where there is none.
export MAX_JOBS=${MAX_JOBS:-2}
# --no-build-isolation: an isolated build would fetch its own (unpinned) torch.
.venv/bin/pip install -q -e . --no-build-isolation
# The .pyc of what umae and its commands import, written once (these machines set
# PYTHONDONTWRITEBYTECODE=1, under which a process without them compiles torch's modules from source:
# `import umae` took 9 s instead of 4).
PYTHONDONTWRITEBYTECODE= .venv/bin/python -c "import importlib, umae, umae.cli.main as m, transformers
for mod in m.COMMANDS.values(): importlib.import_module(mod)"
