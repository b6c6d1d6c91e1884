"""The Window-Diffusion generation loop of :class:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline`:
refresh steps (a full or prefix forward that fills the adapter's position-addressed KV cache) and pruned
steps (only the active positions run, attending to the phase's frozen window). The set rules are
model-agnostic and live in :mod:`fastgen.attention.window_rules`; the cache and the attention function in
:mod:`fastgen.attention.window` and :mod:`fastgen.processors.transformers_lm`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from fastgen.pipelines.lm_sampler import cfg_combine, decide

from fastgen.attention.window import pack_positions
from fastgen.attention.window_rules import dream_refresh, llada_window, pruned_sets
from fastgen.processors import transformers_lm as lm_adapter

logger = logging.getLogger(__name__)


def bidirectional_mask(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive full mask ``[B, 1, L, L]`` (0 attend, ``finfo.min`` padding key) from ``key_valid [B, L]``.

    Returned as an expanded (stride-0 along queries) view, so it costs O(B·L) memory.
    """
    b, n = key_valid.shape
    row = torch.zeros(b, 1, 1, n, dtype=dtype, device=key_valid.device)
    row.masked_fill_(~key_valid[:, None, None, :], torch.finfo(dtype).min)
    return row.expand(b, 1, n, n)


@dataclass
class GenerationRun:
    """Tensors of one generation shared by the dense and the windowed loops."""

    x: torch.Tensor
    key_valid: torch.Tensor
    prompt_here: torch.Tensor
    position_ids: torch.Tensor
    gens: list
    cfg_scale: float
    model_valid: torch.Tensor
    model_positions: torch.Tensor
    mask_4d: torch.Tensor | None


