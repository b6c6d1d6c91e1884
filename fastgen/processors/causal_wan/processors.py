"""The causal Wan's attention processors (``attn1`` block-causal over the KV cache, ``attn2`` with the
prompt's K/V cached per branch) and the RoPE hook that positions each chunk's frames. See the package
docstring."""

from __future__ import annotations

import torch

from .._install import dense_dispatch
from ..wan import apply_wan_rotary, norm_rope, projections
from .session import ROPE_HOOK_NAME, CausalWanSession, CausalWanState, ChunkAttentionFn, ChunkInfo


class _CausalProcessorBase:
    """What both causal processors share: the state, the layer index, diffusers' backend attributes."""

    def __init__(self, layer: int, state: CausalWanState) -> None:
        self.layer = layer
        """Transformer block index."""
        self.state = state
        """The transformer's :class:`CausalWanState`."""
        self._attention_backend = None  # diffusers' set_attention_backend writes here
        self._parallel_config = None

    def reset(self) -> None:
        """Nothing per-generation lives on the processor itself (the session holds it)."""


class CausalWanSelfAttnProcessor(_CausalProcessorBase):
    """``attn1`` of a Wan block: block-causal self-attention over the KV cache during a generation,
    diffusers' ``WanAttnProcessor`` math otherwise. Override :meth:`chunk_attention` (module docstring)."""

    def __init__(
        self, layer: int, state: CausalWanState, chunk_attention_fn: ChunkAttentionFn | None = None
    ) -> None:
        super().__init__(layer, state)
        self.chunk_attention_fn = chunk_attention_fn
        """Optional replacement of the default dense :meth:`chunk_attention`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same contract as diffusers' ``WanAttnProcessor.__call__`` (self-attention only)."""
        if encoder_hidden_states is not None:
            raise ValueError("CausalWanSelfAttnProcessor serves self-attention (attn1) only")
        session = self.state.session
        if session is not None and attention_mask is not None:
            raise ValueError(
                "causal Wan self-attention got an attention_mask during a causal generation; the chunked "
                "generation attends block-causally over its KV cache and cannot honour a mask (it would run "
                "non-causal and skip the cache write); allowed: attention_mask=None"
            )
        if session is not None and self._parallel_config is not None:
            from .context_parallel import causal_self_attention  # [context parallel] Ulysses chunk exchange

            return causal_self_attention(self, attn, session, hidden_states, rotary_emb)
        query, key, value = projections(attn, hidden_states, None)
        query = norm_rope(attn.norm_q, query, attn.heads, rotary_emb)
        raw_keys = session is not None and session.rope_positions == "window" and attention_mask is None
        key = norm_rope(attn.norm_k, key, attn.heads, None if raw_keys else rotary_emb)
        value = value.unflatten(2, (attn.heads, -1))
        if session is None or attention_mask is not None:
            out = dense_dispatch(self, query, key, value, attention_mask, self._parallel_config)
        else:
            out = self._causal(session, query, key, value)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _causal(self, session: CausalWanSession, query, key, value) -> torch.Tensor:
        if session.chunk_index < 0:
            raise RuntimeError("causal Wan forward before session.begin_chunk(...)")
        b, n = query.shape[:2]
        expected = session.frames_per_chunk * session.frame_tokens
        if n != expected or b != session.batch_size:
            raise ValueError(
                f"causal Wan forward got hidden states of batch {b} x {n} tokens; this generation expects "
                f"batch {session.batch_size} x {expected} tokens (one chunk of {session.frames_per_chunk} "
                f"frames x {session.frame_tokens} tokens)"
            )
        cache = session.cache(self.layer)
        visible = session.visible()
        frames = session.chunk_frames
        cache.write(key, value, frames, visible)
        keys, values = cache.view()
        if session.rope_positions == "window":  # cached without RoPE: rotate by window position
            keys = apply_wan_rotary(keys.transpose(1, 2), *session.key_rotary).transpose(1, 2)
        info = session.info(self.layer, cache.frames)
        fn = self.chunk_attention_fn or self.chunk_attention
        out = fn(query.transpose(1, 2), keys, values, info)
        if session.context_pass:
            self.on_chunk_written(*cache.chunk_view(frames), info)
        return out.transpose(1, 2)

    def chunk_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, info: ChunkInfo
    ) -> torch.Tensor:
        """Attention of the chunk's queries ``[B, H, Nq, D]`` over cache + chunk keys/values ``[B, H, Nk, D]``;
        ``[B, H, Nq, D]``. Dense (diffusers' dispatched attention); Light Forcing overrides this."""
        out = dense_dispatch(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)

    def on_chunk_written(self, key: torch.Tensor, value: torch.Tensor, info: ChunkInfo) -> None:
        """Called after the context pass wrote the clean chunk's K/V (views ``[B, H, Nq, D]``; keys without
        RoPE in ``"window"`` mode); no-op here."""


