"""Window-Diffusion (diffusion LMs): the per-phase token plan and the index-addressed KV cache.

Window-Diffusion computes only a window of tokens at most denoising steps. A *refresh* step runs
the whole (or, with the sliding variant, the truncated) sequence and writes the post-RoPE keys and
values of every layer and position into a cache addressed by position; the *pruned* steps of the
phase that follows run only the *active* tokens, scatter their fresh keys/values into the cache and
attend to the cached keys/values gathered at the phase's frozen *window* set. Masks beyond the
window (the far field) are neither computed nor attended.

This module is model-agnostic: bool sets over positions ``[B, N]``, packed position indices, and
SDPA-layout tensors ``[B, H, N, D]``. :mod:`fastgen.attention.window_rules` decides the sets (the
rules of the paper), the diffusion-LM pipeline's Window-Diffusion loop runs the model on them, and the
transformers adapter feeds the cache from inside the attention layers.

- :func:`leftmost` - the ``count`` leftmost positions of a set, per row.
- :func:`pack_positions` - a set as padded, sorted position indices plus a validity mask.
- :class:`WindowKVCache` - per-layer ``[B, H_kv, N + 1, D]`` keys/values allocated once per
  generation; slot ``N`` is a dump slot that padded indices write to and nothing reads. For the
  pruned steps of a phase it also holds the *window buffer*: the frozen window's keys/values gathered
  once per phase into a contiguous ``[B, H_kv, W + 1, D]`` per layer, into which the pruned steps
  scatter their fresh rows, so no step gathers the window again.
- :func:`window_attention` - non-causal attention of the active queries over the gathered window.
- :func:`predicted_flop_ratio` - dense-over-windowed linear-layer and attention work of a plan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgen._validation import check_int


def leftmost(candidates: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """The ``count`` leftmost True positions of ``candidates [B, N]`` per row, as a bool ``[B, N]``.

    ``count`` is an int or a ``[B]`` tensor (rows with fewer candidates keep all of them).
    """
    rank = torch.cumsum(candidates.long(), dim=1)  # 1-based rank among the candidates
    if isinstance(count, torch.Tensor):
        count = count.to(rank.device)[:, None]
    return candidates & (rank <= count)


def pack_positions(selected: torch.Tensor, dump_index: int, width: int | None = None):
    """Positions of ``selected [B, N]`` as ``(index [B, K] long, valid [B, K] bool)``, ascending per row.

    ``K`` is the largest row count (or ``width`` when given and larger); the padding entries of
    shorter rows hold ``dump_index`` and ``valid`` False. One host sync (the largest row count).
    """
    batch, n = selected.shape
    counts = selected.sum(1)
    k = int(counts.max().item()) if batch else 0
    if width is not None:
        k = max(k, width)
    # stable sort puts the selected positions first, in ascending order
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :k]
    if k > n:
        order = F.pad(order, (0, k - n), value=dump_index)
    valid = torch.arange(k, device=selected.device)[None, :] < counts[:, None]
    index = torch.where(valid, order, torch.full_like(order, dump_index))
    return index, valid


class WindowKVCache:
    """Post-RoPE keys and values per layer and position, ``[B, H_kv, N + 1, D]`` per layer.

    Tensors are allocated at the first write of each layer, at their full size for the generation
    (``num_positions + 1`` slots; the last is a dump slot for padded indices), and written in place
    afterwards: refresh steps overwrite positions ``[0, L)``; :meth:`scatter` / :meth:`gather` address
    them by position. The pipeline's pruned steps work on the phase's window buffer instead
    (:meth:`freeze_window`, :meth:`scatter_window`, :meth:`window`): during a phase the buffer holds the
    current keys/values of the window and the full-size tensors those of the refresh step; a pruned row
    is always inside the window, and the next refresh rewrites every position a pruned step touched.
    """

    def __init__(self, num_positions: int):
        check_int("num_positions", num_positions, 1)
        self.num_positions = num_positions
        """``N``: positions addressable in the cache (the dump slot is index ``N``)."""
        self.keys: dict[int, torch.Tensor] = {}
        """Layer index -> keys ``[B, H_kv, N + 1, D]``."""
        self.values: dict[int, torch.Tensor] = {}
        """Layer index -> values ``[B, H_kv, N + 1, D]``."""
        self.window_keys: dict[int, torch.Tensor] = {}
        """Layer index -> the frozen window's keys ``[B, H_kv, W + 1, D]`` (see :meth:`freeze_window`)."""
        self.window_values: dict[int, torch.Tensor] = {}
        """Layer index -> the frozen window's values ``[B, H_kv, W + 1, D]``."""
        self.window_index: torch.Tensor | None = None
        """``[B, W]`` positions of the frozen window (padding = the dump index)."""
        self.window_valid: torch.Tensor | None = None
        """``[B, W]`` bool, real entries of the frozen window."""
        self.window_key_mask: torch.Tensor | None = None
        """``[B, W + 1]`` bool key mask of the window buffer, ``None`` when nothing is padded."""

    @property
    def dump_index(self) -> int:
        """Index of the slot padded indices write to (never gathered as a valid key)."""
        return self.num_positions

    def _slots(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        cached = self.keys.get(layer)
        batch, heads, _, dim = key.shape
        if cached is None:
            shape = (batch, heads, self.num_positions + 1, dim)
            self.keys[layer] = key.new_zeros(shape)
            self.values[layer] = value.new_zeros((batch, heads, self.num_positions + 1, value.shape[-1]))
        elif cached.shape[0] != batch or cached.shape[1] != heads or cached.shape[3] != dim:
            raise ValueError(
                f"key shape {tuple(key.shape)} does not match the cache of layer {layer} "
                f"{tuple(cached.shape)} (batch, heads and head_dim are fixed for a generation)"
            )
        return self.keys[layer], self.values[layer]

    def write_prefix(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Overwrite positions ``[0, L)`` of ``layer`` with ``key``/``value [B, H_kv, L, D]`` (a refresh)."""
        length = key.shape[2]
        if length > self.num_positions:
            raise ValueError(f"key length {length} exceeds the cache's num_positions={self.num_positions}")
        keys, values = self._slots(layer, key, value)
        keys[:, :, :length].copy_(key)
        values[:, :, :length].copy_(value)

    def scatter(self, layer: int, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``key``/``value [B, H_kv, Q, D]`` at positions ``index [B, Q]`` (padding: dump slot)."""
        if layer not in self.keys:
            raise ValueError(f"layer {layer} has no cache yet: a pruned step must follow a refresh step")
        keys, values = self._slots(layer, key, value)
        heads = key.shape[1]
        where = index[:, None, :, None].expand(-1, heads, -1, key.shape[-1])
        keys.scatter_(2, where, key.to(keys.dtype))
        where_v = index[:, None, :, None].expand(-1, heads, -1, value.shape[-1])
        values.scatter_(2, where_v, value.to(values.dtype))

    def gather(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H_kv, W, D]`` at positions ``index [B, W]``."""
        if layer not in self.keys:
            raise ValueError(f"layer {layer} has no cache yet: a pruned step must follow a refresh step")
        return _gather_positions(self.keys[layer], index), _gather_positions(self.values[layer], index)

    # ------------------------------------------------------------ the phase's window buffer
    def freeze_window(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Freeze the phase's window ``index [B, W]`` (ascending per row, padding = the dump slot) with
        ``valid [B, W]``: every cached layer's keys/values there are copied into a contiguous buffer
        ``[B, H_kv, W + 1, D]`` whose last slot is a dump slot (never attended)."""
        if index.shape != valid.shape or index.dim() != 2:
            raise ValueError(
                f"window index {tuple(index.shape)} and valid {tuple(valid.shape)} must both be [B, W]"
            )
        self.window_index, self.window_valid = index, valid
        self.window_keys, self.window_values = {}, {}
        for layer in self.keys:
            self.window_keys[layer] = _with_dump_slot(_gather_positions(self.keys[layer], index))
            self.window_values[layer] = _with_dump_slot(_gather_positions(self.values[layer], index))
        # no padding anywhere (batch 1, or rows with equal windows): attend to [0, W) without a mask
        self.window_key_mask = None if bool(valid.all()) else F.pad(valid, (0, 1), value=False)

    def window_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slots ``[B, Q]`` of the frozen window holding ``positions [B, Q]`` (ascending, padding = the
        dump index). ``ValueError`` if a real position is not in the window (it would read stale keys)."""
        index = self.window_index
        if index is None:
            raise ValueError("no frozen window: call freeze_window after the refresh step")
        width = index.shape[1]
        slots = torch.searchsorted(index, positions.contiguous())
        real = positions != self.dump_index
        found = index.gather(1, slots.clamp(max=width - 1)) == positions
        if not bool((found | ~real).all()):
            raise ValueError("a pruned step's query position lies outside the phase's frozen window")
        # padded queries land in a padded window slot or in the dump slot W: both are never attended
        return torch.where(real, slots, torch.full_like(slots, width))

    def scatter_window(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``key``/``value [B, H_kv, Q, D]`` into the window buffer of ``layer`` at ``slots [B, Q]``."""
        if layer not in self.window_keys:
            raise ValueError(f"layer {layer} has no window buffer: freeze_window must follow a refresh step")
        keys, values = self.window_keys[layer], self.window_values[layer]
        if keys.shape[0] == 1:
            keys[0].index_copy_(1, slots[0], key[0].to(keys.dtype))
            values[0].index_copy_(1, slots[0], value[0].to(values.dtype))
            return
        heads = key.shape[1]
        keys.scatter_(2, slots[:, None, :, None].expand(-1, heads, -1, key.shape[-1]), key.to(keys.dtype))
        where_v = slots[:, None, :, None].expand(-1, heads, -1, value.shape[-1])
        values.scatter_(2, where_v, value.to(values.dtype))

    def window(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The window buffer of ``layer``: keys, values ``[B, H_kv, W', D]`` and a key mask ``[B, W']``
        (``None`` when every entry is real; then ``W' = W`` and the dump slot is left out)."""
        keys, values = self.window_keys[layer], self.window_values[layer]
        if self.window_key_mask is None:
            return keys[:, :, :-1], values[:, :, :-1], None
        return keys, values, self.window_key_mask


def _gather_positions(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``cache [B, H, N, D]`` at positions ``index [B, W]`` -> ``[B, H, W, D]`` (contiguous)."""
    if cache.shape[0] == 1:  # index_select is ~10x faster than gather with an expanded index
        return cache.index_select(2, index[0])
    heads, dim = cache.shape[1], cache.shape[-1]
    return cache.gather(2, index[:, None, :, None].expand(-1, heads, -1, dim))


def _with_dump_slot(window: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, D]`` -> ``[B, H, W + 1, D]`` with a zero slot at the end."""
    return F.pad(window, (0, 0, 0, 1))


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention of queries ``q [B, H, Q, D]`` over window keys/values ``[B, H_kv, W, D]``.

    ``key_valid [B, W]`` marks real window entries (padding and invalid keys are never attended;
    ``None``: all real); ``H`` must be a multiple of ``H_kv`` (grouped-query attention, served by SDPA's
    ``enable_gqa`` without copying the keys). Returns ``[B, H, Q, D]``.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of key/value heads {kv_heads}")
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads)


def predicted_flop_ratio(
    total_tokens: int, queries_per_step: list[int], keys_per_step: list[int], *, hidden: int, mlp: int
) -> float:
    """Dense work over windowed work for a run whose step ``s`` computed ``queries_per_step[s]`` rows
    attending to ``keys_per_step[s]`` keys (a dense step: ``total_tokens`` both).

    Per row: ``4·hidden²`` (q/k/v/o projections, MHA) + ``3·hidden·mlp`` (SwiGLU) + ``2·hidden·keys``
    (scores and weighted values); the LM head is left out (it runs on the same rows in both).
    """
    if len(queries_per_step) != len(keys_per_step) or not queries_per_step:
        raise ValueError("queries_per_step and keys_per_step must be equally long and non-empty")

    def work(rows: int, keys: int) -> float:
        return rows * (4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden * keys)

    dense = len(queries_per_step) * work(total_tokens, total_tokens)
    windowed = sum(work(q, k) for q, k in zip(queries_per_step, keys_per_step))
    return dense / max(windowed, 1.0)


__all__ = [
    "WindowKVCache",
    "leftmost",
    "pack_positions",
    "predicted_flop_ratio",
    "window_attention",
]
