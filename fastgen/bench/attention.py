"""Attention benchmark: speed of the sparse methods as a ratio to SDPA in the same run, with the
error against dense next to it.

For each method (``block_sparse`` top-k on pooled scores; ``rectified`` Rectified SpaAttn; ``sparsed``
SparseD patterns) and sparsity, on a structured synthetic workload (:mod:`fastgen.bench.workloads`):

- speedup over ``torch.nn.functional.scaled_dot_product_attention`` on the same inputs: wall clock,
  SDPA and every method interleaved in each of several rounds after a warm-up call (compiles,
  caches), the ratio of medians (and of bests); CUDA is synchronised; the load average is printed;
- every method's timed call includes its selection (SparseD's pattern is fixed after its dense
  warm-up and reused, so its call is the attention alone); the selection alone is timed too;
- the density actually computed (fraction of query-block x key-block tiles) and the keys each query
  attends to (extra keys counted) with the effective density they give;
- relative L2 error and cosine similarity against the SDPA output;
- peak memory of one call: ``torch.cuda.max_memory_allocated`` growth on CUDA; on CPU the growth of
  the process's resident set size (RSS) over its value before the call, sampled every 0.5 ms by a
  thread, after a ``gc.collect()`` + ``malloc_trim`` so freed memory is returned first. RSS sees
  every allocation the call touches (torch's, MKL's, oneDNN's) but may miss a spike shorter than
  the sampling period, and allocator memory reused from earlier calls is not counted as new.

``fastgen bench attention --target`` measures the CPU headline: ``block_sparse_attention`` at 15%
block density, 12 heads x 14,080 tokens x head_dim 128, block 128, fp32, against SDPA, for the
structured workload's mask and for a random mask with the same per-row counts, and prints the
ratios and the fractions of the ideal speedup ``1/density``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastgen.attention import block_sparse_attention, keep_count, pool_blocks, select_topk_blocks
from fastgen.bench._timing import time_call

from .attention_report import format_table, format_target, write_json, write_plot
from .workloads import Workload, text_workload, video_workload

logger = logging.getLogger(__name__)

METHODS = ("block_sparse", "rectified", "sparsed")
TARGET_GRID = (11, 32, 40)  # 14,080 tokens
TARGET_HEADS = 12
TARGET_HEAD_DIM = 128
TARGET_DENSITY = 0.15
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPES.update({"float16": torch.float16, "fp16": torch.float16})


# ------------------------------------------------------------------------------------ measuring


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class _RssSampler(threading.Thread):
    """Samples the process RSS until stopped and keeps the maximum."""

    def __init__(self, period: float = 5e-4):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.period = period
        self.peak = self.process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes of memory one call of ``fn`` adds at its peak (see the module docstring); None if unknown."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak)
    try:
        import psutil  # noqa: F401
    except ImportError:
        return None
    _release_free_memory()
    sampler = _RssSampler()
    base = sampler.process.memory_info().rss
    sampler.start()
    result = fn()
    peak = sampler.stop()
    del result
    return int(peak - base)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error and cosine similarity of ``out`` against ``ref`` (fp32, whole tensor)."""
    a, r = out.float().flatten(), ref.float().flatten()
    rel = float((a - r).norm() / r.norm().clamp_min(1e-30))
    cos = float(F.cosine_similarity(a, r, dim=0))
    return rel, cos


# ------------------------------------------------------------------------------------ workloads


def grid_for_tokens(n: int) -> tuple[int, int, int]:
    """A plausible (frames, height, width) with ``f*h*w == n``: few frames, near-square frames."""
    for f in (11, 8, 7, 6, 5, 4, 3, 2, 1):
        if n % f:
            continue
        m = n // f
        h = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
        if m // h <= 4 * h or f == 1:
            return f, h, m // h
    return 1, 1, n


