#!/usr/bin/env bash
# The GPU-only checks, in one short run on a machine with a CUDA device:
#   - CuPy and DALI-GPU preprocessing parity with numpy, nvImageCodec GPU decode parity with pydicom (tests/gpu)
#   - preprocessing throughput of every backend present (benchmarks/preprocess_throughput.py)
# Wheels the machine lacks (pydicom, pylibjpeg-openjpeg, nvidia-nvimgcodec-cu1x, nvidia-nvjpeg2k-cu1x, ...) may be
# put in .whl/ beforehand; they are installed into a scratch folder, not into the system Python.
# Results go to $OUT (default: benchmarks/results/gpu).
#
#   scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-site .whl/*.whl
    export PYTHONPATH="/tmp/gpu-site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt" || true
# --noconftest: the GPU tests need neither the shared data folder nor the project's fixtures.
python3 -m pytest -q -rs -p no:cacheprovider --noconftest tests/gpu 2>&1 | tee "$out/tests_gpu.txt"
python3 -m benchmarks.preprocess_throughput --slices 128 --reps 10 --out "$out/preprocess.json" \
    | tee "$out/preprocess.md"
