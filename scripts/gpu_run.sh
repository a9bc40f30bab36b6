#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): build the extension with that machine's torch
# and nvcc (sm_90), run the whole test suite on CUDA, compute-sanitizer on small runs, and the
# full benchmark (every op, the batch sweep, the training step, a profiler trace). Everything
# lands under $OUT (default out/gpu). Then, here: copy $OUT/bench into
# bench/results/<device>/<date>/ and run `umae report` to regenerate README's table.
# Without a GPU it runs the same steps with the CUDA parts skipped, so it can be checked anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
# TORCH_CUDA_ARCH_LIST: unset, setup.py builds for the visible GPUs (an A100 or a Blackwell card, not only sm_90)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
status=0
step() { echo "== $1"; }

step "environment"
$PY - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY
HAS_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")

step "build (in place, this machine's torch; no downloads)"
$PY -m pip install -e . --no-build-isolation --no-deps -q > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
$PY -m umae.cli.main info | tee -a "$OUT/env.txt"

if [ "$HAS_GPU" = 1 ]; then
  step "tests on CUDA (fp32/bf16/fp16, every op fwd+bwd, model parity, compile, CUDA graphs)"
  $PY -m pytest tests -q -p no:cacheprovider -x --timeout 900 2>&1 | tee "$OUT/tests.log" | tail -25 || status=1
  step "compute-sanitizer (memcheck, racecheck) on small runs of every kernel"
  cat > /tmp/umae_small.py <<'PY'
import torch, umae
d = "cuda"
for dt in (torch.float32, torch.bfloat16):
    imgs = torch.randn(3, 3, 40, 24, device=d, dtype=dt)
    x = umae.patchify(imgs, 8).requires_grad_()
    umae.unpatchify(x, 8, (40, 24)).sum().backward()
    pred = torch.randn(3, 15, 192, device=d, dtype=dt, requires_grad=True)
    umae.mae_loss(pred, imgs.float(), (torch.rand(3, 15, device=d) < .75).float(), 8).backward()
    t = torch.randn(3, 49, 72, device=d, dtype=dt, requires_grad=True)
    xm, m, ids = umae.random_masking(t, 0.75, pos_embed=torch.randn(1, 49, 72, device=d, dtype=dt),
                                     cls_token=torch.randn(1, 1, 72, device=d, dtype=dt))
    umae.restore_tokens(xm, ids, torch.randn(1, 1, 72, device=d, dtype=dt, requires_grad=True)).sum().backward()
    f = torch.randn(70, 100, device=d, dtype=dt, requires_grad=True)
    umae.uniformity_loss(f, exclude_diagonal=True).backward()
torch.cuda.synchronize()
print("ok")
PY
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 $PY /tmp/umae_small.py > "$OUT/sanitizer_$tool.log" 2>&1 \
      && echo "$tool: clean" || { echo "$tool: FAILED"; tail -20 "$OUT/sanitizer_$tool.log"; status=1; }
  done
  step "benchmark (all ops, modes, providers; sweep; training step; trace)"
  $PY -m umae.cli.main bench --sweep --profile --no-progress --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -80 || status=1
else
  step "no CUDA device: CUDA tests, compute-sanitizer and the GPU benchmark are skipped"
  $PY -m pytest tests -q -p no:cacheprovider -k cuda -rs 2>&1 | tail -5 | tee "$OUT/tests.log"
  $PY -m umae.cli.main bench --ops mae_loss --modes fwd+bwd --no-progress --out "$OUT/bench" 2>&1 | tail -8
fi
exit $status
