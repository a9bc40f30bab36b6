#!/usr/bin/env bash
# One command for a lent GPU machine: `bash scripts/gpu_check.sh` in the repo root.
# It uses that machine's python3 and packages (nothing installed: no registry there), builds in
# place without pip, and writes under $OUT (default out/gpu) as each stage ends, so a stop at
# any point still returns what was done. Every stage runs under its own `timeout`; the boxes
# add up to 535 s, inside the 540 s limit of a call (start-up apart; the stages seldom fill their
# boxes, and a stage that outruns its box loses only its own rows).
#
#   stage     box    what                                                       -> $OUT/
#   env        15 s  nvidia-smi, clocks, versions, pip list, the tree's hash    env.txt
#   build      90 s  python3 setup.py build_ext --inplace, this GPU's arch+PTX  build.log (+ `umae info` in env.txt)
#   tests     100 s  pytest -k cuda: every op x dtype, fwd+bwd vs reference,    tests.log
#                    opcheck, compile(fullgraph), fused vs reference model, umae.patch on ViTMAE,
#                    the interpreter-vs-GPU rounding claims (bitwise where docs/design.md says so)
#   sanitize   40 s  compute-sanitizer memcheck + racecheck, scripts/gpu_small.py   (tests.log)
#   profile    35 s  U-MAE ViT-B/16 training steps, batch 64 and 256, fused and       profile.json (+ bench.log)
#                    reference model, under torch.profiler: host and wall ms per step, device-busy
#                    fraction, kernel launches, top kernels (umae bench profile)
#   ops        75 s  every image op, bf16, ViT-B/16 N=256, fwd+bwd,               bench.log, results.json
#                    fused vs eager vs compile vs fused+compile, device time (CUDA graph replay),
#                    host- or device-bound, GB/s, % of copy BW, peak MB
#   unif       25 s  uniformity fwd+bwd, B = 16,384 / 65,536 / 131,072 x 768,     (appended)
#                    fused vs eager: eager's B x B runs out of memory where the fused D x D does not
#   train      50 s  training step, bf16 autocast, ViT-B/16 batch 64: umae U-MAE (lamb 0.01),   (appended)
#                    umae MAE, transformers ViTMAEForPreTraining patched vs not; img/s, MFU, peak MB
#   compile    55 s  the U-MAE ViT-B/16 step at batch 256 under torch.compile's CUDA-graph   (appended)
#                    mode (reduce-overhead), reference model vs fused: the step goal
#   host       20 s  host time per call, each op at tiny sizes, fwd and fwd+bwd, fused vs      host.json (+ bench.log)
#                    reference vs one aten op, the GPU held behind a sleep kernel; a training step of
#                    the smallest model (umae bench host)
#   tune       30 s  the uniformity kernels' candidate tile configurations, B = 256 and        tune.json (+ bench.log)
#                    16,384 x 768 bf16, fwd+bwd device time, the winners (umae bench tune)
#   video      30 s  the video ops at VideoMAE-B's shapes (8 clips, 16 x 224 x 224, tubelet 2, (appended)
#                    patch 16, 90% tube masks), bf16, fwd+bwd, fused vs eager vs compile
#   video_step 30 s  transformers' VideoMAEForPreTraining (VideoMAE-B, batch 8), patched vs   (appended)
#                    not, bf16 autocast: clips/s, MFU, peak MB
# The video stages come last, past the 535 s of the others: where the stages before them fill their
# boxes, the call's limit cuts them, and only their rows are lost.
#
# STAGES="tests unif" (say) runs only those stages, TEST_ARGS="tests/test_random_masking.py -k cuda" other tests.
# Without a GPU (or with --dry-run) the same stages run at tiny sizes on CPU, about a minute on 2
# cores (CI runs it: tests/test_gpu_check.py): the extension is rebuilt only if csrc/ changed, the
# tests are a CPU subset, compute-sanitizer is reported skipped, the ops run one mode, fused and
# eager, and the compile stage compiles one op (compile and fused+compile) instead of a model
# (Inductor's CPU compile of a model takes minutes here). A dry run has no time boxes: the boxes
# are sized for the GPU machine, and a busy CPU would hit them; the test checks each stage's
# output instead.
# After a run, here: copy $OUT into bench/results/<gpu>/<date>/ and run `umae report`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
# the machine's python3 (the GPU image's holds torch); here, without one that does, the project's .venv
PY=${PY:-python3}
$PY -c "import torch" 2>/dev/null || PY=.venv/bin/python
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
$PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || DRY=1
if [ $DRY = 1 ]; then
  # tiny sizes; the CUDA build is left to setup.py's default (a CPU machine still compiles it)
  OPS_SHAPES="tiny"; VIDEO_SHAPES="tiny"; VIDEO_PROVIDERS="fused eager"; UNIF_SHAPES="unif_tiny"; E2E_SHAPES="tiny"; MODE="dry run (CPU, tiny sizes)"
  # one mode, and the compiled providers in the compile stage for one op: Inductor's CPU compiles
  # are the slow part here (a model's takes minutes on 2 cores)
  OPS_MODES="fwd+bwd"; OPS_PROVIDERS="fused eager"
  COMPILE_ARGS=(--ops uniformity_loss --shapes unif_tiny --providers compile fused+compile)
  TEST_SEL=(tests/test_patchify.py tests/test_masked_mse.py -k cpu)
