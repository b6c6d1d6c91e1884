"""Light Forcing on the causal (Self-Forcing) Wan: the adapter that ``apply_sparse_attention`` picks for a
``WanTransformer3DModel`` with a :class:`~fastgen.configs.LightForcingConfig`.

It installs fastgen's causal Wan processors (``fastgen/processors/causal_wan.py``: KV cache, absolute-frame
RoPE, prompt K/V once) with a self-attention processor whose :meth:`chunk_attention` (the one overridable
call of a chunk's queries over [cache + chunk] keys) runs Light Forcing
(``fastgen/attention/light_forcing.py``):

- the chunk's sparsity comes from Chunk-Aware Growth over the generation's chunks (and its rolling window);
  chunk 0 runs dense, through the same dispatched attention as the dense causal processor;
- the block mask is Hierarchical Sparse Attention, redone at every layer, step and head; the block-sparse
  attention runs on the native CPU kernel or the Triton kernel (index tables, query length != key length);
- the context (t = 0, cache-writing) pass runs the same sparse attention at the chunk's sparsity, as the
  authors' code does; the K/V it writes into the cache are always the full ones (the cache write happens
  before attention, in the causal processor);
- with ``pool_cache=True`` the pooled statistics of the cached frames (block means, frame means, and with
  ``rectify`` pooled values and deviations) are kept per (branch, layer) and extended when the cache grows,
  so each cached chunk is pooled once instead of at every step (default False, as the reference: the
  benchmark measured no gain on the CPU).

Statistics (``fastgen.attention_stats`` protocol: ``record_stats`` level, opt-in, e.g.
``fastgen.recording_attention_stats(model, "summary")``; nothing is synced to the host while generating):
:func:`stats` lists, per (chunk, layer), the density actually computed (mean over the chunk's
calls), keys per query, the fraction of dropped blocks compensated (rectification), the chunk's sparsity and
regime, and with ``fastgen.recording_attention_stats(model, "masks")`` the block mask of the chunk's last call
(batch 0); ``fastgen.attention_stats(model)`` gives the last chunk of each layer.

Example:
    >>> from fastgen import LightForcingConfig, apply_sparse_attention, remove_sparse_attention
    >>> from fastgen.pipelines import CausalWanPipeline
    >>> pipe = CausalWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    >>> apply_sparse_attention(pipe.transformer, LightForcingConfig())
    >>> fastgen.record_attention_stats(pipe.transformer, "summary")  # statistics are opt-in
    >>> video = pipe(prompt="a corgi on a beach", num_frames=81, height=512, width=768).frames[0]
    >>> fastgen.processors.light_forcing_wan.stats(pipe.transformer)[-1]["density"]
    >>> remove_sparse_attention(pipe.transformer)  # dense causal generation again, bit-identical
"""

from __future__ import annotations

import logging

import torch

from fastgen._validation import log_once
from fastgen.attention.light_forcing import PooledKeys, chunk_sparsities, light_forcing_attention
from fastgen.attention_stats import DEFAULT_LEVEL
from fastgen.configs import LightForcingConfig

from ._install import Support, head_dim_supported, is_wan
from ._install import check_config as _check_config
from .causal_wan import (
    CausalWanSelfAttnProcessor,
    CausalWanState,
    ChunkInfo,
    check_causal_wan,
    install_causal_processors,
    remove_causal_processors,
)

logger = logging.getLogger(__name__)

_MARK_ATTR = "_fastgen_light_forcing"


def check_config(config) -> LightForcingConfig:
    """``config`` itself if it is a :class:`LightForcingConfig`, else a ``ValueError``."""
    return _check_config(config, LightForcingConfig, "the Light Forcing processor")


