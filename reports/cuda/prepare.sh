#!/usr/bin/env bash
# Prepare gpu_check/ (git-ignored via .git/info/exclude) for the GPU check on a machine with an
# NVIDIA GPU and Python 3.12 but no apache-tvm: a runtime-only TVM (no compiler library) for the
# client, and the CUDA artifacts, compiled here. Then, on the GPU machine, from the repo root:
#   bash reports/cuda/run_gpu.sh        (OUT=<folder for the results>)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p gpu_check/site gpu_check/whl
grep -qx "/gpu_check/" .git/info/exclude || echo "/gpu_check/" >> .git/info/exclude
FFI=$(python3 -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d gpu_check/whl "apache-tvm-ffi==$FFI"
(cd gpu_check/site && unzip -qo ../whl/*.whl)
TVM=$(python3 -c 'import tvm, os; print(os.path.dirname(tvm.__file__))')
rm -rf gpu_check/site/tvm && cp -r "$TVM" gpu_check/site/tvm
rm -rf gpu_check/site/tvm/lib/libtvm_compiler.so gpu_check/site/tvm/3rdparty gpu_check/site/tvm/src gpu_check/whl
cp -r "$(dirname "$TVM")"/apache_tvm-*.dist-info gpu_check/site/
bash firmware/build.sh native
for m in ethanol-fp32 ethanol-int8; do qso3-tvm compile $m --target cuda-sm90 -o gpu_check/$m-sm90; done
