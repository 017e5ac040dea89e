#!/usr/bin/env bash
# Here (no GPU needed): fetch what the lent GPU machine's image lacks into .whl/ (git-ignored)
# and cut the onnxruntime-gpu wheel (about 340 MB) into 60 MB parts, since one device call
# carries at most 64 MiB. README.md beside this file says how the calls then go.
set -euo pipefail
cd "$(dirname "$0")/../.."
PLAT=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf .whl/ort .whl/small
mkdir -p .whl/ort .whl/small
python3 -m pip download -q "${PLAT[@]}" -d .whl/ort onnxruntime-gpu==1.31.1
# the image has torch, transformers, onnx, safetensors, tokenizers, scipy, pytest, pynvml;
# not these (the compiler reads GGUF, the runtime checks manifests against their schema)
python3 -m pip download -q "${PLAT[@]}" -d .whl/small gguf jsonschema \
    jsonschema-specifications referencing rpds-py
cd .whl/ort
wheel=$(ls onnxruntime_gpu-*.whl)
echo "$wheel" > NAME
sha256sum "$wheel" | cut -d' ' -f1 > SHA256
split -b 60M -d "$wheel" part-
rm "$wheel"
ls -l
echo "parts: $(ls part-* | tr '\n' ' ')"