class WindowedRun:
    """The Window-Diffusion loop body: refresh and pruned steps, the phase plan, the trace.

    The set rules (which positions a refresh fixes as the window, which a pruned step runs) are
    :mod:`fastgen.attention.window_rules`; this class runs the model on those sets, commits the
    decoded tokens, feeds the adapter's cache and records the trace. A pruned step whose rows would
    leave the frozen window (only possible with confidence-threshold decoding or Dream's schedule
    committing more than ``ceil(block/steps)`` tokens) becomes a refresh step instead.
    """

    def __init__(self, pipe, run, config, num_blocks, steps_per_block, logits_shift, options):
        self.pipe, self.run, self.config = pipe, run, config
        self.logits_shift, self.options = logits_shift, options
        self.planned_refreshes = num_blocks * -(-steps_per_block // config.refresh_cycle)
        self.trace: list[dict] = []
        self.refreshes = 0
        self.state = None
        self.processor = None
        batch, total = run.x.shape
        self.cols = torch.arange(total, device=run.x.device)
        self.total = total

    # ------------------------------------------------------------ lifecycle
    def begin(self, processor) -> None:
        """Start the generation's cache (``processor``: the LM adapter when SparseD shares the model)."""
        self.processor = processor
        self.state = lm_adapter.begin_window(self.pipe.model, self.total)

    def end(self) -> None:
        """Free the generation's cache."""
        lm_adapter.end_window(self.pipe.model)

    def begin_block(self, start: int, end: int) -> None:
        """Enter the block ``[start, end)``: its first step is a refresh."""
        self.block_start, self.block_end = start, end
        self.region = (self.cols >= start) & (self.cols < end)
        self.phase = 0
        self.plan = None

    # ------------------------------------------------------------ one step
    def step(
        self,
        step: int,
        active: torch.Tensor,
        count: torch.Tensor,
        p_transfer: float,
        keep,
        last: bool = False,
    ) -> int:
        """Run step ``step`` (refresh or pruned) and commit its tokens into ``run.x``; returns its NFE.

        On the ``last`` step of a block, masks the pruned step could not reach (outside its candidates)
        are decoded by a full step instead, so a block always ends complete.
        """
        sets = None
        full = False
        if self.phase > 0 and self.plan is not None:
            sets = self._pruned_sets(active)
            if sets is None:
                logger.debug("Window-Diffusion: step %d leaves the frozen window; refreshing early", step)
            elif last and bool((self._masks() & active[:, None] & ~sets[1]).any()):
                logger.debug(
                    "Window-Diffusion: last step %d of the block decodes its far masks in full", step
                )
                sets, full = None, True
        if sets is None:
            nfe = self._refresh(step, active, count, p_transfer, keep, full=full)
            self.phase = 1 % self.config.refresh_cycle
        else:
            nfe = self._pruned(step, active, count, p_transfer, sets)
            self.phase = (self.phase + 1) % self.config.refresh_cycle
        return nfe

    def _masks(self) -> torch.Tensor:
        return (self.run.x == self.pipe.mask_token_id) & self.region

    def _decide(self, logits, candidates, count, active, **kwargs):
        return decide(logits, candidates, count, active, self.options, self.run.gens, **kwargs)

    def _refresh(self, step, active, count, p_transfer, keep, full: bool = False) -> int:
        run, cfg = self.run, self.config
        if self.processor is not None:
            self.processor.set_step(self.pipe.model, min(self.refreshes, self.planned_refreshes - 1))
        self.refreshes += 1
        self.state.refresh()
        x, start, end = run.x, self.block_start, self.block_end
        masks = self._masks()
        if not cfg.sliding or full:
            # a dense step: full forward (keys/values cached), decoded exactly as the dense pipeline
            logits, nfe = self.pipe._full_logits(run, keep)
            in_block = masks[:, start:end]
            chosen, commit = self._decide(logits, in_block, count, active, p_transfer=p_transfer)
            x[:, start:end] = torch.where(commit, chosen, x[:, start:end])
            decoded = torch.zeros_like(masks)
            decoded[:, start:end] = commit
            masks = self._masks()
            window_set = llada_window(x != self.pipe.mask_token_id, run.key_valid, masks, cfg.window)
            self.plan = {
                "window": window_set,
                "refresh_decoded": decoded,
                "pruned_decoded": torch.zeros_like(masks),
            }
            self._record(
                step, True, torch.ones_like(masks) & run.key_valid, window_set, self.total, self.total
            )
            return nfe
        # Dream rules: run the prefix before the window-th mask of the block; decode its leftmost mask
        sets = dream_refresh(masks, run.key_valid, cfg.window, cfg.active, end)
        length = sets.length
        logits, nfe = self._prefix_logits(sets.prefix, length, sets.span_masks)
        c_index, c_valid = self._pack(sets.span_masks)
        force = sets.first.gather(1, c_index.clamp(max=self.total - 1)) & c_valid
        chosen, commit = self._decide(
            logits, c_valid, torch.ones_like(count), active, p_transfer=p_transfer, force=force
        )
        self._commit(c_index, chosen, commit)
        window_set = torch.zeros_like(masks)
        window_set[:, :length] = sets.prefix
        self.plan = {"window": window_set, "span_start": sets.span_start}
        self._record(step, True, window_set, window_set, length, length)
        return nfe

    def _pruned_sets(self, active):
        """``(query, candidates)`` bool ``[B, N]`` of the next pruned step, or None if it would leave the window."""
        cfg, plan = self.config, self.plan
        decoded = None
        if not cfg.sliding:
            decoded = plan["pruned_decoded"]
            if plan.get("first", True):
                decoded = decoded | plan["refresh_decoded"]
        return pruned_sets(
            self._masks(),
            plan["window"],
            active,
            sliding=cfg.sliding,
            active=cfg.active,
            logits_shift=self.logits_shift,
            block_end=self.block_end,
            decoded=decoded,
            span_start=plan.get("span_start"),
        )

    def _pruned(self, step, active, count, p_transfer, sets) -> int:
        pipe, run = self.pipe, self.run
        query, candidates = sets
        q_index, q_valid = self._pack(query)
        use_cfg = run.cfg_scale > 0
        frozen = self.plan.get("frozen")
        if frozen is None:
            # first pruned step of the phase: the frozen window is packed and its keys/values copied once
            # into the cache's contiguous window buffer
            w_index, w_valid = pack_positions(self.plan["window"] & run.key_valid, self.total)
            if use_cfg:  # the unconditional rows attend to their own cache rows
                w_index, w_valid = torch.cat([w_index, w_index]), torch.cat([w_valid, w_valid])
            self.state.freeze_window(w_index, w_valid)
            key_mask = torch.zeros(w_valid.shape, dtype=pipe.dtype, device=w_valid.device)
            key_mask.masked_fill_(~w_valid, torch.finfo(pipe.dtype).min)
            frozen = self.plan["frozen"] = {"width": w_index.shape[1], "key_mask": key_mask[:, None, None, :]}
        clamped = q_index.clamp(max=self.total - 1)
        ids = torch.where(q_valid, run.x.gather(1, clamped), pipe.mask_token_id)
        positions = run.position_ids.gather(1, clamped)
        if use_cfg:  # the unconditional rows run the same tokens (never prompt) on their own cache
            ids, positions = torch.cat([ids, ids]), torch.cat([positions, positions])
            self.state.pruned(torch.cat([q_index, q_index]))
        else:
            self.state.pruned(q_index)
        kwargs = {"use_cache": False} if pipe._takes_use_cache else {}
        # the LM head runs only on the rows whose logits predict a candidate mask
        c_index, c_valid = self._pack(candidates)
        source = (c_index - 1) if self.logits_shift else c_index
        row = torch.searchsorted(q_index, source.contiguous()).clamp(max=q_index.shape[1] - 1)
        if pipe._takes_logits_to_keep:
            keep = torch.unique(row[c_valid]) if bool(c_valid.any()) else row.new_zeros(1)
            kwargs["logits_to_keep"] = keep
            row = torch.searchsorted(keep, row.contiguous()).clamp(max=keep.numel() - 1)
        # the window attention function reads the cache's key mask; this one only satisfies the model
        mask_4d = frozen["key_mask"].expand(-1, 1, ids.shape[1], -1)
        logits = pipe.model(input_ids=ids, attention_mask=mask_4d, position_ids=positions, **kwargs).logits
        if "logits_to_keep" in kwargs and logits.shape[1] != kwargs["logits_to_keep"].numel():
            logits = logits[:, kwargs["logits_to_keep"]]  # a model that takes the argument but ignores it
        logits = logits.float()
        nfe = 1
        if use_cfg:
            batch = run.x.shape[0]
            logits = cfg_combine(logits[:batch], logits[batch:], run.cfg_scale)
            nfe = 2
        c_logits = logits.gather(1, row[..., None].expand(-1, -1, logits.shape[-1]))
        chosen, commit = self._decide(c_logits, c_valid, count, active, p_transfer=p_transfer)
        decoded = self._commit(c_index, chosen, commit)
        if not self.config.sliding:
            self.plan["pruned_decoded"] |= decoded
            self.plan["first"] = False
        self._record(
            step, False, query, self.plan["window"] & run.key_valid, q_index.shape[1], frozen["width"]
        )
        return nfe

    # ------------------------------------------------------------ helpers
    def _pack(self, selected):
        return pack_positions(selected, self.total)

    def _commit(self, index, chosen, commit) -> torch.Tensor:
        """Write ``chosen`` at ``index`` where ``commit``; returns the committed positions ``[B, N]``."""
        b_idx, j_idx = commit.nonzero(as_tuple=True)
        pos = index[b_idx, j_idx]
        self.run.x[b_idx, pos] = chosen[b_idx, j_idx]
        decoded = torch.zeros_like(self.run.key_valid)
        decoded[b_idx, pos] = True
        return decoded

    def _prefix_logits(self, prefix, length, wanted):
        """Logits ``[B, K, V]`` at the packed positions of ``wanted`` from a forward of ``x[:, :length]``
        whose keys are ``prefix [B, length]`` (CFG combined); and the NFE."""
        pipe, run = self.pipe, self.run
        index, valid = self._pack(wanted)
        source = (index - 1) if self.logits_shift else index
        keep = (
            torch.unique(source[valid])
            if bool(valid.any())
            else torch.zeros(1, dtype=torch.long, device=index.device)
        )
        x = run.x[:, :length]
        positions = run.position_ids[:, :length]
        if run.cfg_scale > 0:
            unconditional = x.masked_fill(run.prompt_here[:, :length], pipe.mask_token_id)
            ids, valid_keys, positions = (
                torch.cat([x, unconditional]),
                torch.cat([prefix, prefix]),
                torch.cat([positions, positions]),
            )
        else:
            ids, valid_keys = x, prefix
        logits = pipe._logits(ids, bidirectional_mask(valid_keys, pipe.dtype), valid_keys, positions, keep)
        nfe = 1
        if run.cfg_scale > 0:
            batch = x.shape[0]
            logits = cfg_combine(logits[:batch], logits[batch:], run.cfg_scale)
            nfe = 2
        row = torch.searchsorted(keep, source.clamp(max=length - 1).contiguous()).clamp(max=keep.numel() - 1)
        return logits.gather(1, row[..., None].expand(-1, -1, logits.shape[-1])), nfe

    def _record(self, step, refresh, query, window, queries, keys) -> None:
        if self.state.stats is not None:
            self.state.stats.record(int(queries), int(keys))
        self.trace.append(
            {
                "step": step,
                "refresh": refresh,
                "queries": int(queries),
                "keys": int(keys),
                "active": query[0].nonzero().flatten().cpu(),
                "window": window[0].nonzero().flatten().cpu(),
            }
        )


__all__ = ["GenerationRun", "WindowedRun", "bidirectional_mask"]