class LightForcingWanProcessor(CausalWanSelfAttnProcessor):
    """``attn1`` of a causal Wan block running Light Forcing (CAG + HSA) over the KV cache."""

    def __init__(self, layer: int, state: CausalWanState, config: LightForcingConfig | None = None) -> None:
        super().__init__(layer, state)
        self.config = check_config(config if config is not None else LightForcingConfig())
        """The method's settings."""
        self._sparsities: dict[tuple, list[float]] = {}
        self._pooled: dict[int, tuple[tuple[int, ...], PooledKeys]] = {}  # branch -> (frames, stats)
        self._stats: dict[int, dict] = {}  # chunk -> accumulated statistics of this layer
        self._generation: object | None = None
        self._logged: set[str] = set()
        self.record_stats = DEFAULT_LEVEL
        """Statistics kept (``fastgen.attention_stats`` protocol): ``"off"`` (the default: statistics are
        opt-in), ``"summary"`` (per chunk: density, keys per query, compensated fraction as device tensors)
        or ``"masks"`` (also each chunk's block mask)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        """The causal self-attention of :class:`CausalWanSelfAttnProcessor`; refused outside a causal
        generation, where Light Forcing would silently run dense (e.g. its transformer in a ``WanPipeline``)."""
        if self.state.session is None:
            raise ValueError(
                "Light Forcing is applied to this transformer, but it is being run outside the causal Wan's "
                "chunked generation (CausalWanPipeline / causal_generation), where Light Forcing does nothing; "
                "allowed: run it with CausalWanPipeline, or remove it (fastgen.remove_sparse_attention) and apply "
                "RectifiedSpaAttnConfig for a bidirectional Wan"
            )
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the per-generation state (pooled statistics, chunk statistics)."""
        self._pooled.clear()
        self._stats.clear()

    def _log_once(self, message: str) -> None:
        log_once(logger, message, logging.INFO, seen=self._logged)

    def chunk_sparsity(self, info: ChunkInfo) -> float:
        """Chunk-Aware Growth sparsity of ``info``'s chunk in this generation."""
        key = (info.num_chunks, info.frames_per_chunk, info.local_attn_frames)
        if key not in self._sparsities:
            cfg = self.config
            self._sparsities[key] = chunk_sparsities(
                info.num_chunks * info.frames_per_chunk,
                info.frames_per_chunk,
                cfg.sparsity,
                cfg.sparsity_base,
                info.local_attn_frames,
            )
        return self._sparsities[key][info.chunk_index]

    def _cached_pooled(self, info: ChunkInfo) -> PooledKeys | None:
        """Pooled statistics of a prefix of this call's past frames kept from an earlier call, if any."""
        if not self.config.pool_cache or info.branch not in self._pooled:
            return None
        frames, pooled = self._pooled[info.branch]
        past = info.key_frames[: info.cached_frames]
        return pooled if past[: len(frames)] == frames else None

    # ---------------------------------------------------------------- compute
    def chunk_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, info: ChunkInfo
    ) -> torch.Tensor:
        """Light Forcing attention of the chunk's queries ``[B, H, Nq, D]`` over cache + chunk ``[B, H, Nk, D]``."""
        session = self.state.session
        if self._generation is not session:  # a new generation: forget the previous one's state
            self._generation = session
            self.reset()
        cfg = self.config
        if info.cached_frames == 0:
            self._record(info, None, 0.0, "dense", keys=key.shape[2])
            return super().chunk_attention(query, key, value, info)
        if not head_dim_supported(query.shape[-1]):
            self._log_once(
                f"fastgen: Light Forcing runs dense attention: head_dim={query.shape[-1]} is unsupported "
                "(allowed: multiple of 8 in [16, 256])"
            )
            return super().chunk_attention(query, key, value, info)
        sparsity = self.chunk_sparsity(info)
        out, result = light_forcing_attention(
            query,
            key,
            value,
            sparsity=sparsity,
            block_size=cfg.block_size,
            frame_tokens=info.frame_tokens,
            keep_frames=cfg.keep_frames,
            keep_sink=cfg.keep_sink,
            keep_near=cfg.keep_near,
            rectify=cfg.rectify,
            pooled=self._cached_pooled(info),
        )
        if cfg.pool_cache and result["past"] is not None:
            self._pooled[info.branch] = (info.key_frames[: info.cached_frames], result["past"])
        self._record(info, result, sparsity, result["regime"])
        return out

    # --------------------------------------------------------------- statistics
    def _record(
        self, info: ChunkInfo, result: dict | None, sparsity: float, regime: str, keys: int | None = None
    ) -> None:
        """Accumulate this call into the chunk's statistics (device tensors, no host sync)."""
        if self.record_stats == "off":
            return
        row = self._stats.setdefault(
            info.chunk_index,
            {
                "calls": 0,
                "density": 0.0,
                "keys": 0.0,
                "compensated": 0.0,
                "sparsity": sparsity,
                "regime": regime,
            },
        )
        row["calls"] += 1
        row["block_mask"] = None
        if result is None:
            row["density"] = row["density"] + 1.0
            row["keys"] = row["keys"] + float(keys or 0)
            return
        plan = result["plan"]
        row["density"] = row["density"] + plan.density()
        row["keys"] = row["keys"] + plan.keys_per_query()
        compensated = result["compensated"]
        if compensated is not None:
            dropped = (~result["block_mask"]).sum().clamp_min(1)
            row["compensated"] = row["compensated"] + compensated.sum() / dropped
        if self.record_stats == "masks":
            row["block_mask"] = result["block_mask"][0]
        row["regime"] = regime

    def chunk_stats(self) -> list[dict]:
        """Per-chunk statistics of this layer in the last generation (host values)."""
        rows = []
        for chunk in sorted(self._stats):
            row = self._stats[chunk]
            calls = max(1, row["calls"])
            mask = row.get("block_mask")
            rows.append(
                {
                    "layer": self.layer,
                    "chunk": chunk,
                    "density": float(row["density"]) / calls,
                    "keys_per_query": float(row["keys"]) / calls,
                    "compensated_fraction": float(row["compensated"]) / calls
                    if self.config.rectify
                    else None,
                    "sparsity": float(row["sparsity"]),
                    "regime": row["regime"],
                    "calls": row["calls"],
                    "block_mask": None if mask is None else mask.detach().to("cpu", torch.bool),
                }
            )
        return rows

    def layer_stats(self) -> list[dict]:
        """Statistics of the last chunk this layer ran (the shape other methods' processors report)."""
        rows = self.chunk_stats()
        return rows[-1:]


