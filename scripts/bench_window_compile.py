"""Window-Diffusion with a compiled model (inductor) against eager, on the LLaDA shape of
``fastgen bench window``.

Tiny LLaDA-shaped Llama (hidden 512, 4 heads x 128, 4 layers, MHA), random weights, fp32, one thread,
prompt 512, ``steps == gen_length``, Window-Diffusion 64/16/32. ``pipe.model.compile()`` once; the
compiled and the eager forward are switched on the same module (``_compiled_call_impl``), so both
variants run the same weights in one process. Per round, interleaved: a WD generation and a
``--probe-steps`` dense probe (one token per step), eager then compiled. Prints the medians, the
WD speed-up over dense for each, what compiling buys each, and whether the compiled tokens equal
eager's. The first compiled runs (compilation, a few minutes on a CPU) are not timed.

    python3 scripts/bench_window_compile.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fastgen import WindowDiffusionConfig
from fastgen.bench.window import VOCAB, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--probe-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = args.gen_length
    pipe = build_model("llada", args.prompt_length + gen, device="cpu")
    model = pipe.model
    ids = torch.randint(0, VOCAB - 1, (1, args.prompt_length), generator=torch.Generator().manual_seed(0))
    wd = WindowDiffusionConfig().resolved("llada")
    common = dict(input_ids=ids, gen_length=gen, progress=False, generator=0)

    def window():
        return pipe(**common, steps=gen, acceleration=[wd]).sequences

    def dense_probe():
        return pipe(**common, steps=args.probe_steps, block_length=gen)

    model.compile()
    compiled_impl = model._compiled_call_impl
    start = time.perf_counter()
    window(), dense_probe()  # compilation: every graph of both
    print(f"compiled in {time.perf_counter() - start:.0f} s; load average {os.getloadavg()}", flush=True)
    times = {f"{v}_{m}": [] for v in ("wd", "dense_step") for m in ("eager", "compiled")}
    tokens = {}
    for _ in range(args.rounds):
        for mode in ("eager", "compiled"):
            model._compiled_call_impl = compiled_impl if mode == "compiled" else None
            start = time.perf_counter()
            tokens[mode] = window()
            times[f"wd_{mode}"].append(time.perf_counter() - start)
            start = time.perf_counter()
            dense_probe()
            times[f"dense_step_{mode}"].append((time.perf_counter() - start) / args.probe_steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: median {med[k]:.3f} s of {', '.join(f'{t:.3f}' for t in v)}")
    for mode in ("eager", "compiled"):
        print(f"WD speed-up over dense, {mode}: {gen * med[f'dense_step_{mode}'] / med[f'wd_{mode}']:.2f}x")
    print(
        f"compiled over eager: WD {med['wd_eager'] / med['wd_compiled']:.2f}x, dense step "
        f"{med['dense_step_eager'] / med['dense_step_compiled']:.2f}x; compiled tokens equal eager's: "
        f"{torch.equal(tokens['eager'], tokens['compiled'])}; load average {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
