"""The random-weight diffusion LMs of the Window-Diffusion and long-answer benches: tiny models shaped like
LLaDA (Llama, MHA) and Dream (Qwen2, GQA, logit shift), or the published LLaDA-8B / Dream-7B shapes
(``scale="real"``), and the cost of a pruned forward against a full one. Importable from
``fastgen.bench.window`` as before."""

from __future__ import annotations

import functools
import statistics

import torch

from fastgen.bench._timing import time_per_call

SHAPES = {
    "llada": {"hidden": 512, "heads": 4, "kv_heads": 4, "head_dim": 128, "layers": 4, "mlp": 1536},
    "dream": {"hidden": 512, "heads": 4, "kv_heads": 2, "head_dim": 128, "layers": 4, "mlp": 1536},
}
"""Tiny model shapes: LLaDA-like (MHA) and Dream-like (GQA, attention biases, logit shift)."""

VOCAB = 256

REAL_SHAPES = {
    "llada": {
        "hidden": 4096, "heads": 32, "kv_heads": 32, "head_dim": 128, "layers": 32, "mlp": 12288,
        "vocab": 126464, "mask_token_id": 126336, "rope_theta": 500000.0,
    },
    "dream": {
        "hidden": 3584, "heads": 28, "kv_heads": 4, "head_dim": 128, "layers": 28, "mlp": 18944,
        "vocab": 152064, "mask_token_id": 151666, "rope_theta": 1000000.0,
    },
}  # fmt: skip
"""``--scale real``: the published LLaDA-8B and Dream-7B (Qwen2.5-7B) shapes, vocabularies and mask ids,
with random weights (a GPU measurement: 16 / 15 GB in bf16; no checkpoint is read)."""


def build_model(family: str, max_positions: int, device=None, dtype=None, seed: int = 0, scale: str = "tiny"):
    """A tiny ``LlamaForCausalLM`` (``"llada"``) or ``Qwen2ForCausalLM`` (``"dream"``) pipeline, mask = last id;
    ``scale="real"``: the published model's shape (:data:`REAL_SHAPES`), random weights made on ``device``."""
    from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if scale == "real":
        return _build_real(family, max_positions, device, dtype, seed)
    if scale != "tiny":
        raise ValueError(f"scale={scale!r}: allowed 'tiny' or 'real'")
    shape = SHAPES[family]
    if family == "llada":
        from fastgen.pipelines.tiny_lm import build_tiny_llama

        model = build_tiny_llama(
            VOCAB,
            hidden=shape["hidden"],
            heads=shape["heads"],
            head_dim=shape["head_dim"],
            layers=shape["layers"],
            intermediate=shape["mlp"],
            max_positions=max_positions,
            seed=seed,
        )
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**_config_fields(shape, VOCAB, max_positions), initializer_range=0.1)
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config).eval()
    model.config.fastgen_family = family
    model.config.fastgen_mask_token_id = VOCAB - 1
    return DiffusionLMPipeline(model.to(device=device, dtype=dtype), mask_token_id=VOCAB - 1)


def _config_fields(shape: dict, vocab: int, max_positions: int) -> dict:
    """The transformers config fields of a bench shape (shared by the Llama and Qwen2 configs)."""
    return dict(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max_positions,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def _build_real(family: str, max_positions: int, device, dtype, seed: int):
    """The published shape of ``family`` with random weights, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, Qwen2Config

    from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline

    if family not in REAL_SHAPES:
        raise ValueError(f"family={family!r}: allowed {', '.join(REAL_SHAPES)}")
    shape = REAL_SHAPES[family]
    common = _config_fields(shape, shape["vocab"], max_positions)
    common["rope_parameters"] = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    if family == "llada":
        from transformers import LlamaForCausalLM as cls

        config = LlamaConfig(head_dim=shape["head_dim"], **common)
    else:
        from transformers import Qwen2ForCausalLM as cls

        config = Qwen2Config(**common)
    config._attn_implementation = "sdpa"
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=fork_devices), torch.device(device):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype).eval()
    model.config.fastgen_family = family
    model.config.fastgen_mask_token_id = shape["mask_token_id"]
    return DiffusionLMPipeline(model, mask_token_id=shape["mask_token_id"])


def _forward_cost_ratio(model, total: int, rows: int, rounds: int = 3) -> float:
    """Wall time of a plain forward over ``total`` tokens over one over ``rows`` tokens (interleaved,
    median of ``rounds``): what a pruned step of ``rows`` rows can cost at best relative to a dense step
    on this machine (small matrix products stream the same weights for fewer rows)."""
    from fastgen.pipelines.diffusion_lm import bidirectional_mask

    times = {total: [], rows: []}
    with torch.no_grad():
        for _ in range(rounds):
            for n in (total, rows):
                ids = torch.zeros(1, n, dtype=torch.long, device=model.device)
                positions = torch.arange(n, device=model.device)[None]
                mask = bidirectional_mask(
                    torch.ones(1, n, dtype=torch.bool, device=model.device), model.dtype
                )
                calls = 1 if n == total else max(1, min(20, total // max(rows, 1)))
                forward = functools.partial(
                    model, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
                )
                times[n].append(time_per_call(forward, calls, model.device))
    return statistics.median(times[total]) / statistics.median(times[rows])


__all__ = ["REAL_SHAPES", "SHAPES", "VOCAB", "build_model"]
