#!/usr/bin/env bash
# The ways to build umae, each from a fresh copy of the tree into .venv-compat (torch 2.11; run
# scripts/compat.sh once first), CPU sources only (UMAE_NO_CUDA=1: the packaging is what is
# tested), each checked by importing umae, umae.kernels and umae._C from outside the tree and
# running one op. About 5 minutes on 2 cores; not in CI (CI builds with setuptools 84 editable
# in .venv, and with build_ext --inplace in scripts/compat.sh). Restores setuptools 81 + wheel.
set -u
cd "$(dirname "$0")/.."
V=$PWD/.venv-compat
T=$(mktemp -d)
for combo in "65.5.0 wheel -e" "80.9.0 wheel -e" "81.0.0 wheel ." "84.2.1 nowheel -e" "84.2.1 nowheel ."; do
  set -- $combo; st=$1; wh=$2; mode=$3
  rm -rf "$T/tree" && mkdir -p "$T/tree" && git ls-files -co --exclude-standard -z | xargs -0 cp -P --parents -t "$T/tree"
  "$V/bin/pip" install -q "setuptools==$st" 2>/dev/null
  if [ $wh = wheel ]; then "$V/bin/pip" install -q wheel==0.48.0 2>/dev/null; else "$V/bin/pip" uninstall -y -q wheel 2>/dev/null; fi
  if [ $mode = -e ]; then args=(-e "$T/tree"); else args=("$T/tree"); fi
  UMAE_NO_CUDA=1 MAX_JOBS=2 "$V/bin/pip" install -q --no-deps --no-build-isolation "${args[@]}" > "$T/log" 2>&1; rc=$?
  res=$(cd "$T" && "$V/bin/python" -c "import umae, umae.kernels, umae._C, torch; x = torch.randn(2, 3, 32, 32); print('imports and runs' if torch.equal(umae.unpatchify(umae.patchify(x, 8), 8, 32), x) else 'WRONG')" 2>&1 | tail -1)
  echo "setuptools $st, $wh, pip install $mode --no-build-isolation: rc=$rc: $res"
  [ $rc = 0 ] || tail -5 "$T/log"
  "$V/bin/pip" uninstall -y -q umae 2>/dev/null
done
echo "isolated build (pip install . without --no-build-isolation): $("$V/bin/pip" install "$T/tree" 2>&1 | grep -o "umae's extension compiles against the torch it will run with" | head -1)"
"$V/bin/pip" install -q setuptools==81.0.0 wheel==0.48.0 2>/dev/null
rm -rf "$T"
