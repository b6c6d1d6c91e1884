"""The prepared GPU check: every Triton kernel against a plain-PyTorch reference at real shapes, then
timed against SDPA (and FlashAttention when installed) in the same run, into one JSON file.

``fastgen bench gpu --out gpu_check.json`` on a CUDA machine runs, in bf16 and fp16:

- ``block_sparse_attention_triton`` and ``rectified_exact_attention_triton`` (selected blocks +
  pooled keys + text keys) at the shapes of Wan 2.1 1.3B 480p (21 x 30 x 52 = 32,760 tokens,
  12 heads x 128), a HunyuanVideo 720p slice (33 x 45 x 80 = 118,800 tokens + 256 text keys, 4 of
  its 24 heads) and SparseD at 32k (LLaDA-8B: 32 heads x 128, 32,768 tokens), block 128, 20% of
  the key blocks kept per query block (the diagonal always);
- the reference is fp32 PyTorch written here from the kernels' documented semantics, computed on
  sampled query blocks (the first, the last, which may be partial, and random ones), so it never
  needs the ``N x N`` matrix; a case passes when the relative RMSE is under ``TOLERANCE``;
- timing: CUDA events, ``rounds`` interleaved rounds of (kernel, SDPA, FlashAttention), the
  median of each; speed is reported as a ratio to SDPA (dense) on the same inputs.

``--interpret`` runs a subset at tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (correctness
only, no timing); the default test suite runs it. ``scripts/gpu_check.sh`` wraps the CUDA run.

Example:
    >>> from fastgen.bench.gpu import run_gpu_check
    >>> report = run_gpu_check(interpret=True)
    >>> all(case["ok"] for case in report["cases"])
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from fastgen.bench._timing import cuda_event_ms

logger = logging.getLogger(__name__)

TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}
"""Largest relative RMSE (vs the fp32 reference) a case may have, per dtype."""


@dataclass(frozen=True)
class Shape:
    """One attention workload: ``[batch, heads, tokens, head_dim]`` plus text keys."""

    name: str
    batch: int
    heads: int
    tokens: int
    head_dim: int
    block_size: int = 128
    text_tokens: int = 0
    keep: float = 0.2


REAL_SHAPES = (
    Shape("wan2.1-1.3b-480p", 1, 12, 21 * 30 * 52, 128),
    Shape("hunyuanvideo-720p-slice", 1, 4, 33 * 45 * 80, 128, text_tokens=256),
    Shape("sparsed-llada-32k", 1, 32, 32768, 128),
)
"""The shapes of the CUDA run."""

TINY_SHAPES = (
    Shape("tiny-odd-length", 2, 2, 75, 16, block_size=16, text_tokens=5, keep=0.4),
    Shape("tiny-one-block", 1, 1, 13, 32, block_size=16, keep=1.0),
)
"""The shapes of the ``--interpret`` run (lengths not a block multiple, batch > 1, text keys)."""


def _selection(shape: Shape, device, generator: torch.Generator):
    """Per query block: ``keep`` of the key blocks (the diagonal always) as the selected table, and
    up to as many of the others as compensated (pooled) blocks."""
    b, h, nb = shape.batch, shape.heads, math.ceil(shape.tokens / shape.block_size)
    n_sel = max(1, min(nb, round(shape.keep * nb)))
    n_pool = min(nb - n_sel, n_sel)
    scores = torch.rand(b, h, nb, nb, generator=generator, device="cpu").to(device)
    diagonal = torch.arange(nb, device=device)
    scores[..., diagonal, diagonal] = 2.0  # the diagonal block is always selected
    order = scores.argsort(dim=-1, descending=True).to(torch.int32)
    selected = order[..., :n_sel].sort(dim=-1).values.contiguous()
    pooled = order[..., n_sel : n_sel + n_pool].sort(dim=-1).values.contiguous()
    full = lambda n: torch.full((b, h, nb), n, dtype=torch.int32, device=device)  # noqa: E731
    return selected, full(n_sel), pooled, full(n_pool)


def _inputs(shape: Shape, dtype: torch.dtype, device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim

    def randn(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    q, k, v = randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d)
    nb, bs = math.ceil(n / shape.block_size), shape.block_size
    pad = nb * bs - n
    sizes = torch.full((nb,), bs, dtype=torch.float32)
    sizes[-1] = bs - pad
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(b, h, nb, bs, d)
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(b, h, nb, bs, d)
    pooled_k = (kf.sum(3) / sizes.to(device)[:, None]).contiguous()  # [B, H, NKB, D]
    pooled_v = (vf.sum(3) / sizes.to(device)[:, None]).contiguous()
    log_counts = sizes.log().to(device).expand(b, nb).contiguous()
    text = None
    if shape.text_tokens:
        t = shape.text_tokens
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[0, t - max(1, t // 4) :] = False  # padded text keys in batch row 0
        text = (randn(b, h, t, d), randn(b, h, t, d), valid.to(device))
    return q, k, v, pooled_k, pooled_v, log_counts, text, generator


def _sample_blocks(shape: Shape, generator: torch.Generator, count: int = 4) -> list[int]:
    nb = math.ceil(shape.tokens / shape.block_size)
    picks = {0, nb - 1}
    while len(picks) < min(nb, count):
        picks.add(int(torch.randint(nb, (1,), generator=generator)))
    return sorted(picks)


def reference_rows(q, k, v, selected, counts, block: int, shape: Shape, extra=None) -> torch.Tensor:
    """fp32 attention output of query block ``block`` ``[B, H, rows, D]`` over its selected key
    blocks, plus (``extra``) pooled keys with logit bias ``log n_J`` and text keys (padding excluded)."""
    bs, n = shape.block_size, shape.tokens
    rows = slice(block * bs, min(n, (block + 1) * bs))
    qi = q[:, :, rows].float()
    scale = q.shape[-1] ** -0.5
    out = torch.empty(qi.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            chosen = selected[b, h, block, : counts[b, h, block]].long()
            token_ids = (chosen[:, None] * bs + torch.arange(bs, device=q.device)[None]).flatten()
            token_ids = token_ids[token_ids < n]
            keys, values = k[b, h, token_ids].float(), v[b, h, token_ids].float()
            logits = qi[b, h] @ keys.T * scale
            if extra is not None:
                pooled_k, pooled_v, pooled, pooled_counts, log_counts, text = extra
                js = pooled[b, h, block, : pooled_counts[b, h, block]].long()
                pooled_logits = qi[b, h] @ pooled_k[b, h, js].float().T * scale + log_counts[b, js][None]
                logits = torch.cat([logits, pooled_logits], -1)
                values = torch.cat([values, pooled_v[b, h, js].float()], 0)
                if text is not None:
                    tk, tv, valid = text
                    text_logits = qi[b, h] @ tk[b, h].float().T * scale
                    text_logits = text_logits.masked_fill(~valid[b][None], float("-inf"))
                    logits = torch.cat([logits, text_logits], -1)
                    values = torch.cat([values, tv[b, h].float()], 0)
            out[b, h] = torch.softmax(logits, -1) @ values
    return out


def _rel_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-30))


def _flash_attn():
    try:
        from flash_attn import flash_attn_func  # noqa: PLC0415
    except ImportError:
        return None
    return flash_attn_func


def check_shape(shape: Shape, dtype: torch.dtype, device, *, rounds: int, seed: int = 0) -> list[dict]:
    """Both kernels on one shape and dtype: error on sampled blocks and, on CUDA, interleaved timing."""
    from fastgen.kernels import block_sparse_attention_triton, rectified_exact_attention_triton

    q, k, v, pooled_k, pooled_v, log_counts, text, generator = _inputs(shape, dtype, device, seed)
    selected, counts, pooled, pooled_counts = _selection(shape, device, generator)
    text_kw = {}
    if text is not None:
        text_kw = {"text_k": text[0], "text_v": text[1], "text_valid": text[2]}
    runs = {
        "block_sparse_attention_triton": lambda: block_sparse_attention_triton(
            q, k, v, selected, counts, block_size=shape.block_size
        ),
        "rectified_exact_attention_triton": lambda: rectified_exact_attention_triton(
            q,
            k,
            v,
            selected,
            counts,
            pooled_k,
            pooled_v,
            pooled,
            pooled_counts,
            log_counts,
            block_size=shape.block_size,
            **text_kw,
        ),
    }
    blocks = _sample_blocks(shape, generator)
    results = []
    for kernel, run in runs.items():
        out, _ = run()
        extra = None
        if kernel.startswith("rectified"):
            extra = (pooled_k, pooled_v, pooled, pooled_counts, log_counts, text)
        errors = []
        for block in blocks:
            want = reference_rows(q, k, v, selected, counts, block, shape, extra)
            rows = slice(block * shape.block_size, min(shape.tokens, (block + 1) * shape.block_size))
            errors.append(_rel_rmse(out[:, :, rows], want))
        dtype_name = str(dtype).removeprefix("torch.")
        row = {
            "kernel": kernel,
            "shape": asdict(shape),
            "dtype": dtype_name,
            "checked_query_blocks": blocks,
            "rel_rmse": max(errors),
            "tolerance": TOLERANCE[dtype_name],
            "ok": bool(max(errors) <= TOLERANCE[dtype_name] and torch.isfinite(out).all()),
            "density": float(counts.float().mean() / math.ceil(shape.tokens / shape.block_size)),
        }
        results.append(row)
    if device.type == "cuda" and rounds > 0:
        flash = _flash_attn()
        contenders = dict(runs)
        contenders["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if flash is not None:
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            contenders["flash_attn"] = lambda: flash(qt, kt, vt)
        for fn in contenders.values():  # warm-up (compile, autotune) outside the timing
            fn()
        torch.cuda.synchronize()
        times = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                times[name].extend(cuda_event_ms(fn, 1))
        medians = {name: statistics.median(t) for name, t in times.items()}
        for row in results:
            row["ms"] = medians[row["kernel"]]
            row["sdpa_ms"] = medians["sdpa"]
            row["speedup_vs_sdpa"] = medians["sdpa"] / medians[row["kernel"]]
            row["flash_attn_ms"] = medians.get("flash_attn")
            row["rounds"] = rounds
    return results


def run_gpu_check(
    *, interpret: bool = False, rounds: int = 10, shapes=None, dtypes=("bfloat16", "float16")
) -> dict:
    """Run the check (CUDA, or ``interpret`` on the CPU at tiny shapes) and return the report dict."""
    from fastgen.kernels.block_sparse_attn import _is_interpreted

    if interpret:
        if not _is_interpreted():
            raise ValueError(
                "interpret=True needs TRITON_INTERPRET=1 set before triton is first imported "
                "(`fastgen bench gpu --interpret` sets it)"
            )
        device = torch.device("cpu")
        shapes = TINY_SHAPES if shapes is None else shapes
        rounds = 0
    else:
        if not torch.cuda.is_available():
            raise ValueError("the GPU check needs CUDA; pass interpret=True (--interpret) on a CPU machine")
        device = torch.device("cuda")
        shapes = REAL_SHAPES if shapes is None else shapes
    started = time.perf_counter()
    cases = []
    for shape in shapes:
        for dtype_name in dtypes:
            if dtype_name not in TOLERANCE:
                raise ValueError(f"dtype={dtype_name!r} is not allowed; allowed: {', '.join(TOLERANCE)}")
            rows = check_shape(shape, getattr(torch, dtype_name), device, rounds=rounds)
            for row in rows:
                logger.info(
                    "%s %s %s: rel RMSE %.2e (tolerance %.0e) %s%s",
                    row["kernel"],
                    shape.name,
                    dtype_name,
                    row["rel_rmse"],
                    row["tolerance"],
                    "ok" if row["ok"] else "FAILED",
                    f", {row['speedup_vs_sdpa']:.2f}x SDPA" if "speedup_vs_sdpa" in row else "",
                )
            cases.extend(rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "mode": "interpret" if interpret else "cuda",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "flash_attn": _flash_attn() is not None,
        "seconds": time.perf_counter() - started,
        "all_ok": all(case["ok"] for case in cases),
        "cases": cases,
    }


def _triton_version() -> str | None:
    try:
        import triton  # noqa: PLC0415
    except ImportError:
        return None
    return triton.__version__


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``fastgen bench gpu``."""
    p.add_argument("--out", default="gpu_check.json", help="JSON report path (default gpu_check.json)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (default 10)")
    p.add_argument(
        "--interpret",
        action="store_true",
        help="CPU: tiny shapes under TRITON_INTERPRET=1, correctness only (what the test suite runs)",
    )


def main(argv: list[str] | None = None) -> int:
    """``fastgen bench gpu`` / ``python -m fastgen.bench.gpu``: write the JSON, exit 1 if a case failed."""
    parser = argparse.ArgumentParser(prog="fastgen bench gpu", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} is not allowed; it must be >= 1")
    if args.interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.setLevel(logging.INFO)  # progress lines also under `fastgen bench gpu` (root at WARNING)
    try:
        report = run_gpu_check(interpret=args.interpret, rounds=args.rounds)
    except ValueError as err:
        parser.exit(2, f"fastgen bench gpu: error: {err}\n")
    from fastgen.io import atomic_path

    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    failed = [c for c in report["cases"] if not c["ok"]]
    logger.info(
        "wrote %s: %d cases, %d failed, %.0f s",
        args.out,
        len(report["cases"]),
        len(failed),
        report["seconds"],
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
