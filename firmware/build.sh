#!/usr/bin/env bash
# Build qso3-rpc-server: `build.sh native` (this machine, against the installed wheels) or
# `build.sh aarch64` (cross, against the aarch64 apache-tvm / apache-tvm-ffi wheels from PyPI).
# Output: $BUILD_DIR/<arch>/qso3-rpc-server and $BUILD_DIR/<arch>/lib/*.so (rpath $ORIGIN/lib; BUILD_DIR
# defaults to firmware/build): copy the folder to the board as it is. PYTHON (default python3) is the
# interpreter whose apache-tvm wheels are used; qso3-tvm passes its own.
set -euo pipefail
SRC=$(cd "$(dirname "$0")" && pwd)
BUILD=${BUILD_DIR:-$SRC/build}
PY=${PYTHON:-python3}
ARCH=${1:-native}
TVM_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm"))')
FFI_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
if [ "$ARCH" = native ]; then
  OUT=$BUILD/$(uname -m)
  CXX=${CXX:-g++}
  TVM_DIR=$("$PY" -c 'import tvm, os; print(os.path.dirname(tvm.__file__))')
  FFI_DIR=$("$PY" -c 'import tvm_ffi, os; print(os.path.dirname(tvm_ffi.__file__))')
elif [ "$ARCH" = aarch64 ]; then
  OUT=$BUILD/aarch64
  CXX=${CXX:-aarch64-linux-gnu-g++}
  WHEELS=$BUILD/wheels-aarch64
  if [ ! -f "$WHEELS/tvm/lib/libtvm_runtime_cuda.so" ] || [ ! -d "$WHEELS/tvm_ffi" ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
      --python-version 3.11 -d "$WHEELS" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION"
    # keep only the runtime libraries and the tvm-ffi headers
    "$PY" - "$WHEELS" <<'PY'
import pathlib, sys, zipfile
root = pathlib.Path(sys.argv[1])
keep = ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_extra.so", "tvm/lib/libtvm_runtime_cuda.so",
        "tvm_ffi/lib/libtvm_ffi.so", "tvm_ffi/include/")
for wheel in root.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(keep):
                z.extract(name, root)
    wheel.unlink()
PY
  fi
  TVM_DIR=$WHEELS/tvm
  FFI_DIR=$WHEELS/tvm_ffi
else
  echo "usage: build.sh [native|aarch64]" >&2; exit 2
fi
mkdir -p "$OUT/lib"
cp "$TVM_DIR/lib/libtvm_runtime.so" "$FFI_DIR/lib/libtvm_ffi.so" "$OUT/lib/"
[ -f "$TVM_DIR/lib/libtvm_runtime_extra.so" ] && cp "$TVM_DIR/lib/libtvm_runtime_extra.so" "$OUT/lib/"
# CUDA boards (Jetson): loaded at run time if present; needs the driver and libcudart.so.13 there
[ -f "$TVM_DIR/lib/libtvm_runtime_cuda.so" ] && cp "$TVM_DIR/lib/libtvm_runtime_cuda.so" "$OUT/lib/"
"$CXX" -std=c++17 -O2 -o "$OUT/qso3-rpc-server.tmp" "$SRC/qso3_rpc_server.cc" -I"$FFI_DIR/include" \
  -L"$OUT/lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib' -lpthread -ldl
mv "$OUT/qso3-rpc-server.tmp" "$OUT/qso3-rpc-server"
echo "$OUT/qso3-rpc-server (apache-tvm $TVM_VERSION, apache-tvm-ffi $FFI_VERSION)"
