"""``fastgen bench causal``: Light Forcing against dense on an attention-bound tiny causal (Self-Forcing) Wan.

The model: a ``WanTransformer3DModel`` with 2 blocks of 12 heads x 128 (dim 1536, FFN 1536, 512 text tokens),
random weights, fp32; the latent is 9 frames of 64 x 96 (32 x 48 = 1536 tokens per frame after the 2 x 2
patch, frames are whole blocks of 128 as in the authors' 512 x 768 setting), i.e. 3 chunks of 3 frames.
``CausalWanPipeline`` generates the latents (``output_type="latent"``, ``prompt_embeds``, fixed noise and
generator) with 2 denoising steps per chunk plus the context pass (which the pipeline skips after the last
chunk). Variants, interleaved round by round in one process (wall clock, median over rounds):

- ``dense``: the dense causal processors;
- ``light_forcing``: ``LightForcingConfig()`` with ``block_size`` (defaults: CAG 0.88 / 0.98, HSA 6 / 1 / 2);
- ``topk``: plain top-k block-sparse at the same per-chunk budget: the same CAG sparsities and pooled
  block scores, one top-k over all key blocks (``keep_frames`` larger than any history, so no frame level);
- ``light_forcing_rectified``: Light Forcing with ``rectify=True``;
- ``light_forcing_pooled_cache`` (opt-in): Light Forcing with ``pool_cache=True`` (cached frames pooled once,
  not at every call).

Amdahl's ideal per variant: the dense self-attention share ``a`` of the dense generation is measured (the
dense time minus the time of a run whose chunk attention is skipped), and the attention is credited with
the computed fraction ``d`` of the dense attention work (tiles weighted by their keys, chunk 0 dense, from
the per-chunk statistics): ``ideal = 1 / ((1 - a) + a d)``; ``fraction_of_ideal = speedup / ideal``. Error:
relative L2 of the final latents against dense. Memory: the KV cache (allocated once, same for every
variant) and, with ``--memory``, the peak extra memory of the last chunk's attention call in a child
process: ``max_memory_allocated`` on CUDA; on the CPU (Linux) the growth of the peak resident size over
the call, with the peak reset just before it and every buffer its own mapping (glibc
``MALLOC_MMAP_THRESHOLD_``), so freed memory leaves the process.

With 9 frames and ``keep_frames=6`` no chunk has more than 6 past frames, so Light Forcing's HSA runs its
one-stage regime and selects exactly what ``topk`` selects; ``--frames 21`` (7 chunks) reaches the
hierarchical regime. Random weights: a speed test and an agreement test, not a quality one.

Run: ``fastgen bench causal [--rounds 3] [--frames 9] [--block-size 128] [--partial-out FILE]``; prints one
JSON object (``--partial-out`` also writes the figures of the rounds done so far after every round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from fastgen.bench._timing import time_call, timed

FRAME_HW = (64, 96)  # latent height, width -> 32 x 48 = 1536 tokens per frame
TEXT_TOKENS = 512
TEXT_DIM = 64
CHANNELS = 16
STEPS = [1000.0, 750.0]  # 2 denoising steps (the pipeline adds the context pass)


def build_transformer(layers: int = 2, heads: int = 12, head_dim: int = 128, device="cpu"):
    """The attention-bound tiny Wan of the benchmark (random weights, seed 0)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return (
        WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            text_dim=TEXT_DIM,
            freq_dim=256,
            ffn_dim=heads * head_dim,
            num_layers=layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
        .eval()
        .to(device)
    )