def make_workload(
    kind: str = "video",
    heads: int = 4,
    head_dim: int = 64,
    tokens: int | None = None,
    grid: tuple[int, int, int] | None = None,
    num_text_tokens: int = 0,
    text_valid: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Workload:
    """The benchmark's workload: ``video`` (needs ``grid`` or ``tokens``) or ``text`` (needs ``tokens``)."""
    if kind == "video":
        if grid is None:
            grid = grid_for_tokens(tokens) if tokens is not None else (4, 16, 16)
        elif tokens is not None and math.prod(grid) + num_text_tokens != tokens:
            raise ValueError(f"tokens={tokens} does not match grid={grid} + {num_text_tokens} text tokens")
        w = video_workload(tuple(grid), heads, head_dim, num_text_tokens, text_valid, dtype, seed, batch)
    elif kind == "text":
        w = text_workload(tokens or 1024, heads, head_dim, dtype, seed, batch)
    else:
        raise ValueError(f"workload={kind!r} is unknown; allowed: 'video', 'text'")
    return w.to(device)


def topk_pooled_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    sparsity: float,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain block-sparse selection: top-k key blocks per query block by pooled logits
    ``q̄_I·k̄_J/√d + log n_J`` (fully padded key blocks never chosen)."""
    qp, _ = pool_blocks(q, block_size)
    kp, counts = pool_blocks(k, block_size, key_padding_mask)  # counts [B, nkb]
    scores = qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1]) + counts.clamp_min(1).log()[:, None, None, :]
    valid = (counts > 0)[:, None, None, :]
    return select_topk_blocks(scores, keep_count(sparsity, kp.shape[2]), valid)


def _suffix_valid_length(key_padding_mask: torch.Tensor | None, n: int) -> int | None:
    """Number of leading valid keys when padding is one shared trailing run; None otherwise."""
    if key_padding_mask is None:
        return n
    valid = int(key_padding_mask[0].sum())
    expected = torch.zeros_like(key_padding_mask[0])
    expected[:valid] = True
    return valid if bool((key_padding_mask == expected).all()) else None


def _sdpa_fn(w: Workload) -> Callable[[], torch.Tensor]:
    mask = None if w.key_padding_mask is None else w.key_padding_mask[:, None, None, :]
    return lambda: F.scaled_dot_product_attention(w.q, w.k, w.v, attn_mask=mask)


def prepare_method(
    method: str, w: Workload, sparsity: float, block_size: int, backend: str | None
) -> tuple[Callable[[], torch.Tensor], Callable[[], object] | None, float, float] | None:
    """The timed call of ``method`` on ``w`` (selection included for ``block_sparse`` and
    ``rectified``; SparseD's pattern is fixed after its warm-up and reused, so its call is the
    attention alone), the selection alone (timed separately), the block density and the keys per
    query (extra keys counted); None when the method does not apply here (logged)."""
    n = w.k.shape[2]
    if method == "block_sparse":
        valid_len = _suffix_valid_length(w.key_padding_mask, n)
        if valid_len is None:
            logger.warning("block_sparse skipped: key padding is not one trailing run shared by the batch")
            return None
        k, v = w.k[:, :, :valid_len], w.v[:, :, :valid_len]  # padded keys dropped exactly

        def select():
            return topk_pooled_block_mask(w.q, k, sparsity, block_size)

        def fn():
            return block_sparse_attention(w.q, k, v, select(), block_size, backend=backend)

        mask = select()
        density = float(mask.float().mean())
        return fn, select, density, density * valid_len
    if method == "rectified":
        if importlib.util.find_spec("fastgen.attention.rectified") is None:
            logger.warning("rectified skipped: fastgen.attention.rectified is not available")
            return None
        from fastgen.attention.rectified import plan_rectified, rectified_attention
        from fastgen.configs import RectifiedSpaAttnConfig

        config = RectifiedSpaAttnConfig(sparsity=sparsity, block_size=block_size)
        args = dict(num_text_tokens=w.num_text_tokens, key_padding_mask=w.key_padding_mask, grid=w.grid)
        _, stats = rectified_attention(w.q, w.k, w.v, config, return_stats=True, backend=backend, **args)
        fn = lambda: rectified_attention(w.q, w.k, w.v, config, backend=backend, **args)  # noqa: E731
        select = lambda: plan_rectified(w.q, w.k, w.v, config, **args)  # noqa: E731
        return fn, select, float(stats["density"]), float(stats["keys_per_query"])
    if method == "sparsed":
        if importlib.util.find_spec("fastgen.attention.sparsed") is None:
            logger.warning("sparsed skipped: fastgen.attention.sparsed is not available")
            return None
        from fastgen.attention.sparsed import compute_sparsed_pattern, sparsed_attention

        def select():
            return compute_sparsed_pattern(
                w.q, w.k, select=1.0 - sparsity, block_size=block_size, key_padding_mask=w.key_padding_mask
            )

        pattern = select()
        fn = lambda: sparsed_attention(  # noqa: E731
            w.q,
            w.k,
            w.v,
            pattern.block_mask,
            block_size,
            key_padding_mask=w.key_padding_mask,
            backend=backend,
        )
        return fn, select, pattern.density, pattern.density * n
    raise ValueError(f"method={method!r} is unknown; allowed: {list(METHODS)}")


# ------------------------------------------------------------------------------------ running


def _prepared_cases(
    w: Workload, methods, sparsities, block_size: int, backend, reference, measure_memory: bool
):
    """Every (method, sparsity) call prepared, warmed up, checked against ``reference`` and (when asked) its
    peak memory measured; each a dict with empty ``times`` / ``select_times`` for the rounds."""
    cases = []
    for method in methods:
        for sparsity in sparsities:
            prepared = prepare_method(method, w, sparsity, block_size, backend)
            if prepared is None:
                continue
            fn, select, density, kpq = prepared
            out = fn()  # warm-up (compiles) and the output checked for error
            rel, cos = errors(out, reference)
            del out
            peak = peak_memory(fn, w.q.device) if measure_memory else None
            cases.append(
                dict(
                    method=method,
                    sparsity=sparsity,
                    fn=fn,
                    select=select,
                    density=density,
                    kpq=kpq,
                    rel=rel,
                    cos=cos,
                    peak=peak,
                    times=[],
                    select_times=[],
                )
            )
    return cases


def _row_of(c: dict, dense_times: list[float], n: int, dense_peak) -> dict:
    """The table row of a timed case: medians, speed-ups (median and best), ideal and errors."""
    median = statistics.median(c["times"])
    speedup = statistics.median(dense_times) / median
    logger.info("%s sparsity %.2f: %.2fx, rel L2 %.4f", c["method"], c["sparsity"], speedup, c["rel"])
    return {
        "method": c["method"],
        "sparsity": c["sparsity"],
        "density": c["density"],
        "keys_per_query": c["kpq"],
        "effective_density": c["kpq"] / n,
        "ideal": 1.0 / c["density"] if c["density"] > 0 else float("inf"),
        "speedup": speedup,
        "speedup_best": min(dense_times) / min(c["times"]),
        "fraction_of_ideal": speedup * c["density"],
        "time_s": median,
        "select_s": statistics.median(c["select_times"]),
        "rel_l2": c["rel"],
        "cosine": c["cos"],
        "peak_bytes": c["peak"],
        "dense_peak_bytes": dense_peak,
    }


def run_attention_bench(
    w: Workload,
    methods: tuple[str, ...] = ("block_sparse", "rectified"),
    sparsities: tuple[float, ...] = (0.8, 0.85, 0.9),
    block_size: int = 128,
    backend: str | None = None,
    repeats: int = 3,
    measure_memory: bool = True,
) -> dict:
    """Benchmark every method x sparsity on ``w`` against SDPA; returns ``{"config", "dense", "rows"}``.

    Wall clock, interleaved: each of ``repeats`` rounds times SDPA, then every (method, sparsity)
    call, then every selection alone, so all share the same load; ratios use the medians (and the
    best). Each row has ``method, sparsity, density, keys_per_query, effective_density, ideal,
    speedup (median), speedup_best, fraction_of_ideal, time_s (median), select_s (median),
    rel_l2, cosine, peak_bytes, dense_peak_bytes``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be >= 1")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method={m!r} is unknown; allowed: {list(METHODS)}")
    device = w.q.device
    dense_fn = _sdpa_fn(w)
    n = w.k.shape[2]
    with torch.no_grad():
        reference = dense_fn()  # warm-up and reference output
        dense_peak = peak_memory(dense_fn, device) if measure_memory else None
        cases = _prepared_cases(w, methods, sparsities, block_size, backend, reference, measure_memory)
        dense_times = []
        for _ in range(repeats):  # interleaved rounds
            dense_times.append(time_call(dense_fn, device))
            for case in cases:
                case["times"].append(time_call(case["fn"], device))
            for case in cases:
                case["select_times"].append(time_call(case["select"], device))
    rows = [_row_of(c, dense_times, n, dense_peak) for c in cases]
    dense_median = statistics.median(dense_times)
    return {
        "config": _config_of(w, block_size, backend, repeats),
        "dense": {"time_s": dense_median, "time_best_s": min(dense_times), "peak_bytes": dense_peak},
        "rows": rows,
    }