else
  OPS_SHAPES="vit_b16"; VIDEO_SHAPES="videomae_b"; VIDEO_PROVIDERS="fused eager compile"; UNIF_SHAPES="unif_b16384 unif_b65536 unif_b131072"; E2E_SHAPES="vit_b16"; MODE="GPU"
  # fwd+bwd only: each row now also replays from a CUDA graph for its device time (fwd / bwd: --modes)
  OPS_MODES="fwd+bwd"; OPS_PROVIDERS="fused eager compile fused+compile"
  COMPILE_ARGS=(--ops train_step --shapes vit_b16_b256 --providers compile-cg fused+compile-cg)
  TEST_SEL=(tests -k cuda)
fi
# STAGES="build tests ..." runs those alone (env always runs): a second call within a lease
STAGES=${STAGES:-build tests sanitize profile ops unif train compile host tune video video_step}
want() { [[ " $STAGES " == *" $1 "* ]]; }
[ -n "${TEST_ARGS:-}" ] && read -r -a TEST_SEL <<< "$TEST_ARGS"
status=0
stage() { echo "== $1 ($(date -u +%T))"; }
box() {  # box <seconds> <command...>: the command under `timeout` on the GPU machine, unboxed in a dry run
  local s=$1; shift
  if [ $DRY = 1 ]; then "$@"; else timeout "$s" "$@"; fi
}
fail() { echo "!! $1"; status=1; }

stage "env: $MODE"
{ date -u; uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: none"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv 2>&1 || true
  command -v nvcc >/dev/null && nvcc --version | tail -2
  box 30 $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no gpu')"
  echo "commit: ${UMAE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)} (a copied tree's .git may be another commit's: the tree hash below is this tree's)"
  # the working tree's git tree hash, to match with `git log --format='%h %T'` where it was committed
  idx=$(mktemp -u); GIT_INDEX_FILE=$idx git add -A 2>/dev/null && echo "tree: $(GIT_INDEX_FILE=$idx git write-tree)"; rm -f "$idx"
  echo "--- pip list"; box 10 $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|timm|transformers|numpy|setuptools|pytest|nvidia-cuda-runtime)[ -]"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if want build; then
stage build
# build_ext --inplace needs no pip and no particular setuptools (umae finds kernels/ in the checkout)
so=$(ls umae/_C*.so 2>/dev/null | head -1)
if [ $DRY = 1 ] && [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -print -quit)" ]; then
  echo "dry run: $so is newer than csrc/ and setup.py, not rebuilt" | tee "$OUT/build.log"
elif box 90 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -2 "$OUT/build.log"
else
  fail "build failed or timed out"; tail -30 "$OUT/build.log"
fi
fi
box 30 $PY -m umae.cli.main info >> "$OUT/env.txt" 2>&1 || fail "umae info"

if want tests; then
stage tests
# every tier of the selected tests (-m ""); a per-test box only on the GPU machine
per_test=(--timeout 60); [ $DRY = 1 ] && per_test=()
box 100 $PY -m pytest -m "" "${TEST_SEL[@]}" -q -p no:cacheprovider -rfE "${per_test[@]}" \
  > "$OUT/tests.log" 2>&1 || fail "tests (rc $?)"
tail -15 "$OUT/tests.log"
fi