def _smooth_noise(frames: int, g: torch.Generator, frame_hw=FRAME_HW) -> torch.Tensor:
    """Initial noise with some spatial structure (upsampled coarse noise plus fine noise)."""
    h, w = frame_hw
    coarse = torch.randn(1, CHANNELS, frames, h // 8, w // 8, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(frames, h, w), mode="trilinear", align_corners=False)
    return up + 0.5 * torch.randn(up.shape, generator=g)


def variant_configs(block_size: int, frames: int) -> dict:
    """Variant name -> LightForcingConfig (None: dense)."""
    from fastgen import LightForcingConfig

    return {
        "dense": None,
        "light_forcing": LightForcingConfig(block_size=block_size),
        "topk": LightForcingConfig(block_size=block_size, keep_frames=frames, keep_sink=0, keep_near=0),
        "light_forcing_rectified": LightForcingConfig(block_size=block_size, rectify=True),
        "light_forcing_pooled_cache": LightForcingConfig(block_size=block_size, pool_cache=True),
    }


DEFAULT_VARIANTS = ("dense", "light_forcing", "topk", "light_forcing_rectified")
"""Variants run unless ``--variants`` says otherwise (``light_forcing_pooled_cache`` is opt-in)."""


class _SkipAttention:
    """Chunk attention replaced by returning the queries (what the rest of the generation costs)."""

    def __call__(self, query, key, value, info):
        return query


def _generate(pipe, noise, text, frames, seed, *, record_cache=None):
    frame_hw = tuple(noise.shape[-2:])

    def on_chunk(pipe_, chunk, latents):
        if record_cache is not None:
            from fastgen.processors.causal_wan import get_causal_state

            state = get_causal_state(pipe_.transformer)
            if state is not None and state.session is not None:
                record_cache.append(state.session.cache_bytes())

    g = torch.Generator().manual_seed(seed)
    return pipe(
        prompt_embeds=text,
        num_frames=4 * (frames - 1) + 1,
        height=frame_hw[0] * 8,
        width=frame_hw[1] * 8,
        latents=noise.clone(),
        generator=g,
        denoising_timesteps=STEPS,
        output_type="latent",
        callback_on_chunk_end=on_chunk,
    ).frames


def computed_fraction(rows: list[dict], frames_per_chunk: int = 3) -> float:
    """Fraction of the dense attention work a variant computed: per-chunk densities weighted by
    calls x key frames (query length is the same for every chunk)."""
    work = done = 0.0
    for r in rows:
        keys = (r["chunk"] + 1) * frames_per_chunk
        work += r["calls"] * keys
        done += r["calls"] * keys * r["density"]
    return done / work if work else 1.0


def _variant_names(variants: list[str] | None, configs: dict) -> list[str]:
    """The variants to run (default :data:`DEFAULT_VARIANTS`), dense first; a ``ValueError`` for unknown names."""
    names = variants or list(DEFAULT_VARIANTS)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise ValueError(f"variants={unknown} are unknown; allowed: {', '.join(configs)}")
    if "dense" not in names:
        names = ["dense", *names]
    return names


def _causal_runs(pipe, configs: dict, noise: torch.Tensor, text: torch.Tensor, frames: int):
    """``run_variant(name, record_cache=None) -> (output, stats)`` with the variant's config applied, and a run
    with every self-attention skipped (the rest of the model's cost)."""
    from fastgen import apply_sparse_attention, record_attention_stats, remove_sparse_attention
    from fastgen.processors import light_forcing_wan
    from fastgen.processors.causal_wan import install_causal_processors, remove_causal_processors

    transformer = pipe.transformer

    def run_variant(name, record_cache=None):
        config = configs[name]
        if config is not None:
            apply_sparse_attention(transformer, config)
            record_attention_stats(transformer, "summary")  # statistics are opt-in; the bench reads them
        try:
            out = _generate(pipe, noise, text, frames, seed=2, record_cache=record_cache)
            return out, light_forcing_wan.stats(transformer)
        finally:
            if config is not None:
                remove_sparse_attention(transformer)

    def run_without_attention():
        install_causal_processors(
            transformer,
            self_attention=lambda layer, state: _with_fn(layer, state),
        )
        try:
            return _generate(pipe, noise, text, frames, seed=2)
        finally:
            remove_causal_processors(transformer)

    def _with_fn(layer, state):
        from fastgen.processors.causal_wan import CausalWanSelfAttnProcessor

        return CausalWanSelfAttnProcessor(layer, state, chunk_attention_fn=_SkipAttention())

    return run_variant, run_without_attention


def run_causal_bench(
    rounds: int = 3,
    frames: int = 9,
    block_size: int = 128,
    layers: int = 2,
    variants: list[str] | None = None,
    device: str | None = None,
    memory: bool = False,
    frame_hw: tuple[int, int] = FRAME_HW,
    partial_out: str | None = None,
) -> dict:
    """Run the benchmark; returns a dict of times, ratios, errors, densities and memory."""
    from fastgen.kernels.cpu_attn import warm_up_cpu_kernel
    from fastgen.pipelines.causal_wan import CausalWanPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        warm_up_cpu_kernel()
    configs = variant_configs(block_size, frames)
    names = _variant_names(variants, configs)
    transformer = build_transformer(layers=layers, device=device)
    pipe = CausalWanPipeline(transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    noise = _smooth_noise(frames, g, frame_hw).to(device)
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g).to(device)

    run_variant, run_without_attention = _causal_runs(pipe, configs, noise, text, frames)

    cache_bytes: list[int] = []
    # warm-up of the dense and sparse paths (first-call costs) on one chunk, which every variant runs dense
    _generate(pipe, noise[:, :, :3], text, 3, seed=2)
    result = {
        "frames": frames,
        "frame_tokens": (frame_hw[0] // 2) * (frame_hw[1] // 2),
        "layers": layers,
        "heads": 12,
        "head_dim": 128,
        "block_size": block_size,
        "denoising_steps": len(STEPS),
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
    }
    if memory:
        result["memory"] = attention_memory(frames, block_size, device, frame_hw)
    times = {name: [] for name in names}
    rest_times = []
    outputs, rows = {}, {}
    for round_index in range(rounds):
        for name in names:
            record = cache_bytes if name == "dense" and not cache_bytes else None
            (out, stats), t = timed(lambda name=name, record=record: run_variant(name, record))
            times[name].append(t)
            outputs[name], rows[name] = out, stats
        rest_times.append(time_call(run_without_attention))
        _summarize(result, names, times, rest_times, outputs, rows, cache_bytes, round_index + 1)
        if partial_out is not None:
            with open(partial_out, "w") as f:
                json.dump(result, f, indent=2)
    return result


def _summarize(result, names, times, rest_times, outputs, rows, cache_bytes, rounds_done) -> None:
    """Medians, ratios, ideal and errors of the rounds run so far, written into ``result``."""
    dense_t = times["dense"]
    share = min(1.0, max(0.0, 1.0 - statistics.median(rest_times) / statistics.median(dense_t)))
    dense_out = outputs["dense"].float()
    result.update(
        {
            "rounds": rounds_done,
            "loadavg": list(os.getloadavg()),
            "dense_seconds_median": statistics.median(dense_t),
            "no_attention_seconds_median": statistics.median(rest_times),
            "attention_share": share,
            "cache_bytes": max(cache_bytes) if cache_bytes else None,
            "variants": {},
        }
    )
    for name in names[1:]:
        ratio = statistics.median(d / s for d, s in zip(dense_t, times[name]))
        fraction = computed_fraction(rows[name])
        ideal = 1.0 / ((1.0 - share) + share * fraction)
        result["variants"][name] = {
            "seconds_median": statistics.median(times[name]),
            "speedup_median": ratio,
            "computed_fraction_of_dense_attention": fraction,
            "ideal_speedup": ideal,
            "fraction_of_ideal": ratio / ideal,
            "rel_l2_vs_dense": float((outputs[name].float() - dense_out).norm() / dense_out.norm()),
            "chunk_density": _per_chunk(rows[name]),
            "chunk_sparsity": {str(r["chunk"]): r["sparsity"] for r in rows[name] if r["layer"] == 0},
        }


def _per_chunk(rows: list[dict]) -> dict:
    chunks: dict[int, list[float]] = {}
    for r in rows:
        chunks.setdefault(r["chunk"], []).append(r["density"])
    return {str(c): sum(v) / len(v) for c, v in sorted(chunks.items())}


# ------------------------------------------------------------------------------------------- memory


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _probe(kind: str, frames: int, block_size: int, device: str, frame_hw=FRAME_HW) -> int:
    """Peak extra bytes of the last chunk's self-attention call (``kind``: dense | light_forcing).

    CUDA: ``max_memory_allocated`` minus the allocation before the call. CPU (Linux): the child runs
    with glibc's ``MALLOC_MMAP_THRESHOLD_`` at 64 KiB (set by :func:`attention_memory`), so every tensor
    buffer is its own mapping, returned to the system when freed; after a warm-up call at a small size
    (code paged in), the peak resident size is reset to the current one (``/proc/self/clear_refs``)
    and the call's peak is ``VmHWM`` after it minus ``VmRSS`` before it.
    """
    from fastgen.attention.light_forcing import chunk_sparsities, light_forcing_attention
    from fastgen.kernels.cpu_attn import warm_up_cpu_kernel

    dev = torch.device(device)
    heads, d, t = 12, 128, (frame_hw[0] // 2) * (frame_hw[1] // 2)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.empty(1, heads, 3 * t, d, device=dev).normal_(generator=g)
    k = torch.empty(1, heads, frames * t, d, device=dev).normal_(generator=g)
    v = torch.empty(1, heads, frames * t, d, device=dev).normal_(generator=g)
    sparsity = chunk_sparsities(frames, 3, 0.88, 0.98)[-1]

    def call(q=q, k=k, v=v, frame_tokens=t):
        if kind == "dense":
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            return dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return light_forcing_attention(
            q,
            k,
            v,
            sparsity=sparsity,
            block_size=block_size,
            frame_tokens=frame_tokens,
            keep_frames=6,
            keep_sink=1,
            keep_near=2,
        )[0]

    with torch.no_grad():
        if dev.type == "cuda":
            call()  # warm-up (kernel compile), then measure
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        warm_up_cpu_kernel()
        small = block_size  # one block per frame: pages in the code paths at a negligible size
        call(q[:, :, : 3 * small], k[:, :, : frames * small], v[:, :, : frames * small], small)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _status_bytes("VmRSS")
        out = call()
        peak = _status_bytes("VmHWM")
        del out
        return peak - base


def attention_memory(frames: int, block_size: int, device: torch.device, frame_hw=FRAME_HW) -> dict:
    """Peak extra memory of the last chunk's attention, dense vs Light Forcing, each in a child process."""
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for kind in ("dense", "light_forcing"):
        cmd = [
            sys.executable,
            "-m",
            "fastgen.bench.causal",
            "--memory-probe",
            kind,
            "--frames",
            str(frames),
            "--block-size",
            str(block_size),
            "--device",
            device.type,
            "--frame-hw",
            str(frame_hw[0]),
            str(frame_hw[1]),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[f"{kind}_attention_peak_bytes"] = int(done.stdout.strip().splitlines()[-1])
    out["how"] = (
        "CUDA max_memory_allocated"
        if device.type == "cuda"
        else "child-process VmHWM - VmRSS over the call (peak reset before it), every buffer mmap-ed"
    )
    return out


# ----------------------------------------------------------------------------------------- one call


def run_op_bench(rounds: int = 5, frames: int = 9, block_size: int = 128, frame_hw=FRAME_HW) -> dict:
    """The last chunk's self-attention call alone (q: 3 frames, k/v: ``frames`` frames, 12 x 128, fp32):
    dense (diffusers' dispatched attention, as the dense causal processor) vs Light Forcing (selection +
    kernel), with the pooled cache of the past frames, with rectification, and the pooling itself;
    interleaved rounds, wall-clock medians, speedup and fraction of the ideal 1 / density."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from fastgen.attention.light_forcing import chunk_sparsities, light_forcing_attention, pool_keys
    from fastgen.kernels.cpu_attn import warm_up_cpu_kernel

    warm_up_cpu_kernel()
    g = torch.Generator().manual_seed(0)
    h, d, t = 12, 128, (frame_hw[0] // 2) * (frame_hw[1] // 2)
    q = torch.randn(1, h, 3 * t, d, generator=g)
    k = torch.randn(1, h, frames * t, d, generator=g)
    v = torch.randn(1, h, frames * t, d, generator=g)
    sparsity = chunk_sparsities(frames, 3, 0.88, 0.98)[-1]
    args = dict(
        sparsity=sparsity, block_size=block_size, frame_tokens=t, keep_frames=6, keep_sink=1, keep_near=2
    )
    _, info = light_forcing_attention(q, k, v, **args)
    past, density = info["past"], float(info["plan"].density())
    calls = {
        "dense": lambda: dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
        "light_forcing": lambda: light_forcing_attention(q, k, v, **args),
        "light_forcing_pooled_cache": lambda: light_forcing_attention(q, k, v, pooled=past, **args),
        "light_forcing_rectified": lambda: light_forcing_attention(q, k, v, rectify=True, **args),
        "pool_all_keys": lambda: pool_keys(k, None, block_size, t, (frames - 3) * t, None),
        "pool_with_cache": lambda: pool_keys(k, None, block_size, t, (frames - 3) * t, past),
    }
    times = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(rounds):
            for name, fn in calls.items():
                times[name].append(time_call(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    sparse = [name for name in med if name.startswith("light_forcing")]
    return {
        "rounds": rounds,
        "sparsity": sparsity,
        "density": density,
        "loadavg": list(os.getloadavg()),
        "median_seconds": med,
        "speedup_vs_dense": {name: med["dense"] / med[name] for name in sparse},
        "fraction_of_ideal": {name: med["dense"] / med[name] * density for name in sparse},
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmark and print one JSON object."""
    p = argparse.ArgumentParser(prog="fastgen bench causal", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the variants in turn (median)")
    p.add_argument("--frames", type=int, default=9, help="latent frames, a multiple of 3 (default 9)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (default 128)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--variants", nargs="+", default=None, help="subset of the variants (dense is always run)")
    p.add_argument("--memory", action="store_true", help="also probe the attention call's peak memory")
    p.add_argument("--op", action="store_true", help="time the last chunk's attention call alone")
    p.add_argument("--device", default=None, help="cpu | cuda")
    p.add_argument(
        "--frame-hw", type=int, nargs=2, default=FRAME_HW, help="latent frame height width (default 64 96)"
    )
    p.add_argument(
        "--partial-out", default=None, help="also write the results so far to this file after every round"
    )
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise ValueError(f"--rounds={args.rounds} must be >= 1")
    if args.frames < 3 or args.frames % 3:
        raise ValueError(
            f"--frames={args.frames} is not allowed; allowed: a multiple of 3 (chunks of 3 frames)"
        )
    if args.memory_probe is not None:
        print(
            _probe(
                args.memory_probe, args.frames, args.block_size, args.device or "cpu", tuple(args.frame_hw)
            )
        )
        return 0
    if args.op:
        print(
            json.dumps(
                run_op_bench(args.rounds, args.frames, args.block_size, tuple(args.frame_hw)), indent=2
            )
        )
        return 0
    result = run_causal_bench(
        rounds=args.rounds,
        frames=args.frames,
        block_size=args.block_size,
        layers=args.layers,
        variants=args.variants,
        device=args.device,
        memory=args.memory,
        frame_hw=tuple(args.frame_hw),
        partial_out=args.partial_out,
    )
    print(json.dumps(result, indent=2))  # the command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
