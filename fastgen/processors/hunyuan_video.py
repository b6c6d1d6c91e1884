"""Rectified SpaAttn for diffusers' ``HunyuanVideoTransformer3DModel``.

Double-stream blocks project video and text separately and attend jointly over ``[video; text]``;
single-stream blocks attend over the same concatenation. The text is appended after the video and
padded: diffusers passes a bool ``attention_mask`` ``[B, 1, 1, N]`` (True = real token) that we turn
into the ``key_padding_mask`` of ``rectified_sparse_attention`` together with ``num_text_tokens``.
The token refiner (``context_embedder``) keeps its own dense processor.

Example:
    >>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention
    >>> apply_sparse_attention(pipe.transformer, RectifiedSpaAttnConfig(sparsity=0.8, dense_layers=2))
    >>> video = pipe(prompt="a koi pond in the rain", num_inference_steps=50).frames[0]

Layer index: double-stream block ``i`` is layer ``i``; single-stream block ``j`` is layer
``num_layers + j``. Set by hand, ``transformer.set_attn_processor(HunyuanVideoRectifiedProcessor())``
also lands on the token refiner, whose calls (no text stream) are served by diffusers'
``AttnProcessor2_0`` unchanged.
"""

from __future__ import annotations

import logging

import torch

from fastgen.configs import RectifiedSpaAttnConfig

from .rectified_base import (
    RectifiedProcessorBase,
    check_config,
    collect_stats,
    grid_from_rope_table,
    install_processors,
    key_padding_from_attention_mask,
    restore_processors,
)

logger = logging.getLogger(__name__)

_STATE_ATTR = "_fastgen_hunyuan_rectified"


class HunyuanVideoRectifiedProcessor(RectifiedProcessorBase):
    """Attention processor for HunyuanVideo's joint video+text attention (double and single stream)."""

    def __init__(self, config=None, *, layer=None, tracker=None) -> None:
        super().__init__(config, layer=layer, tracker=tracker)
        self._plain = None  # diffusers' AttnProcessor2_0 for calls without a text stream (token refiner)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Same contract as diffusers' ``HunyuanVideoAttnProcessor2_0.__call__``."""
        if encoder_hidden_states is None:
            if self._plain is None:
                from diffusers.models.attention_processor import AttnProcessor2_0

                self._plain = AttnProcessor2_0()
            return self._plain(attn, hidden_states, attention_mask=attention_mask)

        from diffusers.models.embeddings import apply_rotary_emb

        n_text = encoder_hidden_states.shape[1]
        joint = attn.add_q_proj is None  # single stream: one projection over [video; text]
        if joint:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if joint:
                query = torch.cat(
                    [
                        apply_rotary_emb(query[:, :-n_text], image_rotary_emb, sequence_dim=1),
                        query[:, -n_text:],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-n_text], image_rotary_emb, sequence_dim=1), key[:, -n_text:]],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if not joint:
            text_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query = torch.cat([query, text_q], dim=1)
            key = torch.cat([key, text_k], dim=1)
            value = torch.cat([value, text_v], dim=1)

        out = self._joint_attention(attn, query, key, value, attention_mask, n_text, image_rotary_emb)
        out = out.flatten(2, 3).to(query.dtype)
        video_out, text_out = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out

    def _joint_attention(self, attn, query, key, value, attention_mask, n_text, rotary) -> torch.Tensor:
        layer = self._layer_index(attn)
        step, grid = self._step_and_grid(layer)
        if self._parallel_config is not None:  # [context parallel] token shares: see context_parallel.py
            from .context_parallel import hunyuan_joint_attention

            return hunyuan_joint_attention(self, layer, step, grid, query, key, value, attention_mask, n_text)
        batch, n_tokens, _, head_dim = query.shape
        reason = self.sparse_reason(layer, step, n_tokens - n_text, head_dim)
        padding = None
        if reason is None:
            try:
                padding = key_padding_from_attention_mask(attention_mask, batch, n_tokens)
            except LookupError as err:
                reason = str(err)
        if reason is not None:
            self.fallback(reason)
            return self.dense(query, key, value, attention_mask, self._parallel_config)
        n_video = n_tokens - n_text
        if grid is None and rotary is not None:
            grid = grid_from_rope_table(rotary[0])
        if grid is not None and grid[0] * grid[1] * grid[2] != n_video:
            grid = None
        # diffusers' HunyuanVideo mask keeps every latent token and pads only the text tail: the
        # video keys are known valid (no host read of the mask; an unpadded text is an all-True mask)
        return self.sparse(
            layer,
            query,
            key,
            value,
            num_text_tokens=n_text,
            key_padding_mask=padding,
            grid=grid,
            padded_video_keys=False if padding is not None else None,
        )


# ---------------------------------------------------------------------------------- adapter API


def _is_hunyuan(model) -> bool:
    try:
        from diffusers import HunyuanVideoTransformer3DModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(model, HunyuanVideoTransformer3DModel)


def supports(model, config) -> bool:
    """True for a diffusers ``HunyuanVideoTransformer3DModel`` with a :class:`RectifiedSpaAttnConfig`."""
    return isinstance(config, RectifiedSpaAttnConfig) and _is_hunyuan(model)


def _target_names(model) -> list[str]:
    names = [f"transformer_blocks.{i}.attn.processor" for i in range(len(model.transformer_blocks))]
    names += [
        f"single_transformer_blocks.{j}.attn.processor" for j in range(len(model.single_transformer_blocks))
    ]
    return names


def apply(model, config: RectifiedSpaAttnConfig) -> None:
    """Install one processor per double- and single-stream block (the token refiner stays as it is).

    The original processors are saved on the model instance so :func:`remove` restores them exactly.
    """
    config = check_config(config)
    if not _is_hunyuan(model):
        raise ValueError(f"model={type(model).__name__} is not a HunyuanVideoTransformer3DModel")
    install_processors(
        model,
        _STATE_ATTR,
        lambda tracker: {
            name: HunyuanVideoRectifiedProcessor(config, layer=layer, tracker=tracker)
            for layer, name in enumerate(_target_names(model))
        },
    )


def remove(model) -> None:
    """Restore the processors saved by :func:`apply` and detach the tracker it attached."""
    restore_processors(model, _STATE_ATTR)


def stats(model) -> list[dict]:
    """Per-layer statistics of the last sparse call (see ``fastgen.processors.wan.stats``)."""
    return collect_stats(model)


__all__ = ["HunyuanVideoRectifiedProcessor", "apply", "remove", "stats", "supports"]
