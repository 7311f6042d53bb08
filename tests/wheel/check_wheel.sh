#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it WITHOUT extras into a fresh virtual environment, and
# run the commands a plain `pip install vitx-fast` must serve, from a folder outside the source tree (so the checkout
# is not importable and only the installed wheel runs).
#
#   bash tests/wheel/check_wheel.sh        (or `make wheel-test`)
#
# PY: the Python that builds the wheel (default .venv/bin/python; it needs scikit-build-core, pybind11 and CMake, as
# `make venv` installs them: the C++ extension builds with --no-build-isolation against it). The fresh environment
# uses the same base interpreter. torch and torchvision are pinned: these releases install from the machine's local
# wheels through pip's configured find-links / indexes (an unpinned torch would pull gigabytes).
# KEEP=1 keeps the scratch folder (its path is printed).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vitx-wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "wheel-test: scratch folder $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
T0=$(date +%s)
quiet_pip() {  # pip, less its warnings about the machine's index folders that hold no such package
  if ! "$@" >"$WORK/pip.log" 2>&1; then cat "$WORK/pip.log"; return 1; fi
  grep -v "is neither a file nor a directory" "$WORK/pip.log" || true
}
CHECKS=0  # checks passed so far: each step after the first is reached only when the one before it passed
step() { echo "wheel-test: [$(( $(date +%s) - T0 ))s] $*"; CHECKS=$((CHECKS + 1)); }

step "building the wheel from $ROOT"
quiet_pip "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/vitx_fast-*.whl)
step "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"
# what a wheel must hold besides the modules: the demo model, the web page, the compiled module
for member in vitx_fast/models/weights/demo_vit.safetensors vitx_fast/models/weights/demo_vit.json \
              vitx_fast/serve/static/index.html vitx_fast/py.typed; do
  "$PY" -c 'import sys, zipfile; sys.exit(sys.argv[2] not in zipfile.ZipFile(sys.argv[1]).namelist())' \
    "$WHEEL" "$member" || { echo "wheel-test: FAILED: $member is not in the wheel"; exit 1; }
done
"$PY" -c 'import sys, zipfile; sys.exit(not any(n.startswith("vitx_fast/_C") and n.endswith(".so")
                                              for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$WHEEL" \
  || { echo "wheel-test: FAILED: the compiled module vitx_fast/_C*.so is not in the wheel"; exit 1; }

BASE=$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
step "fresh venv ($("$BASE" --version 2>&1))"
"$BASE" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
step "installing ${TORCH_PINS[*]}"
quiet_pip "$VPY" -m pip install -q "${TORCH_PINS[@]}"
step "installing the wheel without extras"
quiet_pip "$VPY" -m pip install -q "$WHEEL" "${TORCH_PINS[@]}"

RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"  # outside the source tree: `import vitx_fast` must find the installed wheel only
export PYTHONNOUSERSITE=1 PYTHONPATH= MPLBACKEND=Agg
VITX="$WORK/venv/bin/vitx"
where=$("$VPY" -c 'import vitx_fast, os; print(os.path.dirname(vitx_fast.__file__))')
case "$where" in "$WORK"/venv/*) ;; *) echo "wheel-test: FAILED: vitx_fast imports from $where"; exit 1 ;; esac

step "vitx --version"
"$VITX" --version
step "vitx demo --out $RUN/gallery"
"$VITX" demo --out "$RUN/gallery" --n 1 --n-double 1 --quiet
test -s "$RUN/gallery/index.html" || { echo "wheel-test: FAILED: no gallery/index.html"; exit 1; }
step "vitx explain IMG --model demo --out $RUN/store"
cp "$ROOT/tests/wheel/digit.jpg" "$RUN/digit.jpg"
"$VITX" explain "$RUN/digit.jpg" --model demo --method reciprocam gae --out "$RUN/store" --quiet
"$VITX" render "$RUN/store" --out "$RUN/drawn"
"$VPY" - "$RUN" <<'EOF'
import sys

import vitx_fast as vx
from vitx_fast.models.demo import load_demo_model

run = sys.argv[1]
df = vx.read_results(f"{run}/store")
assert len(df) == 2 and set(df["method"]) == {"reciprocam", "gae"}, df
model = load_demo_model()
exp = vx.explain(model, f"{run}/digit.jpg", method="gae")  # the public API on a path: preprocess and overlay
(pic,) = vx.overlay(f"{run}/digit.jpg", exp, model=model, colorbar=True)
print(f"store: {len(df)} rows; explain(path): class {int(exp.targets[0])}; overlay {pic.size}")
EOF
step "a missing extra is one line naming it"
set +e
err=$("$VITX" serve --model demo 2>&1 >/dev/null); code=$?
set -e
echo "  vitx serve -> exit $code: $err"
[ "$code" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && [[ "$err" == *"vitx-fast[serve]"* ]] \
  || { echo "wheel-test: FAILED: vitx serve without the serve extra"; exit 1; }
set +e
err=$("$VITX" explain "$RUN/digit.jpg" --executor ray --out "$RUN/store2" 2>&1 >/dev/null); code=$?
set -e
echo "  vitx explain --executor ray -> exit $code: $err"
[ "$code" = 2 ] && [[ "$err" == *"vitx-fast[ray]"* ]] \
  || { echo "wheel-test: FAILED: vitx explain --executor ray without the ray extra"; exit 1; }
set +e
err=$("$VITX" export --model demo --out "$RUN/m.onnx" 2>&1 >/dev/null); code=$?
set -e
echo "  vitx export -> exit $code: $err"
[ "$code" = 2 ] && [[ "$err" == *"vitx-fast[onnx]"* ]] \
  || { echo "wheel-test: FAILED: vitx export without the onnx extra"; exit 1; }
echo "wheel-test: [$(( $(date +%s) - T0 ))s] done"
echo "wheel-test: $((CHECKS - 1)) passed, 0 failed"
