#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), run the tests, then the same suite on the GPU
# machine's versions (scripts/compat.sh; UMAE_SKIP_COMPAT=1 skips it). On a machine without a
# GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it) and are also
# compiled for sm_90 in a separate process (tests/test_triton_compile.py). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The sm_90 compile check of the Triton kernels (tests/test_triton_compile.py, minutes on 2 cores)
# runs once, in compat.sh, on the triton the GPU machine runs; with UMAE_SKIP_COMPAT=1, here.
once=()
[ "${UMAE_SKIP_COMPAT:-0}" = 1 ] || once=(--ignore=tests/test_triton_compile.py)
# a compiled-kernel cache of this stack's own (see scripts/compat.sh: another torch's kernels crash)
TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.venv/torchinductor} \
  .venv/bin/python -m pytest tests -q -p no:cacheprovider "${once[@]}" "$@"
if [ "${UMAE_SKIP_COMPAT:-0}" != 1 ]; then
  bash scripts/compat.sh -q -p no:cacheprovider "$@"
fi
