"""Window-Diffusion's set rules (model-agnostic): which positions a refresh step fixes as the window and
which positions each pruned step runs, for the LLaDA and the Dream variants of the paper.

Sets are bool ``[B, N]`` over sequence positions; ``masks`` are the still-masked positions of the
current block. The loop that runs the model on these sets lives with the diffusion-LM pipeline
(``fastgen.pipelines.lm_windowed``); the cache and attention in :mod:`fastgen.attention.window`.

- LLaDA rules (``sliding=False``): after a refresh, window = every decoded real position plus the
  ``window`` leftmost masks of the block (:func:`llada_window`); a pruned step runs the ``active``
  leftmost masks, the tokens decoded at this phase's pruned steps and (first pruned step only) the
  tokens decoded at the refresh (:func:`pruned_sets`).
- Dream rules (``sliding=True``): the refresh runs the prefix before the ``window``-th mask of the block
  and decodes the leftmost mask (:func:`dream_refresh`); pruned steps run the span from that token to
  just before the current ``active + 1``-th mask (the block's end when there is none) and attend to the
  refresh prefix.
- With a logit shift (Dream), the position before every candidate mask also runs (its logits predict
  the mask). A pruned step whose rows would leave the frozen window returns ``None``: the loop runs a
  refresh instead.
- :func:`check_window_schedule`: the constraints that keep every pruned step inside its window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .window import leftmost


def llada_window(
    decoded: torch.Tensor, key_valid: torch.Tensor, masks: torch.Tensor, window: int
) -> torch.Tensor:
    """LLaDA rules: the window a refresh fixes, ``[B, N]``: every decoded (non-mask) real position plus
    the ``window`` leftmost ``masks``."""
    return (decoded & key_valid) | leftmost(masks, window)


@dataclass
class DreamRefresh:
    """What a Dream-rules refresh step runs and decodes."""

    length: int
    """Positions ``[0, length)`` the refresh runs (the longest row's cut)."""
    prefix: torch.Tensor
    """``[B, length]`` bool: each row's keys (real positions before its cut)."""
    span_masks: torch.Tensor
    """``[B, N]``: the ``active`` leftmost masks (logits computed for them)."""
    first: torch.Tensor
    """``[B, N]``: the leftmost mask of each row (decoded whatever its confidence)."""
    span_start: torch.Tensor
    """``[B]``: where the pruned steps' span starts (the first mask; ``N`` when none)."""


def dream_refresh(
    masks: torch.Tensor, key_valid: torch.Tensor, window: int, active: int, block_end: int
) -> DreamRefresh:
    """Dream rules: the prefix before the ``window``-th mask of the block (the block's end when there are
    fewer masks), the span masks and the first mask (one host read: the prefix length)."""
    total = masks.shape[1]
    cols = torch.arange(total, device=masks.device)
    rank = torch.cumsum(masks.long(), dim=1)
    at_window = masks & (rank == window)
    cut = torch.where(at_window.any(1), at_window.long().argmax(1), torch.full_like(rank[:, 0], block_end))
    length = int(cut.max().item())
    prefix = (cols[None, :length] < cut[:, None]) & key_valid[:, :length]
    first = leftmost(masks, 1)
    span_start = torch.where(first.any(1), first.long().argmax(1), torch.full_like(cut, total))
    return DreamRefresh(length, prefix, leftmost(masks, active), first, span_start)


def pruned_sets(
    masks: torch.Tensor,
    window_set: torch.Tensor,
    rows: torch.Tensor,
    *,
    sliding: bool,
    active: int,
    logits_shift: bool,
    block_end: int,
    decoded: torch.Tensor | None = None,
    span_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(query, candidates)`` bool ``[B, N]`` of the next pruned step, or ``None`` if it would leave the
    frozen ``window_set``.

    Args:
        masks: still-masked positions of the current block.
        rows: ``[B]`` rows still generating.
        decoded: LLaDA rules: tokens decoded so far in this phase that run again (pruned steps', plus
            the refresh's on the first pruned step).
        span_start: Dream rules: the span's first position per row (:attr:`DreamRefresh.span_start`).
    """
    if not sliding:
        query = leftmost(masks, active) | decoded
    else:
        # the span ends before the (active + 1)-th mask, or at the block's end when there is none: the
        # reference's `ranks <= active`, so tokens decoded after the last mask stay recomputed
        cols = torch.arange(masks.shape[1], device=masks.device)
        rank = torch.cumsum(masks.long(), dim=1)
        after = masks & (rank == active + 1)
        span_end = torch.where(after.any(1), after.long().argmax(1), torch.full_like(span_start, block_end))
        query = (cols[None] >= span_start[:, None]) & (cols[None] < span_end[:, None])
    candidates = query & masks
    if logits_shift:
        query = query | torch.roll(candidates, -1, dims=1)  # position p - 1 predicts mask p
    if bool((query & ~window_set & rows[:, None]).any()):
        return None
    return query & rows[:, None], candidates & rows[:, None]


def check_window_schedule(window, gen_length: int, steps: int, block_length: int) -> None:
    """``ValueError`` unless a resolved ``WindowDiffusionConfig`` keeps every pruned step of this schedule
    inside its frozen window (``tokens_per_step = ceil(block_length / steps per block)``). Schedules
    whose blocks do not divide are left to the pipeline's block checks."""
    if gen_length % block_length or steps % (gen_length // block_length):
        return
    steps_per_block = steps // (gen_length // block_length)
    per_step = -(-block_length // steps_per_block)
    if window.sliding:
        need = window.active + window.refresh_cycle * per_step
        if not need < window.window:
            raise ValueError(
                f"WindowDiffusionConfig(sliding=True): active={window.active} + refresh_cycle="
                f"{window.refresh_cycle} * tokens_per_step={per_step} = {need} must be < window="
                f"{window.window}, so the active span stays inside the refresh step's prefix "
                "(tokens_per_step = ceil(block_length / steps per block)); allowed: a larger window, a "
                "smaller active or refresh_cycle, or more steps"
            )
    else:
        need = window.active + (window.refresh_cycle - 1) * per_step
        if need > window.window:
            raise ValueError(
                f"WindowDiffusionConfig: active={window.active} + (refresh_cycle={window.refresh_cycle} - 1) "
                f"* tokens_per_step={per_step} = {need} must be <= window={window.window}, so every active "
                "query stays inside the phase's frozen window (tokens_per_step = ceil(block_length / steps "
                "per block)); allowed: a larger window, a smaller active or refresh_cycle, or more steps"
            )


__all__ = ["DreamRefresh", "check_window_schedule", "dream_refresh", "llada_window", "pruned_sets"]
