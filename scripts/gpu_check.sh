#!/usr/bin/env bash
# First-lease GPU check (issue 22, first cut): the machine's own python3 and packages, nothing
# installed. Each stage runs under its own `timeout` and writes under $OUT as it goes, so a stop
# at any point still returns what was done. Stages and time boxes (total <= 520 s):
#   env    (10 s)  nvidia-smi, versions, pip list          -> env.txt, pip_list.txt
#   build  (200 s) setup.py build_ext --inplace (no pip)   -> build.log
#   tests  (200 s) pytest -k cuda (every CUDA-parametrized test) -> tests.log, junit.xml
#   bench  (150 s) every op at ViT-B/16 bf16, all providers -> bench.log, bench/results.{json,csv}
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

echo "== env"
{ date -u; uname -a; nvidia-smi || true
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv || true
  command -v nvcc && nvcc --version | tail -2
  timeout 60 $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no gpu')"
  git log -1 --format='commit %H %s' 2>/dev/null || true; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 30 $PY -m pip list > "$OUT/pip_list.txt" 2>&1

echo "== build"
# build_ext --inplace needs no pip and no particular setuptools; umae.kernels is kernels/ in the repo
[ -e umae/kernels ] || ln -s ../kernels umae/kernels
timeout 200 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; rc=$?
tail -5 "$OUT/build.log"; echo "build rc=$rc"
timeout 60 $PY -m umae.cli.main info >> "$OUT/env.txt" 2>&1

echo "== tests (CUDA)"
timeout 200 $PY -m pytest tests -q -p no:cacheprovider -k cuda -rfE --timeout 90 \
  --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -30 "$OUT/tests.log"

echo "== bench (ViT-B/16 bf16)"
timeout 150 $PY -m umae.cli.main bench --shapes vit_b16 --dtypes bfloat16 --no-progress \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -60 "$OUT/bench.log"
