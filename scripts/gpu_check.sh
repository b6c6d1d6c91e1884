#!/usr/bin/env bash
# The prepared GPU check, one command on a CUDA machine (< 8 min on one H100-class GPU):
#   1. `fastgen bench gpu`: every Triton kernel against its fp32 reference at real shapes (Wan 2.1
#      1.3B 480p, a HunyuanVideo 720p slice, SparseD at 32k) in bf16 and fp16, timed against SDPA /
#      FlashAttention in the same run -> one JSON (default gpu_check.json, or $1);
#   2. the Triton kernel tests and the CUDA-only pipeline tests (sequential CPU offload) natively;
#   3. with >= 2 GPUs (`nvidia-smi -L`): a 2-GPU context-parallel case, `fastgen generate --context-parallel
#      ulysses` on tiny-wan under torchrun (nccl), and `fastgen bench cp` (skipped with a line otherwise).
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
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -ge 2 ]; then
  cp_dir=$(mktemp -d)
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m fastgen.cli generate \
    --preset tiny-wan --method rectified --prompt "a cat" --context-parallel ulysses \
    --out "$cp_dir/cp.mp4" --overwrite || status=$?
  [ -s "$cp_dir/cp.mp4" ] || { echo "2-GPU context parallel: no video written"; status=1; }
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m fastgen.bench.context_parallel \
    --tokens 32768 --heads 12 --head-dim 128 --dtype bfloat16 --rounds 5 || status=$?
else
  echo "2-GPU context-parallel case skipped: nvidia-smi lists ${gpus:-0} GPU(s), needs 2"
fi
exit "$status"