def _config_of(w: Workload, block_size: int, backend: str | None, repeats: int) -> dict:
    from fastgen.attention.backends import resolve_backend
    from fastgen.attention.gather import native_kernel_serves

    b, h, n, d = w.shape
    name = resolve_backend(backend, w.q.device, dtype=w.q.dtype, head_dim=d)
    if name == "gather":  # which engine the CPU fast path runs
        name += " (native kernel)" if native_kernel_serves(w.q) else " (PyTorch flash kernel on slabs)"
    return {
        "workload": w.kind,
        "batch": b,
        "heads": h,
        "tokens": n,
        "head_dim": d,
        "grid": list(w.grid) if w.grid else None,
        "num_text_tokens": w.num_text_tokens,
        "padded_keys": 0 if w.key_padding_mask is None else int((~w.key_padding_mask).sum()),
        "dtype": str(w.q.dtype).replace("torch.", ""),
        "device": str(w.q.device),
        "block_size": block_size,
        "backend": name,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "memory_measure": "cuda max_memory_allocated growth"
        if w.q.device.type == "cuda"
        else "process RSS growth over the call, sampled every 0.5 ms",
    }


def _load_average() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def random_block_mask(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random block mask with the same number of selected key blocks in every row as ``like``."""
    counts = like.sum(-1, keepdim=True)  # [B, H, nqb, 1]
    scores = torch.rand(like.shape, generator=generator)
    ranks = scores.argsort(-1).argsort(-1)
    return ranks < counts


def run_target(
    backend: str | None = None, repeats: int = 3, device: str = "cpu", measure_memory: bool = True
) -> dict:
    """The headline: block_sparse_attention at 15% block density, 12 heads x 14,080 tokens x 128,
    block 128, fp32, vs SDPA, for the structured workload's top-k mask and for a random mask of the
    same per-row counts. SDPA, structured and random calls alternate in every round so each ratio is
    measured under the same load; returns median and best ratios, fractions of ideal, error and
    peak memory."""
    device = torch.device(device)
    w = make_workload("video", TARGET_HEADS, TARGET_HEAD_DIM, grid=TARGET_GRID, device=device)
    block_size = 128
    nkb = -(-w.k.shape[2] // block_size)
    sparsity = 1.0 - TARGET_DENSITY
    masks = {"structured": topk_pooled_block_mask(w.q, w.k, sparsity, block_size)}
    masks["random"] = random_block_mask(masks["structured"].cpu(), torch.Generator().manual_seed(0)).to(
        device
    )
    density = float(masks["structured"].float().mean())
    dense_fn = _sdpa_fn(w)
    fns = {
        name: (lambda m=m: block_sparse_attention(w.q, w.k, w.v, m, block_size, backend=backend))
        for name, m in masks.items()
    }
    with torch.no_grad():
        reference = dense_fn()
        out = fns["structured"]()
        rel, cos = errors(out, reference)
        del out, reference
        for fn in fns.values():
            fn()  # warm-up
        dense_times, times = [], {name: [] for name in fns}
        for _ in range(repeats):
            dense_times.append(time_call(dense_fn, device))
            for name, fn in fns.items():
                times[name].append(time_call(fn, device))
        sparse_peak = peak_memory(fns["structured"], device) if measure_memory else None
        dense_peak = peak_memory(dense_fn, device) if measure_memory else None
    result = {
        "config": _config_of(w, block_size, backend, repeats),
        "kept_blocks_per_query_block": keep_count(sparsity, nkb),
        "density": density,
        "ideal": 1.0 / density,
        "dense_times_s": dense_times,
        "rel_l2": rel,
        "cosine": cos,
        "peak_bytes": sparse_peak,
        "dense_peak_bytes": dense_peak,
    }
    for name, samples in times.items():
        ratios = [d / s for d, s in zip(dense_times, samples)]
        result[name] = {
            "times_s": samples,
            "speedup_median": statistics.median(ratios),
            "speedup_best": min(dense_times) / min(samples),
            "fraction_of_ideal_median": statistics.median(ratios) * density,
            "fraction_of_ideal_best": min(dense_times) / min(samples) * density,
        }
    return result


# ------------------------------------------------------------------------------------ command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fastgen bench attention``."""
    p.add_argument("--target", action="store_true", help="measure the CPU headline (12x14080x128 fp32, 15%%)")
    p.add_argument("--workload", choices=["video", "text"], default="video", help="synthetic workload")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="methods to run")
    p.add_argument("--shape", default=None, help="B,H,N,D (overrides --heads/--tokens/--head-dim)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head (default 64)")
    p.add_argument("--tokens", type=int, default=None, help="sequence length (video: picks a grid)")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("F", "H", "W"), help="video grid")
    p.add_argument("--text-tokens", type=int, default=0, help="video: trailing text tokens")
    p.add_argument("--text-valid", type=int, default=None, help="video: real text tokens (rest padded)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.85, 0.9], help="fractions dropped")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (default 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="q/k/v dtype")
    p.add_argument("--backend", default=None, help="block-sparse backend: gather|flex|triton|torch|auto")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a speed-vs-error PNG here")


def _parse_shape(shape: str) -> tuple[int, int, int, int]:
    try:
        b, h, n, d = (int(x) for x in shape.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"shape={shape!r} is not allowed; expected B,H,N,D such as 1,12,14080,128") from None
    return b, h, n, d


def run(args: argparse.Namespace) -> int:
    """Run ``fastgen bench attention`` from parsed arguments; writes the table to stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.target:
        result = run_target(args.backend, args.repeats, args.device, not args.no_memory)
        text = format_target(result)
    else:
        batch, heads, tokens, head_dim = 1, args.heads, args.tokens, args.head_dim
        if args.shape:
            batch, heads, tokens, head_dim = _parse_shape(args.shape)
        w = make_workload(
            args.workload,
            heads,
            head_dim,
            tokens=tokens,
            grid=tuple(args.grid) if args.grid else None,
            num_text_tokens=args.text_tokens,
            text_valid=args.text_valid,
            batch=batch,
            dtype=DTYPES[args.dtype],
            device=args.device,
            seed=args.seed,
        )
        methods = tuple(args.methods or (["block_sparse", "rectified", "sparsed"]))
        if args.methods is None:
            methods = (
                ("block_sparse", "rectified") if args.workload == "video" else ("block_sparse", "sparsed")
            )
        result = run_attention_bench(
            w, methods, tuple(args.sparsity), args.block_size, args.backend, args.repeats, not args.no_memory
        )
        text = format_table(result)
        if args.plot_path:
            write_plot(result, args.plot_path)
    if args.json_path:
        write_json(result, args.json_path)
    # the table is this command's output, not a diagnostic
    sys.stdout.write(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastgen.bench.attention``: same options as ``fastgen bench attention``."""
    p = argparse.ArgumentParser(prog="fastgen bench attention", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