# ---------------------------------------------------------------------------------- adapter API


def supports(model, config) -> Support:
    """Truthy for a diffusers ``WanTransformer3DModel`` with a :class:`LightForcingConfig` (it runs inside
    the causal Wan's chunked generation: ``CausalWanPipeline`` / ``causal_generation``)."""
    return Support(isinstance(config, LightForcingConfig) and is_wan(model))


def supports_pipeline(pipe, config) -> Support:
    """Falsy, with the reason, for a :class:`LightForcingConfig` on a pipeline that is not fastgen's causal
    Wan (Light Forcing runs only inside its chunked generation)."""
    if isinstance(config, LightForcingConfig) and not getattr(pipe, "fastgen_causal", False):
        return Support(
            False,
            f"Light Forcing runs inside the causal Wan's chunked generation (CausalWanPipeline); "
            f"{type(pipe).__name__} runs bidirectional attention over the whole video, where it would do "
            "nothing; allowed there: RectifiedSpaAttnConfig",
        )
    return Support(True)


def apply(model, config: LightForcingConfig) -> None:
    """Install the causal Wan processors with :class:`LightForcingWanProcessor` on every block's ``attn1``.

    The original processors are saved on the instance by the causal install; :func:`remove` restores them.
    """
    config = check_config(config)
    check_causal_wan(model)
    install_causal_processors(
        model, self_attention=lambda layer, state: LightForcingWanProcessor(layer, state, config)
    )
    setattr(model, _MARK_ATTR, True)


def remove(model) -> None:
    """Remove the Light Forcing processors: the model's original processors come back (a later causal
    generation installs the dense causal processors again, so it is bit-identical to one never sparsified)."""
    if getattr(model, _MARK_ATTR, False):
        remove_causal_processors(model)
        setattr(model, _MARK_ATTR, False)


def processors(model) -> list[LightForcingWanProcessor]:
    """The Light Forcing processors installed on ``model``, by layer."""
    procs = {
        id(p): p
        for p in getattr(model, "attn_processors", {}).values()
        if isinstance(p, LightForcingWanProcessor)
    }
    return sorted(procs.values(), key=lambda p: p.layer)


def stats(model) -> list[dict]:
    """Per (chunk, layer) statistics of the last generation, sorted by chunk then layer: ``chunk``,
    ``layer``, ``density`` (computed tiles / all tiles, mean over the chunk's calls), ``keys_per_query``,
    ``compensated_fraction`` (rectification), ``sparsity`` (CAG), ``regime`` (HSA), ``calls``,
    ``block_mask`` (batch 0, CPU bool ``[H, nqb, nkb]`` of the chunk's last call when recording at
    ``"masks"`` level, see ``fastgen.recording_attention_stats``; None otherwise and for a dense chunk)."""
    rows = [row for proc in processors(model) for row in proc.chunk_stats()]
    return sorted(rows, key=lambda r: (r["chunk"], r["layer"]))


def chunk_densities(stats: list[dict]) -> dict[int, float]:
    """Mean density over the layers of each chunk (``{chunk: density}``) from ``generate_causal_video`` stats."""
    per_chunk: dict[int, list[float]] = {}
    for row in stats or []:
        if row.get("chunk") is not None and row.get("density") is not None:
            per_chunk.setdefault(int(row["chunk"]), []).append(float(row["density"]))
    return {c: float(sum(v) / len(v)) for c, v in sorted(per_chunk.items())}


__all__ = [
    "LightForcingWanProcessor",
    "apply",
    "check_config",
    "chunk_densities",
    "processors",
    "remove",
    "stats",
    "supports",
]
