"""Causal (autoregressive, KV-cached) attention on a plain diffusers ``WanTransformer3DModel``: Self-Forcing.

Self-Forcing (Huang et al., 2025) turns Wan 2.1 into a chunk-by-chunk video generator without changing a
single weight: latent frames come in chunks, the self-attention of a chunk sees the K/V of every earlier
chunk (cached) plus its own, RoPE uses absolute frame positions and the cross-attention K/V of the prompt
never change. diffusers has no such model, so fastgen adds the behaviour with its own attention processors
and one hook on the transformer's ``rope`` module; the model class is untouched and everything is removed
by :func:`remove_causal_processors` (the original processor objects come back).

Pieces
------
- :class:`CausalWanState`: one per transformer (on the instance), shared by its processors. Outside a
  generation (``state.session is None``) every processor computes exactly what diffusers'
  ``WanAttnProcessor`` computes (full, non-causal attention).
- :class:`CausalWanSession`: the state of one generation, opened by :func:`causal_generation` (what
  ``fastgen.pipelines.CausalWanPipeline`` does). The pipeline marks chunks, steps and the CFG branch
  explicitly (:meth:`~CausalWanSession.begin_chunk`, :meth:`~CausalWanSession.begin_step`,
  :attr:`~CausalWanSession.branch`); nothing is guessed from timesteps.
- :class:`KVCache`: the self-attention cache of one (branch, layer), allocated ONCE per generation at
  its final size (``num_frames`` frames, or ``local_attn_frames`` with a rolling window), layout
  ``[B, H, frames * frame_tokens, D]``. Keys are stored after QK-norm and RoPE (absolute positions), values
  raw. Write rule: a new chunk appends; further steps of the same chunk and its context pass overwrite
  the same slot. Rolling window of ``W = local_attn_frames`` frames with ``S = sink_frames`` pinned: a
  token of a chunk ending at (exclusive) frame ``e`` sees frames ``f < e`` with ``f < S`` or
  ``f >= e - (W - S)``; frames leave the window by an in-place shift (no reallocation, no concatenation),
  so the keys handed to attention are always in temporal order.
- RoPE positions: ``rope_positions="absolute"`` (Self-Forcing, LongLive; default) rotates keys once, at
  their absolute frame, before caching. ``"window"`` (Light Forcing's long-video config) caches keys
  without RoPE and rotates them on every read by their position in the attended window (key frame ``j`` at
  position ``j``), the queries at the window's last positions.
- :class:`CausalWanSelfAttnProcessor` (``attn1``) and :class:`CausalWanCrossAttnProcessor` (``attn2``,
  prompt K/V computed once per generation and branch).

The attention interface (stable; Light Forcing overrides it)
------------------------------------------------------------
During a generation the self-attention of a chunk's queries over [cached keys + chunk keys] is one call::

    CausalWanSelfAttnProcessor.chunk_attention(self, query, key, value, info) -> out

- ``query``: ``[B, H, Nq, D]`` (the chunk's tokens, after QK-norm and RoPE), ``Nq = info.query_tokens``.
- ``key`` / ``value``: ``[B, H, Nk, D]`` views into the cache (already holding this chunk's K/V at the end),
  ``Nk = len(info.key_frames) * info.frame_tokens``; key frame ``j`` is tokens
  ``[j * frame_tokens, (j + 1) * frame_tokens)``, frames in temporal order:
  ``[sinks (info.sink_frames)] [other cached frames] [current chunk (info.current_frames)]``.
- ``info``: a :class:`ChunkInfo` (layer, branch, chunk index, step index, timestep, context pass, tokens
  per frame, absolute query frames, absolute key frames, cached / sink / current frame counts).
- returns ``[B, H, Nq, D]`` in the dtype of ``query``.

The default is dense attention through diffusers' ``dispatch_attention_fn`` (so ``set_attention_backend``
applies). Subclass and override it, or pass ``chunk_attention_fn=callable(query, key, value, info)`` to the
constructor. After the context pass of a chunk has written its clean K/V, :meth:`~CausalWanSelfAttnProcessor
.on_chunk_written` is called once per (branch, layer) with views of that chunk's keys and values (default:
nothing), the place for per-chunk statistics that must not be recomputed at every step. Install a subclass
with ``install_causal_processors(transformer, self_attention=lambda layer, state: MyProcessor(layer, state))``.

Token layout: Wan flattens a latent ``[C, F, H, W]`` into tokens frame-major (f, h, w) after the
``(1, 2, 2)`` patch, so latent frame ``f`` is the ``T = (H/2) * (W/2)`` consecutive tokens
``[f*T, (f+1)*T)``. 480x832 gives T = 30 * 52 = 1560 (= 12 * 128 + 24: blocks of 64 or 128 straddle frame
boundaries); 512x768 gives T = 32 * 48 = 1536 = 12 * 128 = 24 * 64 (every frame is whole blocks).

Example:
    >>> from fastgen.processors.causal_wan import causal_generation
    >>> with causal_generation(transformer, batch_size=1, num_frames=21, frame_tokens=1560) as session:
    ...     for c in range(7):
    ...         session.begin_chunk(c)
    ...         for s, t in enumerate([1000.0, 937.5, 833.33, 625.0]):
    ...             session.begin_step(s, t)
    ...             v = transformer(chunk_latents, timestep, prompt_embeds).sample
    ...         session.begin_step(4, 0.0, context=True)
    ...         transformer(clean_chunk, zero_timestep, prompt_embeds)

Layout: :mod:`.session` (chunk geometry, KV cache, session, state), :mod:`.processors` (the two
processors, the RoPE hook), :mod:`.install` (install / remove, :func:`causal_generation`).
"""

from .install import (
    causal_generation,
    check_causal_wan,
    get_causal_state,
    install_causal_processors,
    remove_causal_processors,
)
from .processors import CausalWanCrossAttnProcessor, CausalWanSelfAttnProcessor
from .session import (
    ROPE_POSITIONS,
    CausalWanSession,
    CausalWanState,
    ChunkAttentionFn,
    ChunkInfo,
    KVCache,
    check_chunking,
    visible_frames,
)

__all__ = [
    "ROPE_POSITIONS",
    "ChunkAttentionFn",
    "ChunkInfo",
    "CausalWanCrossAttnProcessor",
    "CausalWanSelfAttnProcessor",
    "CausalWanSession",
    "CausalWanState",
    "KVCache",
    "causal_generation",
    "check_causal_wan",
    "check_chunking",
    "get_causal_state",
    "install_causal_processors",
    "remove_causal_processors",
    "visible_frames",
]
