#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then run every test. On a machine without a
# GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it) and are also
# compiled for sm_90 in a separate process (tests/test_triton_compile.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
