#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command for a bare machine that has only PyTorch, transformers and
# sentencepiece (no network, no pip): CUDA parity against transformers in fp32 and fp16, the compiled (CUDA-graph)
# decode against eager, W8A8 and weight-only int8/int4 on CUDA, and decode speed on ChatGLM2-6B's shape against
# transformers and the measured HBM floor. About 8 minutes; results in $OUT (default benchmarks/results/), as
# gpu_check.md and gpu_check.json. Extra arguments go to `python -m benchmarks.gpu_check` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check --out "${OUT:-benchmarks/results}" "$@"
