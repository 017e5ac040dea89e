#!/usr/bin/env bash
# There (the lent GPU), in the repository root, after earlier calls copied every part of the
# onnxruntime-gpu wheel to /tmp/lsaq-ort (README.md beside this file). `run.sh` installs and
# runs the tests; `run.sh bench` (the next call, same warm machine) the compile benchmark;
# `run.sh dtype` (if device time is left) the measurement's float16 against float32.
# Each step's output goes to $OUT/device_check.log; a step that fails or runs out of time does
# not stop the next.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lsaq-out}
mkdir -p "$OUT"
LOG=$OUT/device_check.log
step() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }
run() {
  local limit=$1
  shift
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
export PYTHONPATH=/tmp/site:$PWD:$PWD/runtime:$PWD/tests

if [ "${1:-tests}" = tests ]; then
  step "device"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 | tee -a "$LOG"
  step "install onnxruntime-gpu and the missing packages"
  wheel=/tmp/lsaq-ort/$(cat .whl/ort/NAME)
  cat /tmp/lsaq-ort/part-* > "$wheel"
  if [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$(cat .whl/ort/SHA256)" ]; then
    echo "the joined wheel's sha256 differs: a part is missing or damaged" | tee -a "$LOG"
    exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" \
      .whl/small/*.whl 2>&1 | tee -a "$LOG"
  run 60 python3 tools/device_check/providers.py
  step "runtime on CUDA: graph parity, generation, memory plan against NVML"
  run 200 python3 -m pytest -q -p no:cacheprovider -s -rs tests/runtime/test_cuda.py
  step "compiler's torch stages on CUDA: cross-check against the CPU, a whole build"
  run 300 python3 -m pytest -q -p no:cacheprovider -rs tests/compile/test_measure.py -k cuda
elif [ "$1" = dtype ]; then
  step "the default measurement's costs in float16 and bfloat16 on the GPU against float32"
  run 540 python3 benchmarks/bench_measure_dtype.py --device cuda --dtypes float16,bfloat16 \
      --windows 4 --seq-len 128
else
  step "compile at 7B width, 2 layers, torch stages on the GPU (bench_compile)"
  run 540 python3 benchmarks/bench_compile.py --shape llama-2-7b:2 --profile default \
      --build-arg=--device=cuda --workdir /tmp/lsaq-bc --out "$OUT/bench_compile.md"
  cp /tmp/lsaq-bc/build-*.log "$OUT/" 2>/dev/null
fi
step "done"
