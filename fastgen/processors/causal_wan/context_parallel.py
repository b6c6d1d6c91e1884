"""The causal Wan's self-attention under diffusers' context parallelism (Ulysses): the chunk's q/k/v are
exchanged with :mod:`fastgen.processors.context_parallel`'s all-to-all and the processor's own KV-cache
logic runs on the rank's heads."""

from __future__ import annotations

import torch

from ..context_parallel import check_heads, heads_to_sequence, layout_of, sequence_to_heads
from ..wan import apply_wan_rotary, norm_rope, projections


def causal_self_attention(processor, attn, session, hidden_states, rotary_emb) -> torch.Tensor:
    """``attn1`` of fastgen's causal Wan (Self-Forcing, Light Forcing) during a generation under Ulysses.

    Only the current chunk is exchanged: q/k/v of the rank's token share ``[B, S_chunk/U, H, D]`` become
    the whole chunk for heads ``[u*H/U, (u+1)*H/U)``, and the processor's own cache logic runs on them
    unchanged (``processor._causal``): each rank's KV cache holds its heads over the whole token range
    (global frame indices, so windowing, sinks and eviction are as in one process; memory / U), and
    ``chunk_attention`` (dense, or Light Forcing's) sees the rank's heads. RoPE: the rank's slice of the
    chunk table is applied before the exchange; a whole-chunk table (fastgen's RoPE hook registered
    after ``enable_parallelism``, so no split hook slices it) after it. Returns the block output
    ``[B, S_chunk/U, C]`` (after ``to_out``).
    """
    layout = layout_of(processor)
    if layout.ring > 1 or layout.uneven:
        raise ValueError(
            f"causal Wan under context parallelism: ring_degree={layout.ring} / uneven shares are not supported; "
            "allowed: ContextParallelConfig(ulysses_degree=N) (mode='ulysses')"
        )
    heads = attn.heads
    check_heads(layout, heads)
    share = hidden_states.shape[1]
    rows = None if rotary_emb is None else rotary_emb[0].shape[1]
    if rows not in (None, share, share * layout.world):
        raise ValueError(
            f"causal Wan under context parallelism: a RoPE table of {rows} tokens fits neither the rank's "
            f"{share} tokens nor the chunk's {share * layout.world}"
        )
    before = rotary_emb if rows == share else None
    raw_keys = session.rope_positions == "window"
    query, key, value = projections(attn, hidden_states, None)
    query = norm_rope(attn.norm_q, query, heads, before)
    key = norm_rope(attn.norm_k, key, heads, None if raw_keys else before)
    value = value.unflatten(2, (heads, -1))
    q, k, v = (heads_to_sequence(t, layout) for t in (query, key, value))
    if rotary_emb is not None and before is None:
        q = apply_wan_rotary(q, *rotary_emb)
        k = k if raw_keys else apply_wan_rotary(k, *rotary_emb)
    out = sequence_to_heads(processor._causal(session, q, k, v), layout)
    out = attn.to_out[0](out.flatten(2, 3).type_as(query))
    return attn.to_out[1](out)
