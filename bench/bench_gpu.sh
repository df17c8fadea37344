#!/usr/bin/env bash
# GPU readiness in one command: bare-model images/s at batch 32/64/128 in fp32 and mixed precision, the largest
# difference of mixed-precision scores from fp32 on the shared images, and the pipeline ratio with one worker.
#
#   bash bench/bench_gpu.sh                  # on a machine with an NVIDIA GPU (and tensorflow[and-cuda])
#   bash bench/bench_gpu.sh --mixed fp16     # fp16 instead of bf16; bench/bench_gpu.py --help lists the flags
#
# Without a GPU it runs on the CPU, quickly (few images, small batches), and says that no GPU was found.
# In the CUDA image: docker run --gpus all --entrypoint bash -v "$PWD/..:/src" -w /src/covid-cxr covid-cxr:cuda \
#   bench/bench_gpu.sh   (the repository and ../shared/data mounted).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$python" bench/bench_gpu.py "$@"
