#!/usr/bin/env bash
# One-shot GPU check (device machine): native firmware serving CUDA artifacts over RPC on loopback.
set -u
export PYTHONUNBUFFERED=1
R=$PWD
{ nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv; python3 --version; uname -m; ldd --version | head -1; nproc; } 2>&1 | tee $OUT/env.txt
CUDART=$(ldconfig -p | awk '/libcudart.so.13 /{print $NF; exit}')
[ -z "$CUDART" ] && CUDART=/usr/local/cuda/targets/x86_64-linux/lib/libcudart.so.13
echo "libcudart: $CUDART" | tee -a $OUT/env.txt
export LD_LIBRARY_PATH=$(dirname "$CUDART"):${LD_LIBRARY_PATH:-}
export PYTHONPATH=$R/gpu_check/site:$R
(which g++ && bash firmware/build.sh native) > $OUT/firmware_build.log 2>&1; echo "firmware build rc=$?" | tee -a $OUT/env.txt
timeout 240 python3 reports/cuda/verify_gpu.py ethanol-fp32-sm90 ethanol-int8-sm90 2>&1 | grep -v "Warning" | tee $OUT/verify.log
# memory check: every kernel of one energy+forces call, under compute-sanitizer
compute-sanitizer --tool memcheck --print-limit 10 --log-file $OUT/memcheck.log firmware/build/x86_64/qso3-rpc-server \
  --host 127.0.0.1 --port 9411 --key h100 --work-dir /tmp/fwm --label h100-memcheck > /dev/null 2>&1 &
SP=$!
sleep 4
QSO3_BOARD=127.0.0.1:9411 timeout 150 python3 reports/cuda/verify_gpu.py ethanol-fp32-sm90 ethanol-int8-sm90 2>&1 | grep -v Warning
kill $SP; sleep 2; kill -9 $SP 2>/dev/null; cat $OUT/memcheck.log
