"""Text generation for the CLI and the demo: load a diffusion-LM pipeline (preset or checkpoint), run it
dense, with SparseD, with Window-Diffusion or with both, time it, and compare with dense.

``fastgen generate --preset tiny-llada --method sparsed --prompt "..." --compare-dense --out out.txt``
lands in :func:`fastgen.cli.generate.generate_text_from_args`, which uses the functions here.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from fastgen.kernels.cpu_attn import warm_up_cpu_kernel

from .diffusion_lm import DiffusionLMPipeline

logger = logging.getLogger(__name__)

WINDOW_METHODS = ("window_diffusion", "sparsed+window_diffusion")
"""Methods that run Window-Diffusion (driven by the pipeline through ``acceleration=[...]``)."""

METHODS = ("sparsed", "dense", *WINDOW_METHODS)
"""Methods the text runner offers."""

DEFAULT_PRESET = "tiny-llada"
"""Preset used when neither a preset nor a model is named."""

SHORT_CONTEXT = 2048
"""Sequences up to this many tokens get SparseD blocks of 32 by default (128 beyond)."""


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    allowed = ("float32", "bfloat16", "float16")
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(allowed)}")
    return getattr(torch, dtype)


def load_text_pipeline(
    preset: str | None = None,
    model: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> DiffusionLMPipeline:
    """A ready :class:`DiffusionLMPipeline` from a text preset (default ``tiny-llada``) or a checkpoint."""
    if preset is not None and model is not None:
        raise ValueError(f"pass preset={preset!r} or model={model!r}, not both")
    dtype = _dtype(dtype)
    if model is not None:
        from .lm_loaders import load_diffusion_lm

        lm, tokenizer, mask_token_id = load_diffusion_lm(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        return DiffusionLMPipeline(lm, tokenizer=tokenizer, mask_token_id=mask_token_id)
    from .presets import get_preset, load_preset

    preset = preset or DEFAULT_PRESET
    if get_preset(preset).kind != "text":
        raise ValueError(f"preset={preset!r} makes video; text presets: tiny-llada-kv, tiny-llada")
    return load_preset(preset, device=device, dtype=dtype)


def default_sparsed_config(sequence_length: int, **fields):
    """``SparseDConfig`` with block 32 for short sequences (``<= SHORT_CONTEXT``), the class default beyond;
    ``fields`` set to ``None`` are left at their defaults."""
    from fastgen.configs import SparseDConfig

    fields = {k: v for k, v in fields.items() if v is not None}
    if "block_size" not in fields and sequence_length <= SHORT_CONTEXT:
        fields["block_size"] = 32
    return SparseDConfig(**fields)


def default_window_configs(pipe: DiffusionLMPipeline, method: str, sequence_length: int, config=None) -> list:
    """The ``acceleration`` list of a Window-Diffusion method: ``config`` (a ``WindowDiffusionConfig``, a
    list of configs, or ``None`` for the model family's defaults), plus a default ``SparseDConfig`` for
    ``"sparsed+window_diffusion"`` when the list has none."""
    from fastgen.configs import SparseDConfig, WindowDiffusionConfig

    from .lm_family import model_family

    configs = list(config) if isinstance(config, (list, tuple)) else ([] if config is None else [config])
    family = model_family(pipe.model)
    window = next((c for c in configs if isinstance(c, WindowDiffusionConfig)), None)
    others = [c for c in configs if not isinstance(c, WindowDiffusionConfig)]
    window = (window or WindowDiffusionConfig()).resolved(family)
    if method == "sparsed+window_diffusion" and not any(isinstance(c, SparseDConfig) for c in others):
        others.append(default_sparsed_config(sequence_length))
    return [window, *others]


def _window_stats(out) -> dict:
    """Summary of a Window-Diffusion run: refresh / pruned steps, mean rows run and keys per step, and the
    per-step trace (active and window positions of batch row 0) for pictures."""
    trace = out.window_trace or []
    if not trace:
        return {}
    return {
        "refresh_steps": sum(1 for t in trace if t["refresh"]),
        "pruned_steps": sum(1 for t in trace if not t["refresh"]),
        "mean_queries": sum(t["queries"] for t in trace) / len(trace),
        "mean_keys": sum(t["keys"] for t in trace) / len(trace),
        "positions": int(out.sequences.shape[1]),
        "prompt_length": int(out.prompt_length),
        "trace": trace,
    }


def _sparse_stats(model) -> dict:
    """SparseD's statistics through ``fastgen.attention_stats`` (read while recording is on, see
    :func:`generate_text`): mean ``density`` and the per-layer rows (``block_mask`` of batch row 0 kept as
    a CPU bool tensor, for pictures of what the sparse attention kept)."""
    import fastgen

    layers = [dict(row) for row in fastgen.attention_stats(model) if row.get("method") == "sparsed"]
    densities = [row["density"] for row in layers if "density" in row]
    summary = {"density": sum(densities) / len(densities)} if densities else {}
    return {**summary, "layers": layers} if layers else {}


def text_defaults(
    pipe,
    *,
    steps: int | None = None,
    gen_length: int | None = None,
    block_length: int | None = None,
    temperature: float | None = None,
    cfg_scale: float | None = None,
) -> dict:
    """Generation settings: the given ones, else the pipeline's ``fastgen_defaults`` (a trained preset's
    model card), else 128 tokens in blocks of 32, one token per step, greedy, no guidance."""
    own = getattr(pipe, "fastgen_defaults", {}) or {}

    def pick(name, value, fallback):
        return value if value is not None else own.get(name, fallback)

    gen_length = pick("gen_length", gen_length, 128)
    block_length = pick("block_length", block_length, min(32, gen_length))
    return dict(
        gen_length=gen_length,
        steps=pick("steps", steps, gen_length),
        block_length=block_length,
        temperature=pick("temperature", temperature, 0.0),
        cfg_scale=pick("cfg_scale", cfg_scale, 0.0),
    )


def generate_text(
    pipe: DiffusionLMPipeline,
    *,
    prompt: str,
    seed: int = 0,
    steps: int | None = None,
    gen_length: int | None = None,
    block_length: int | None = None,
    temperature: float | None = None,
    cfg_scale: float | None = None,
    method: str = "sparsed",
    config=None,
    progress: bool = True,
) -> dict:
    """Generate for one prompt and time it.

    Returns a dict: ``text``, ``tokens`` (generated ids), ``seconds``, ``tokens_per_s``, ``stats`` (the
    sparse method's statistics; ``{}`` for dense), ``method`` (what actually ran) and ``config`` (the
    generation settings and the method config as a dict).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed for text; allowed: {', '.join(METHODS)}")
    windowed = method in WINDOW_METHODS
    settings = text_defaults(
        pipe,
        steps=steps,
        gen_length=gen_length,
        block_length=block_length,
        temperature=temperature,
        cfg_scale=cfg_scale,
    )
    gen_length = settings["gen_length"]
    if windowed and block_length is None:  # Window-Diffusion has no blocks in its reference: one block
        settings["block_length"] = gen_length
    if method == "sparsed" and config is None:
        prompt_tokens = len(pipe.tokenizer(prompt)["input_ids"]) if pipe.tokenizer is not None else 0
        config = default_sparsed_config(prompt_tokens + gen_length)
    acceleration = None
    if windowed:
        prompt_tokens = len(pipe.tokenizer(prompt)["input_ids"]) if pipe.tokenizer is not None else 0
        acceleration = default_window_configs(pipe, method, prompt_tokens + gen_length, config)
        if method == "sparsed+window_diffusion" and pipe.device.type == "cpu":
            warm_up_cpu_kernel()
    import fastgen

    model = pipe.model
    sparse = method in ("sparsed", "sparsed+window_diffusion")
    applied_here = sparse and getattr(model, "_fastgen_adapter", None) is None
    # SparseD is applied here (not by the pipeline) so its statistics can be read after the run
    sparse_configs = [config] if method == "sparsed" else (acceleration[1:] if windowed else [])
    if method == "sparsed" and pipe.device.type == "cpu":  # a first kernel build is not timed
        warm_up_cpu_kernel()
    try:
        if applied_here:
            for sparse_config in sparse_configs:
                fastgen.apply_sparse_attention(model, sparse_config)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        extra = {}
        if acceleration is not None:
            extra["acceleration"] = acceleration[:1] if applied_here else acceleration
        # statistics are opt-in: record for this call (masks: the demo draws them); SparseD's rows are
        # read inside the block, they follow the level of the moment they are read
        record = fastgen.recording_attention_stats(model, "masks") if sparse else contextlib.nullcontext()
        with record:
            start = time.perf_counter()
            out = pipe(prompt=prompt, generator=seed, progress=progress, **settings, **extra)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            seconds = time.perf_counter() - start
            sparse_stats = _sparse_stats(model) if sparse else {}
        stats = {**(_window_stats(out) if windowed else {}), **sparse_stats}
    finally:
        if applied_here:
            fastgen.remove_sparse_attention(model)
    tokens = out.sequences[0, out.prompt_length :].tolist()
    return {
        "text": out.texts[0] if out.texts else "",
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": len(tokens) / seconds if seconds > 0 else float("inf"),
        "stats": stats,
        "method": method,
        "config": {
            **settings,
            "seed": seed,
            "steps_run": out.steps_run,
            "method": (
                acceleration[0].to_dict()
                if windowed
                else config.to_dict()
                if method == "sparsed"
                else {"method": "dense"}
            ),
            **({"acceleration": [c.to_dict() for c in acceleration]} if windowed else {}),
        },
    }


__all__ = [
    "METHODS",
    "WINDOW_METHODS",
    "default_window_configs",
    "default_sparsed_config",
    "generate_text",
    "load_text_pipeline",
    "text_defaults",
]
