#!/usr/bin/env bash
# Build qso3-rpc-server: `build.sh native` (this machine, against the installed wheels) or
# `build.sh aarch64` (cross, against the aarch64 apache-tvm / apache-tvm-ffi wheels from PyPI).
# Output: build/<arch>/qso3-rpc-server and build/<arch>/lib/*.so (rpath $ORIGIN/lib): copy the
# folder to the board as it is.
set -euo pipefail
cd "$(dirname "$0")"
ARCH=${1:-native}
TVM_VERSION=$(python3 -c 'import importlib.metadata as m; print(m.version("apache-tvm"))')
FFI_VERSION=$(python3 -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
if [ "$ARCH" = native ]; then
  OUT=build/$(uname -m)
  CXX=${CXX:-g++}
  TVM_DIR=$(python3 -c 'import tvm, os; print(os.path.dirname(tvm.__file__))')
  FFI_DIR=$(python3 -c 'import tvm_ffi, os; print(os.path.dirname(tvm_ffi.__file__))')
elif [ "$ARCH" = aarch64 ]; then
  OUT=build/aarch64
  CXX=${CXX:-aarch64-linux-gnu-g++}
  WHEELS=build/wheels-aarch64
  if [ ! -f "$WHEELS/tvm/lib/libtvm_runtime_cuda.so" ] || [ ! -d "$WHEELS/tvm_ffi" ]; then
    mkdir -p "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
      --python-version 3.11 -d "$WHEELS" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION"
    # keep only the runtime libraries and the tvm-ffi headers
    python3 - "$WHEELS" <<'PY'
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
"$CXX" -std=c++17 -O2 -o "$OUT/qso3-rpc-server.tmp" qso3_rpc_server.cc -I"$FFI_DIR/include" \
  -L"$OUT/lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/lib' -lpthread -ldl
mv "$OUT/qso3-rpc-server.tmp" "$OUT/qso3-rpc-server"
echo "$OUT/qso3-rpc-server (apache-tvm $TVM_VERSION, apache-tvm-ffi $FFI_VERSION)"
