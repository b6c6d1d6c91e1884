"""Loading Self-Forcing checkpoints (``self_forcing_dmd.pt``) into a diffusers ``WanTransformer3DModel``.

Self-Forcing (Huang et al., 2025) fine-tunes Wan2.1-T2V-1.3B without changing its architecture; its
checkpoints are a ``torch.save`` dict with ``generator`` and, once EMA has started, ``generator_ema``, each
a state dict whose names are the ORIGINAL Wan ones prefixed ``model.`` (EMA tensors in fp32). This module
strips the prefix and renames to diffusers' layout with the same table as diffusers' own Wan conversion
(``scripts/convert_wan_to_diffusers.py``): ``self_attn.{q,k,v,o}`` -> ``attn1.{to_q,to_k,to_v,to_out.0}``,
``cross_attn.*`` -> ``attn2.*`` (``norm_q`` / ``norm_k`` keep their names), the block norms ``norm3`` (the
cross-attention norm of the original) and ``norm2`` swap, ``ffn.0`` / ``ffn.2`` -> ``ffn.net.0.proj`` /
``ffn.net.2``, ``modulation`` -> ``scale_shift_table`` (blocks and head), ``head.head`` -> ``proj_out``,
``time_embedding.{0,2}`` -> ``condition_embedder.time_embedder.linear_{1,2}``, ``text_embedding.{0,2}`` ->
``condition_embedder.text_embedder.linear_{1,2}``, ``time_projection.1`` -> ``condition_embedder.time_proj``.
Every tensor maps one to one (825 for the 1.3B model); anything else is an error, never a silent skip.

Example:
    >>> from fastgen.pipelines import CausalWanPipeline, load_self_forcing_checkpoint
    >>> pipe = CausalWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    >>> load_self_forcing_checkpoint(pipe.transformer, "checkpoints/self_forcing_dmd.pt")  # EMA weights
"""

from __future__ import annotations

import logging
import os
import re

import torch

logger = logging.getLogger(__name__)

PREFIX = "model."
"""Prefix of every parameter name inside a Self-Forcing generator state dict."""

TOP_LEVEL_KEYS = ("generator_ema", "generator")
"""Top-level entries holding generator weights (EMA first)."""

