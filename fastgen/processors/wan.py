"""Rectified SpaAttn for diffusers' ``WanTransformer3DModel`` (Wan 2.1 / 2.2, T2V and I2V).

Self-attention (``attn1`` of every block) runs ``rectified_sparse_attention`` over the video tokens
with their latent grid ``(frames/p_t, height/p_h, width/p_w)``; cross-attention (``attn2``) and the
I2V image-context attention stay on diffusers' ``dispatch_attention_fn``, so
``transformer.set_attention_backend(...)`` keeps applying there. The processor is our own class
(no diffusers class is patched); it reproduces ``WanAttnProcessor``'s projections, QK-norm and RoPE.

Example:
    >>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention, remove_sparse_attention
    >>> apply_sparse_attention(pipe.transformer, RectifiedSpaAttnConfig(sparsity=0.8))
    >>> fastgen.record_attention_stats(pipe.transformer, "summary")  # statistics are opt-in
    >>> video = pipe(prompt="a corgi running on a beach", num_inference_steps=40).frames[0]
    >>> fastgen.processors.wan.stats(pipe.transformer)[3]["density"]
    >>> remove_sparse_attention(pipe.transformer)  # original processors back, output identical

Set by hand (one instance on every attention layer; see ``fastgen.processors.rectified_base`` for how the
layer index and the step are found then):
    >>> transformer.set_attn_processor(WanRectifiedProcessor(RectifiedSpaAttnConfig()))
"""

from __future__ import annotations

import logging

import torch

from fastgen.configs import RectifiedSpaAttnConfig

from ._install import Support, is_wan
from .rectified_base import (
    RectifiedProcessorBase,
    check_config,
    collect_stats,
    grid_from_rope_table,
    install_processors,
    restore_processors,
)

logger = logging.getLogger(__name__)

WAN_TEXT_CONTEXT = 512
"""Text tokens of Wan's encoder context; I2V image tokens come before them (as in diffusers)."""

_STATE_ATTR = "_fastgen_wan_rectified"


def projections(attn, hidden_states: torch.Tensor, context: torch.Tensor | None):
    """``(query, key, value)`` ``[B, N, H*D]`` of a Wan attention module as diffusers computes them (fused
    or separate projections; keys/values from ``context`` for cross-attention)."""
    source = hidden_states if context is None else context
    if getattr(attn, "fused_projections", False):
        if context is None and hasattr(attn, "to_qkv"):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        if context is not None and hasattr(attn, "to_kv"):
            key, value = attn.to_kv(source).chunk(2, dim=-1)
            return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)


def _image_projections(attn, image_context: torch.Tensor):
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_kv"):
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


