"""The causal Wan's self-attention under diffusers' context parallelism (Ulysses, ring, unified): the
chunk's q/k/v are exchanged with :mod:`fastgen.processors.context_parallel`'s all-to-all (Ulysses) and
all-gathered over the ring group, and the processor's own KV-cache logic runs on the rank's heads."""

from __future__ import annotations

import torch

from ..context_parallel import check_heads, gather_ring, heads_to_sequence, layout_of, sequence_to_heads
from ..wan import apply_wan_rotary, norm_rope, projections


def causal_self_attention(processor, attn, session, hidden_states, rotary_emb) -> torch.Tensor:
    """``attn1`` of fastgen's causal Wan (Self-Forcing, Light Forcing) during a generation under context
    parallelism (``ContextParallelConfig(ulysses_degree=U, ring_degree=R)``, P = U*R ranks).

    Only the current chunk is exchanged. Ulysses: q/k/v of the rank's token share ``[B, S_chunk/P, H, D]``
    become the ring rank's token share ``[B, S_chunk/R, H/U, D]`` for heads ``[u*H/U, (u+1)*H/U)``. Ring
    (all-gather form, as diffusers' ring gathers K/V): q/k/v are all-gathered over the ring group into
    the whole chunk for those heads. The processor's own cache logic then runs unchanged
    (``processor._causal``): each rank's KV cache holds its ``H/U`` heads over the whole token range
    (global frame indices, so windowing, sinks and eviction are as in one process; memory / U, none
    saved by the ring degree), and ``chunk_attention`` (dense, or Light Forcing's single-process
    selection for the rank's global heads) computes the whole chunk; the rank keeps its ring share of
    the rows. Under ring the chunk's attention is therefore repeated on the R ranks of a ring group
    (exact; the projections, cross-attention and feed-forward are split). RoPE: the rank's slice of the
    chunk table is applied before the exchange; a whole-chunk table (fastgen's RoPE hook registered
    after ``enable_parallelism``, so no split hook slices it) after the gather. Returns the block
    output ``[B, S_chunk/P, C]`` (after ``to_out``).
    """
    layout = layout_of(processor)
    if layout.uneven:
        raise ValueError(
            "causal Wan under context parallelism: diffusers' ulysses_anything / ring_anything modes (uneven "
            "token shares) are not supported; allowed: ContextParallelConfig(ulysses_degree=U, ring_degree=R) "
            "with equal shares"
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
    # [B, S/P, H, D] -> ring share [B, S/R, H/U, D] -> whole chunk [B, S, H/U, D] (ring shares are contiguous)
    q, k, v = (gather_ring(heads_to_sequence(t, layout), layout) for t in (query, key, value))
    if rotary_emb is not None and before is None:
        q = apply_wan_rotary(q, *rotary_emb)
        k = k if raw_keys else apply_wan_rotary(k, *rotary_emb)
    out = processor._causal(session, q, k, v)
    if layout.ring > 1:
        ring_share = out.shape[1] // layout.ring
        out = out[:, layout.ring_rank * ring_share : (layout.ring_rank + 1) * ring_share]
    out = sequence_to_heads(out, layout)
    out = attn.to_out[0](out.flatten(2, 3).type_as(query))
    return attn.to_out[1](out)
