#!/usr/bin/env bash
# The test command (what .ci/run calls): set up (scripts/setup.sh), run every tier of the suite
# (quick, slow, dist, gpucheck: pyproject.toml) on this stack, then the tests that depend on the
# stack on the GPU machine's versions (scripts/compat.sh, set up in the background meanwhile;
# UMAE_SKIP_COMPAT=1 skips it). On a machine without a GPU the Triton kernels run under
# TRITON_INTERPRET=1 (tests/conftest.py sets it); the sm_90 compile of the Triton kernels runs
# once, on the GPU machine's triton, in compat.sh (in the main suite with UMAE_SKIP_COMPAT=1; the
# quick tier has none).
#
#   bash scripts/test.sh            everything (CI)
#   bash scripts/test.sh --quick    the quick tier on this stack: a contributor's loop
# Further arguments go to pytest. UMAE_TEST_WORKERS: pytest-xdist workers (default 2, the cores here).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
COMPAT=1
if [ $QUICK = 1 ] || [ "${UMAE_SKIP_COMPAT:-0}" = 1 ]; then COMPAT=0; fi
t0=$SECONDS
# the suite's processes write the .pyc of what they import, once (these machines set
# PYTHONDONTWRITEBYTECODE=1; the venvs install without byte-compiling: scripts/setup.sh)
export PYTHONDONTWRITEBYTECODE=
# waiting OpenMP threads sleep: 2 pytest workers (and what they start) share 2 cores, and a spinning
# wait holds a core another process needs (tests/conftest.py says it too)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
if [ $COMPAT = 1 ]; then
  mkdir -p .compat
  # pip's downloads and the second build overlap the main set-up and suite (the suite's Triton
  # interpreter runs keep a core's worth of Python busy, not both cores)
  bash scripts/compat.sh --setup-only > .compat/setup.log 2>&1 &
  compat_setup=$!
fi
# Without a GPU the CUDA sources compile in the compat build, against the GPU machine's torch (the
# compile check that protects a lease); the main stack then builds its CPU sources only (the CUDA
# tests of this build skip), in both tiers, so that they share one build. setup.sh alone, the main
# job's set-up, builds the CUDA sources too.
if [ "${UMAE_SKIP_COMPAT:-0}" != 1 ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export UMAE_NO_CUDA=1
fi
bash scripts/setup.sh
echo "set-up: $((SECONDS - t0)) s"
sel=(-m "")  # every tier
if [ $QUICK = 1 ]; then
  sel=()  # pyproject's default: the quick tier
elif [ $COMPAT = 1 ]; then  # on the GPU machine's triton, in the compat suite
  sel+=(--deselect tests/test_triton_compile.py::test_kernels_compile_for_sm90)
fi
# a failing main suite still lets the compat set-up finish and its suite run (both results, one status)
rc=0
# a compiled-kernel cache of this stack's own (see scripts/compat.sh: another torch's kernels crash)
TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.venv/torchinductor} \
  .venv/bin/python -m pytest tests -q -p no:cacheprovider "${sel[@]}" -n "${UMAE_TEST_WORKERS:-2}" \
  --dist worksteal --durations=15 "$@" || rc=$?
echo "main suite done (status $rc): $((SECONDS - t0)) s"
if [ $COMPAT = 1 ]; then
  if wait $compat_setup; then
    bash scripts/compat.sh --tests-only -q -p no:cacheprovider --durations=15 "$@" || rc=$((rc ? rc : $?))
    echo "compat suite done: $((SECONDS - t0)) s"
  else
    echo "compat set-up failed:"; tail -40 .compat/setup.log; rc=1
  fi
fi
exit $rc
