"""What SparseD's reused pattern buys on Window-Diffusion's Dream-rule refreshes (issue 11, item 2).

Dream-shaped tiny Qwen2 of ``fastgen bench window`` (hidden 512, 4 heads x 128, 2 KV heads, 4 layers),
random weights, prompt 512, gen 256, ``steps == gen_length``, Dream rules 128/16/32, SparseD skip 0.2,
select 0.3. Three variants interleaved in one process, median wall clock of ``--rounds``:

- ``wd``: Window-Diffusion alone;
- ``wd+sparsed``: with SparseD, its pattern reused on the growing refresh prefixes (``for_length``);
- ``wd+sparsed(dense refreshes)``: the behaviour before: every refresh after the warm-up runs dense
  attention (SDPA, as the adapter's fallback did), i.e. what running it dense costs.

Also prints the sparse attention calls and the tile density actually computed on the refreshes.

    python3 scripts/bench_sparsed_dream_refreshes.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fastgen import SparseDConfig, WindowDiffusionConfig
from fastgen.attention import dense_attention
from fastgen.attention.sparsed import SparseDPattern
from fastgen.bench.window import VOCAB, build_model
from fastgen.processors import transformers_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    total = args.prompt_length + args.gen_length
    pipe = build_model("dream", total)
    ids = torch.randint(0, VOCAB - 1, (1, args.prompt_length), generator=torch.Generator().manual_seed(0))
    wd = WindowDiffusionConfig().resolved("dream")
    sparsed = SparseDConfig(skip=0.2, select=0.3, block_size=args.block_size)
    real_for_length = SparseDPattern.for_length
    real_attention = transformers_lm.sparsed_attention
    densities: list[float] = []
    counted: list[int] = []

    def recording_for_length(self, num_tokens):
        mask = real_for_length(self, num_tokens)
        densities.append(float(mask.float().mean()))
        return mask

    def counting_sparse(q, k, v, block_mask, block_size, **kw):
        counted.append(1)
        return real_attention(q, k, v, block_mask, block_size, **kw)

    def dense_instead(q, k, v, block_mask, block_size, key_padding_mask=None, scale=None, **kw):
        counted.append(1)
        return dense_attention(q, k, v, key_padding_mask=key_padding_mask)

    variants = {
        "wd": ([wd], counting_sparse),
        "wd+sparsed": ([wd, sparsed], counting_sparse),
        "wd+sparsed(dense refreshes)": ([wd, sparsed], dense_instead),
    }
    kw = dict(input_ids=ids, gen_length=args.gen_length, steps=args.gen_length, progress=False, generator=0)
    seconds = {name: [] for name in variants}
    calls, outputs = {}, {}
    SparseDPattern.for_length = recording_for_length
    try:
        for round_index in range(args.rounds + 1):  # round 0: untimed warm-up of every path
            for name, (acceleration, attention) in variants.items():
                densities.clear()
                counted.clear()
                transformers_lm.sparsed_attention = attention
                try:
                    start = time.perf_counter()
                    out = pipe(acceleration=acceleration, **kw)
                    elapsed = time.perf_counter() - start
                finally:
                    transformers_lm.sparsed_attention = real_attention
                if round_index:
                    seconds[name].append(elapsed)
                calls[name] = (len(counted), statistics.mean(densities) if densities else None)
                outputs[name] = out.sequences
    finally:
        SparseDPattern.for_length = real_for_length
    print(f"loadavg {os.getloadavg()}, threads {torch.get_num_threads()}, rounds {args.rounds}")
    base = statistics.median(seconds["wd"])
    for name in variants:
        median = statistics.median(seconds[name])
        sparse_calls, density = calls[name]
        same = bool(torch.equal(outputs[name], outputs["wd"]))
        print(
            f"{name:30s} median {median:7.3f} s  ({base / median:5.3f}x of wd)  sparse refresh calls "
            f"{sparse_calls:3d}  mean tile density {density if density is None else round(density, 3)}  "
            f"tokens == wd: {same}"
        )


if __name__ == "__main__":
    main()
