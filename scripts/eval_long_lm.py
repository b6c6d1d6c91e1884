"""Held-out dense accuracy of ``tiny-llada-long`` (one token per step, blocks of 32, greedy): exact match
of the whole answer and per-token accuracy, at ``gen_length`` 256 and 1024 (EOS padding after the answer).

    python scripts/eval_long_lm.py --examples 64 --examples-1024 16 --json samples/tiny-llada-long/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from fastgen.pipelines.tiny_llada_long import build_tiny_llada_long


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="held-out prompts at gen 256")
    parser.add_argument("--examples-1024", type=int, default=16, help="held-out prompts at gen 1024")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = build_tiny_llada_long()
    task = pipe.fastgen_task
    result = {"decoding": "dense, one token per step, block 32, greedy", "loadavg_start": os.getloadavg()}
    for gen_length, count in ((256, args.examples), (1024, args.examples_1024)):
        examples = task.held_out(count)
        exact = tokens = 0.0
        start = time.perf_counter()
        for lo in range(0, count, args.batch):
            chunk = examples[lo : lo + args.batch]
            out = pipe(prompt=[e.prompt for e in chunk], gen_length=gen_length, steps=gen_length,
                       block_length=32, temperature=0.0, progress=False)  # fmt: skip
            for text, e in zip(out.texts, chunk):
                ok, frac = task.score(text, e.answer)
                exact += ok
                tokens += frac
        result[f"gen_{gen_length}"] = {
            "examples": count,
            "exact_match": exact / count,
            "token_accuracy": tokens / count,
            "seconds": round(time.perf_counter() - start, 1),
        }
        sys.stdout.write(f"gen {gen_length}: {result[f'gen_{gen_length}']}\n")
    result["loadavg_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