if want sanitize; then
stage sanitize
# its log goes into tests.log (8 files at most come back)
SAN=/tmp/umae_sanitizer.log
: > "$SAN"
if [ $DRY = 1 ]; then
  box 40 $PY scripts/gpu_small.py > "$SAN" 2>&1 || fail "gpu_small.py"
  echo "compute-sanitizer skipped: no CUDA device (scripts/gpu_small.py ran on CPU)" | tee -a "$SAN"
elif ! command -v compute-sanitizer >/dev/null; then
  echo "compute-sanitizer skipped: not on the PATH" | tee "$SAN"
else
  for tool in memcheck racecheck; do
    echo "--- $tool" >> "$SAN"
    timeout 20 compute-sanitizer --tool $tool --error-exitcode 3 $PY scripts/gpu_small.py >> "$SAN" 2>&1
    rc=$?
    if grep -q "Device not supported\|error 999" "$SAN"; then
      echo "$tool skipped: this runtime refuses the device (KINDS.md: gVisor)"; break
    fi
    [ $rc = 0 ] && echo "$tool: clean" || fail "$tool rc $rc"
  done
fi
{ echo "=== sanitize"; cat "$SAN"; } >> "$OUT/tests.log"
fi

if want profile; then
stage profile
echo "=== profile: umae bench profile --providers fused eager" >> "$OUT/bench.log"
box 35 $PY -m umae.cli.main bench profile --providers fused eager --out "$OUT" > /tmp/umae_profile.log 2>&1 \
  || fail "profile (rc $?)"
grep -v "^wrote " /tmp/umae_profile.log | tee -a "$OUT/bench.log" | head -12
fi

bench() {  # bench <stage> <box s> <args...>: time-boxed, its rows appended to $OUT/results.json
  local name=$1 box=$2; shift 2
  want "$name" || return 0
  stage "$name"
  echo "=== $name: umae bench $*" >> "$OUT/bench.log"
  box "$box" $PY -m umae.cli.main bench --no-progress --append --out "$OUT" "$@" > /tmp/umae_bench_$name.log 2>&1 \
    || fail "bench $name (rc $?)"
  # the charts and the csv: 8 files at most come back, and results.json holds their numbers
  rm -f "$OUT"/*.png "$OUT"/results.csv
  grep -vE "^  [a-z_]+ +(cpu|cuda) |^backend =|^wrote " /tmp/umae_bench_$name.log | tee -a "$OUT/bench.log" | tail -40
}
bench ops 75 --ops patchify unpatchify masked_mse_loss mae_loss random_masking restore_tokens uniformity_loss \
  --shapes $OPS_SHAPES --dtypes bfloat16 --modes $OPS_MODES --providers $OPS_PROVIDERS
# eager and compile at 65,536 rows took the whole of a 35 s box on an H200 (bench/results/h200/2026-11-27-2)
bench unif 25 --ops uniformity_loss --shapes $UNIF_SHAPES --dtypes bfloat16 --modes fwd+bwd \
  --providers fused eager
bench train 50 --ops train_step mae_train_step hf_train_step --shapes $E2E_SHAPES --providers fused eager
bench compile 55 "${COMPILE_ARGS[@]}"
if want host; then
stage host
echo "=== host: umae bench host" >> "$OUT/bench.log"
box 20 $PY -m umae.cli.main bench host --out "$OUT" > /tmp/umae_bench_host.log 2>&1 || fail "bench host (rc $?)"
grep -v "^wrote " /tmp/umae_bench_host.log | tee -a "$OUT/bench.log" | tail -12
fi
if want tune; then
stage tune
echo "=== tune: umae bench tune" >> "$OUT/bench.log"
box 30 $PY -m umae.cli.main bench tune --out "$OUT" > /tmp/umae_tune.log 2>&1 || fail "tune (rc $?)"
grep -v "^wrote " /tmp/umae_tune.log | tee -a "$OUT/bench.log" | tail -14
fi
bench video 30 --ops tubelet_patchify tubelet_unpatchify videomae_loss --shapes $VIDEO_SHAPES --dtypes bfloat16 \
  --modes $OPS_MODES --providers $VIDEO_PROVIDERS
bench video_step 30 --ops hf_video_train_step video_train_step --shapes $VIDEO_SHAPES --providers fused eager
stage "done (status $status)"
exit $status