def _rotation(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE table ``[..., D]`` (cos, sin repeated per pair) as complex rotations ``[..., D/2]``."""
    return torch.complex(freqs_cos[..., 0::2].float(), freqs_sin[..., 1::2].float())


def apply_wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE on ``[B, N, H, D]``: the pair ``(x1, x2)`` becomes
    ``(x1 cos - x2 sin, x1 sin + x2 cos)``, as in diffusers, computed as one complex product
    (about 4x faster on the CPU than the four real products and strided writes; fp32 math)."""
    rotation = _rotation(freqs_cos, freqs_sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


_CHUNK_BYTES = 2 << 20  # tokens normalised and rotated at a time by norm_rope (stays in cache)


def norm_rope(
    norm: torch.nn.Module, x: torch.Tensor, heads: int, rotary: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """``apply_wan_rotary(norm(x).unflatten(2, (heads, -1)), *rotary)`` for a projection output ``x``
    ``[B, N, H*D]`` that the caller owns; ``[B, N, H, D]``.

    For fp32 with a ``torch.nn.RMSNorm`` (Wan's QK-norm) or no norm, and no gradient needed, it runs
    in place on ``x``, a cache-sized run of tokens at a time, with the same operations as
    ``torch.nn.RMSNorm`` and :func:`apply_wan_rotary`: no new tensor of x's size is allocated (on
    the CPU every fresh one costs more in page faults than the arithmetic) and x is read from memory
    once instead of about six times. Otherwise the plain composition."""
    rms = type(norm) is torch.nn.RMSNorm and tuple(norm.normalized_shape) == (x.shape[-1],)
    in_place = (
        (rms or isinstance(norm, torch.nn.Identity))
        and x.dtype == torch.float32
        and x.stride(-1) == 1
        and not (
            torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in norm.parameters()))
        )
        and (rotary is None or rotary[0].shape[-1] * heads == x.shape[-1])
    )
    if not in_place:
        out = norm(x).unflatten(2, (heads, -1))
        return out if rotary is None else apply_wan_rotary(out, *rotary)
    b, n, c = x.shape
    rotation = None
    if rotary is not None:
        rotation = _rotation(*rotary)  # [1, N, 1, D/2]
    eps = (norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps) if rms else 0.0
    weight = norm.weight if rms else None
    step = max(1, _CHUNK_BYTES // (b * c * x.element_size()))
    for start in range(0, n, step):
        chunk = x[:, start : start + step]
        if rms:
            chunk.mul_(torch.rsqrt(chunk.pow(2).mean(-1, keepdim=True).add_(eps)))
            if weight is not None:
                chunk.mul_(weight)
        if rotation is not None:
            pairs = torch.view_as_complex(chunk.unflatten(-1, (heads, -1, 2)))
            pairs.mul_(rotation[:, start : start + step])
    return x.unflatten(2, (heads, -1))


def grid_from_rotary(freqs_cos: torch.Tensor, head_dim: int) -> tuple[int, int, int] | None:
    """Recover the ``(frames, height, width)`` token grid from Wan's RoPE table ``[1, N, 1, D]`` (None if unclear)."""
    if freqs_cos.ndim != 4 or freqs_cos.shape[-1] != head_dim:
        return None
    return grid_from_rope_table(freqs_cos[0, :, 0, :])


class WanRectifiedProcessor(RectifiedProcessorBase):
    """Attention processor for ``WanAttention``: rectified sparse self-attention, dense cross-attention."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same contract as diffusers' ``WanAttnProcessor.__call__``."""
        image_context = None
        if attn.add_k_proj is not None and encoder_hidden_states is not None:
            image_len = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT
            image_context = encoder_hidden_states[:, :image_len]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]

        query, key, value = projections(attn, hidden_states, encoder_hidden_states)
        query = norm_rope(attn.norm_q, query, attn.heads, rotary_emb)
        key = norm_rope(attn.norm_k, key, attn.heads, rotary_emb)
        value = value.unflatten(2, (attn.heads, -1))

        image_out = None
        if image_context is not None:
            key_img, value_img = _image_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            image_out = self.dense(query, key_img, value_img).flatten(2, 3).type_as(query)

        if encoder_hidden_states is None and attention_mask is None:
            out = self._self_attention(attn, query, key, value, rotary_emb)
        else:
            if encoder_hidden_states is None:  # self-attention with a mask: not a case the sparse path serves
                self.fallback(
                    "self-attention was given an attention_mask (the sparse path serves unmasked calls)"
                )
            parallel = self._parallel_config if encoder_hidden_states is None else None
            out = self.dense(query, key, value, attention_mask, parallel)
        out = out.flatten(2, 3).type_as(query)
        if image_out is not None:
            out = out + image_out
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _self_attention(self, attn, query, key, value, rotary_emb) -> torch.Tensor:
        layer = self._layer_index(attn)
        step, grid = self._step_and_grid(layer)
        if self._parallel_config is not None:  # [context parallel] token shares: see context_parallel.py
            from .context_parallel import wan_self_attention

            return wan_self_attention(self, layer, step, grid, query, key, value)
        n_tokens, head_dim = query.shape[1], query.shape[-1]
        reason = self.sparse_reason(layer, step, n_tokens, head_dim)
        if reason is not None:
            self.fallback(reason)
            return self.dense(query, key, value, None, self._parallel_config)
        if grid is None and rotary_emb is not None:
            grid = grid_from_rotary(rotary_emb[0], head_dim)
        if grid is not None and grid[0] * grid[1] * grid[2] != n_tokens:
            grid = None
        return self.sparse(layer, query, key, value, grid=grid)


# ---------------------------------------------------------------------------------- adapter API


def supports(model, config) -> Support:
    """Truthy for a diffusers ``WanTransformer3DModel`` with a :class:`RectifiedSpaAttnConfig`."""
    return Support(isinstance(config, RectifiedSpaAttnConfig) and is_wan(model))


def supports_pipeline(pipe, config) -> Support:
    """Falsy, with the reason, for a :class:`RectifiedSpaAttnConfig` on fastgen's causal Wan pipeline
    (it generates chunk by chunk with its own causal processors, which would replace these)."""
    if isinstance(config, RectifiedSpaAttnConfig) and getattr(pipe, "fastgen_causal", False):
        return Support(
            False,
            f"{type(pipe).__name__} generates chunk by chunk over a KV cache with its own causal attention, "
            "which Rectified SpaAttn (a bidirectional-attention method) cannot run in; allowed there: "
            "LightForcingConfig",
        )
    return Support(True)


def apply(model, config: RectifiedSpaAttnConfig) -> None:
    """Install one :class:`WanRectifiedProcessor` per block's ``attn1`` (layer = block index).

    The original processors are saved on the model instance so :func:`remove` restores them
    exactly; a step tracker is attached unless the model already has one (``apply_to_pipeline``).
    """
    config = check_config(config)
    if not is_wan(model):
        raise ValueError(f"model={type(model).__name__} is not a WanTransformer3DModel")
    install_processors(
        model,
        _STATE_ATTR,
        lambda tracker: {
            f"blocks.{i}.attn1.processor": WanRectifiedProcessor(config, layer=i, tracker=tracker)
            for i in range(len(model.blocks))
        },
    )


def remove(model) -> None:
    """Restore the processors saved by :func:`apply` (exactly those objects) and detach the tracker."""
    restore_processors(model, _STATE_ATTR)


def stats(model) -> list[dict]:
    """Per-layer statistics of the last sparse call: ``layer``, ``density``, ``compensated_fraction``,
    ``block_mask`` (batch 0, CPU bool ``[H, nqb, nkb]``). Dense-only layers are absent."""
    return collect_stats(model)


__all__ = [
    "WanRectifiedProcessor",
    "apply",
    "apply_wan_rotary",
    "grid_from_rotary",
    "norm_rope",
    "remove",
    "stats",
    "supports",
]
