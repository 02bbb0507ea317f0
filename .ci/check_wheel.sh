#!/usr/bin/env bash
# The installed package works outside the checkout: build a wheel, install it (no -e) into a second
# fresh venv, and run commands from another directory with that venv not activated.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q torch==2.13.0
"$WORK/venv/bin/pip" install -q "$WORK"/dist/qso3_tvm-*.whl
cd "$WORK"
export QSO3_CACHE="$WORK/cache"
# output to files, then grep: `cmd | grep -q` can kill cmd with SIGPIPE, which pipefail reports as a failure
"$WORK/venv/bin/qso3-tvm" targets > targets.out && grep -q "^x86-avx512" targets.out
"$WORK/venv/bin/qso3-tvm" models > models.out && grep -q "^ethanol-int8" models.out
"$WORK/venv/bin/python" -c "
from qso3_tvm.graph.convention import sample_set
from qso3_tvm.resources import firmware_dir, in_checkout, schedules_dir
from qso3_tvm.nn.testing import save_tiny_model
assert not in_checkout() and (firmware_dir() / 'build.sh').is_file(), firmware_dir()
assert len(sample_set((1, 6, 8))[1]) >= 3
save_tiny_model('tiny.pt')
"
"$WORK/venv/bin/qso3-tvm" compile tiny.pt --target x86-64 -o art > compile.out
test -f art/model.so && test -f art/manifest.json
if grep -q "Warning" compile.out; then echo "TVM warnings reached the terminal:"; cat compile.out; exit 1; fi
echo "wheel check: installed package compiles outside the checkout"