class CausalWanCrossAttnProcessor(_CausalProcessorBase):
    """``attn2`` of a Wan block (text cross-attention): during a generation the prompt K/V are computed on
    the first forward of each CFG branch and reused for every chunk and step."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same contract as diffusers' ``WanAttnProcessor.__call__`` for text-only cross-attention."""
        if encoder_hidden_states is None:
            raise ValueError("CausalWanCrossAttnProcessor serves cross-attention (attn2) only")
        session = self.state.session
        cached = session.cross_kv.get((session.branch, self.layer)) if session is not None else None
        if cached is None:
            query, key, value = projections(attn, hidden_states, encoder_hidden_states)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if session is not None:
                session.cross_kv[(session.branch, self.layer)] = (key, value)
        else:
            key, value = cached
            query = attn.to_q(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        out = dense_dispatch(self, query, key, value, attention_mask)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# ----------------------------------------------------------------------------- RoPE hook


def _rope_hook_class():
    from diffusers.hooks import ModelHook

    class AbsoluteFrameRoPEHook(ModelHook):
        """Hook on ``transformer.rope``: during a generation the table covers the chunk's frame positions
        ``[p, p + F)`` with ``p = session.query_position`` (diffusers' own table for ``p + F`` frames, sliced);
        in ``"window"`` mode the whole table is also kept for the keys (``session.key_rotary``)."""

        def __init__(self, state: CausalWanState) -> None:
            super().__init__()
            self.state = state

        def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
            session = self.state.session
            forward = self.fn_ref.original_forward
            if session is None or session.chunk_index < 0:
                return forward(hidden_states, *args, **kwargs)
            from ..context_parallel import unsplit_rope_forward  # [context parallel] whole table in any order

            forward = unsplit_rope_forward(module, forward, ROPE_HOOK_NAME)
            b, c, f, h, w = hidden_states.shape
            p_t, p_h, p_w = module.patch_size
            offset = session.query_position * p_t
            if offset == 0:
                cos, sin = forward(hidden_states, *args, **kwargs)
                session.key_rotary = (cos, sin) if session.rope_positions == "window" else None
                return cos, sin
            if (offset + f) // p_t > module.max_seq_len:
                raise ValueError(
                    f"frame {(offset + f) // p_t} is beyond the RoPE table of rope_max_seq_len={module.max_seq_len}"
                )
            # only the shape matters to the table: a zero-stride view of the right size
            longer = hidden_states[:, :, :1].expand(b, c, offset + f, h, w)
            cos, sin = forward(longer, *args, **kwargs)
            session.key_rotary = (cos, sin) if session.rope_positions == "window" else None
            skip = (offset // p_t) * (h // p_h) * (w // p_w)
            return cos[:, skip:], sin[:, skip:]

    return AbsoluteFrameRoPEHook


__all__ = ["CausalWanCrossAttnProcessor", "CausalWanSelfAttnProcessor"]