_BLOCK = r"^blocks\.(\d+)\."
ORIGINAL_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (_BLOCK + r"modulation$", r"blocks.\1.scale_shift_table"),
    (_BLOCK + r"self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
    (_BLOCK + r"self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (_BLOCK + r"self_attn\.(norm_[qk])\.", r"blocks.\1.attn1.\2."),
    (_BLOCK + r"cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
    (_BLOCK + r"cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (_BLOCK + r"cross_attn\.(norm_[qk])\.", r"blocks.\1.attn2.\2."),
    (_BLOCK + r"norm3\.", r"blocks.\1.norm2."),
    (_BLOCK + r"norm2\.", r"blocks.\1.norm3."),
    (_BLOCK + r"ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (_BLOCK + r"ffn\.2\.", r"blocks.\1.ffn.net.2."),
)
"""Original Wan name pattern -> diffusers name; the first matching rule applies (names that match none,
e.g. ``patch_embedding.*``, are the same in both layouts)."""

_RULES = tuple((re.compile(pattern), repl) for pattern, repl in ORIGINAL_TO_DIFFUSERS)


def diffusers_name(original: str) -> str:
    """The diffusers ``WanTransformer3DModel`` name of an original Wan parameter name (without ``model.``)."""
    for pattern, repl in _RULES:
        if pattern.search(original):
            return pattern.sub(repl, original, count=1)
    return original


def _few(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"path={path!r} is not a file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
        logger.info("fastgen: %s cannot be memory-mapped (%s); reading it whole", path, err)
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"path={path!r} holds a {type(data).__name__}, not a Self-Forcing checkpoint dict")
    return data


def select_generator(checkpoint: dict, use_ema: bool = True, path: str = "checkpoint") -> tuple[str, dict]:
    """``(entry name, state dict)`` of the generator weights: ``generator_ema`` when ``use_ema`` and present,
    else ``generator`` (logged when EMA was asked for); ``ValueError`` when neither entry exists."""
    if use_ema and "generator_ema" in checkpoint:
        name = "generator_ema"
    elif "generator" in checkpoint:
        name = "generator"
        if use_ema:
            logger.warning("fastgen: %s has no generator_ema (EMA had not started); loading generator", path)
    else:
        raise ValueError(
            f"{path} has neither 'generator_ema' nor 'generator' at the top level (found: "
            f"{_few(map(str, checkpoint)) or 'nothing'}); allowed: a Self-Forcing checkpoint"
        )
    state = checkpoint[name]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: '{name}' is a {type(state).__name__}, not a state dict")
    return name, state


def convert_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """Original-layout generator state dict (``model.``-prefixed) -> diffusers names; ``ValueError`` for a
    name without the prefix or two names that land on the same diffusers name."""
    out: dict[str, torch.Tensor] = {}
    unprefixed = [k for k in state if not str(k).startswith(PREFIX)]
    if unprefixed:
        raise ValueError(f"unexpected keys without the '{PREFIX}' prefix: {_few(map(str, unprefixed))}")
    for key, tensor in state.items():
        name = diffusers_name(key[len(PREFIX) :])
        if name in out:
            raise ValueError(f"checkpoint keys map twice onto {name!r}")
        out[name] = tensor
    return out


def load_self_forcing_checkpoint(transformer, path: str | os.PathLike, use_ema: bool = True):
    """Load a Self-Forcing ``.pt`` into ``transformer`` (a diffusers ``WanTransformer3DModel`` of the matching
    config), in place; returns the transformer.

    ``use_ema`` picks ``generator_ema`` (falls back to ``generator`` with a warning when the file has no EMA).
    Tensors are cast to the dtype of the parameter they fill (diffusers keeps some modules in fp32).
    Raises ``ValueError`` for a non-Wan transformer, a file without either top-level key, missing or
    unexpected keys, or tensors whose shapes say the config does not match.

    Example:
        >>> import torch
        >>> from fastgen.pipelines import CausalWanPipeline, load_self_forcing_checkpoint
        >>> pipe = CausalWanPipeline.from_pretrained(
        ...     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16
        ... )
        >>> load_self_forcing_checkpoint(pipe.transformer, "checkpoints/self_forcing_dmd.pt")  # generator_ema
    """
    from diffusers import WanTransformer3DModel

    if not isinstance(transformer, WanTransformer3DModel):
        raise ValueError(
            f"transformer={type(transformer).__name__} is not supported; allowed: diffusers WanTransformer3DModel"
        )
    path = os.fspath(path)
    entry, state = select_generator(_read(path), use_ema=use_ema, path=path)
    converted = convert_state_dict(state)
    expected = transformer.state_dict()
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    hint = (
        f" (transformer config: num_layers={transformer.config.num_layers}, "
        f"heads={transformer.config.num_attention_heads} x {transformer.config.attention_head_dim}, "
        f"ffn_dim={transformer.config.ffn_dim}; is it the checkpoint's?)"
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys (diffusers names): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (diffusers names): {_few(unexpected)}")
        raise ValueError(f"{path} '{entry}' does not match the transformer: " + "; ".join(parts) + hint)
    wrong = [
        f"{name} {tuple(tensor.shape)} vs {tuple(expected[name].shape)}"
        for name, tensor in converted.items()
        if tuple(tensor.shape) != tuple(expected[name].shape)
    ]
    if wrong:
        raise ValueError(f"{path} '{entry}': tensor shapes differ, wrong config: {_few(wrong, 3)}{hint}")
    bad_dtype = [name for name, tensor in converted.items() if not tensor.is_floating_point()]
    if bad_dtype:
        raise ValueError(f"{path} '{entry}': non-floating tensors {_few(bad_dtype)}")
    transformer.load_state_dict(converted, strict=True)
    logger.info(
        "fastgen: loaded %d tensors of %s '%s' into %s",
        len(converted),
        path,
        entry,
        type(transformer).__name__,
    )
    return transformer


__all__ = [
    "ORIGINAL_TO_DIFFUSERS",
    "PREFIX",
    "TOP_LEVEL_KEYS",
    "convert_state_dict",
    "diffusers_name",
    "load_self_forcing_checkpoint",
    "select_generator",
]
