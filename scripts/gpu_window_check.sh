#!/usr/bin/env bash
# Window-Diffusion on a GPU at the published LLaDA-8B and Dream-7B shapes (random weights, bf16; nothing
# is downloaded): dense one token per step vs Window-Diffusion vs Window-Diffusion + SparseD at gen 256
# and 1024, prompt 512, as `fastgen bench window` on the CPU. A second device call after
# scripts/gpu_check.sh when device time is left (estimated 3-5 min on one H100-class GPU, never run:
# no GPU has been lent so far). Writes one JSON (default gpu_window.json, or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_window.json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 480 python3 -m fastgen.bench.window --scale real --device cuda --dtype bfloat16 \
  --families llada dream --gen-lengths 256 1024 --rounds "${ROUNDS:-3}" --long-rounds 1 \
  --variants window_diffusion window_diffusion+sparsed --agreement-up-to 256 \
  --pruned-attention 0 --trained 0 --json "$out"
# Fast-dLLM rows: the per-step forward cost of its block-start full forward (= a dense step),
# a PrefixCache step and a DualCache step, middle block, same shapes (random weights, bf16), gen 256 and
# 1024, prompt 512; writes ${out%.json}_fast_dllm.json. Tokens per step come from the trained CPU bench
# (fastgen.bench.long_answers); multiply to compare wall clock per answer.
timeout 300 python3 -m fastgen.bench.long_answers --step-costs --device cuda --dtype bfloat16 --scale real \
  --gen 256 1024 --json "${out%.json}_fast_dllm.json"
