#!/usr/bin/env bash
# The prepared GPU check, one command on a CUDA machine (< 8 min on one H100-class GPU):
#   1. `fastgen bench gpu`: every Triton kernel against its fp32 reference at real shapes (Wan 2.1
#      1.3B 480p, a HunyuanVideo 720p slice, SparseD at 32k) in bf16 and fp16, timed against SDPA /
#      FlashAttention in the same run -> one JSON (default gpu_check.json, or $1);
#   2. the Triton kernel tests and the CUDA-only pipeline tests (sequential CPU offload) natively.
# Exit status: non-zero if any case or test failed. On a CPU machine: `fastgen bench gpu --interpret`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0
timeout 360 python3 -m fastgen.bench.gpu --out "$out" --rounds "${ROUNDS:-10}" || status=$?
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_block_sparse.py \
  tests/test_triton_rectified.py tests/test_bench_gpu.py "tests/test_pipeline_conventions.py::test_cpu_offload_works_with_the_processors" || status=$?
exit "$status"
