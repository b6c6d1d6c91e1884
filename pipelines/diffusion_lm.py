"""Masked-diffusion language-model generation (LLaDA style, with Dream's options).

Implements the sampler of LLaDA (Nie et al., 2025, "Large Language Diffusion Models"): the prompt is
followed by ``gen_length`` mask tokens split into semi-autoregressive blocks of ``block_length``; the
``steps`` are spread evenly over the blocks; each step predicts every mask, scores the predictions
(``remasking``) and commits the most confident ones inside the current block. Dream (Ye et al., 2025)
adds the right shift of logits and the entropy / margin confidences.

What this pipeline adds to the reference code:

- batches of prompts of different lengths (left padding, a padding-aware bidirectional 4D mask and
  position ids that start at 0 on each row's first real token);
- per-row randomness (row ``b`` uses seed ``seed + b``), so a row in a batch gives exactly the tokens it
  gives alone with that seed;
- classifier-free guidance as ONE batched forward per step (conditional rows, then unconditional rows);
- hooks for SparseD (``acceleration=[SparseDConfig()]``) and a step counter for the attention function.

The 4D mask handed to the model is additive float ``[B, 1, L, L]`` in the model dtype (0 = attend,
``finfo.min`` = padding key); it is an expanded view of ``[B, 1, 1, L]`` (stride 0 along queries), so it
costs O(B·L) memory. transformers passes a 4D mask through unchanged, so native ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` run bidirectionally with the eager and SDPA attention implementations.

Example:
    >>> from fastgen import SparseDConfig
    >>> from fastgen.pipelines import load_preset
    >>> pipe = load_preset("tiny-llada")
    >>> out = pipe(prompt="Hello", gen_length=64, steps=16, block_length=32,
    ...            acceleration=[SparseDConfig(block_size=32)])
    >>> out.texts[0]
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REMASKING = ("low_confidence", "random", "entropy", "margin")
"""Allowed ``remasking`` (confidence) strategies."""

SAMPLERS = ("llada", "dream")
"""Allowed ``sampler`` values: LLaDA's linear schedule or Dream's ``diffusion_generate`` schedule."""

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
"""Allowed ``alg`` (confidence) values of Dream's sampler."""

DREAM_EPS = 1e-3
"""Dream's final timestep: ``timesteps = linspace(1, eps, steps + 1)``."""

KNOWN_MASK_TOKEN_IDS = {"llada": 126336, "dream": 151666}
"""Mask token id per model family (LLaDA-8B / LLaDA-1.5: 126336; Dream-v0-7B: 151666)."""


@dataclass
class DiffusionLMOutput:
    """Result of :class:`DiffusionLMPipeline`."""

    sequences: torch.LongTensor
    """``[B, P + gen_length]``: left-padded prompts followed by the generated tokens."""
    texts: list[str] | None
    """Decoded generated part per row (cut at the first EOS) when the pipeline has a tokenizer."""
    steps_run: int
    """Denoising steps actually run (fewer than ``steps`` after a threshold or EOS early stop)."""
    nfe: int
    """Network function evaluations per row (a CFG step counts 2: conditional + unconditional)."""
    prompt_length: int = 0
    """``P``: padded prompt length; the generated part is ``sequences[:, P:]``."""
    window_trace: list[dict] | None = None
    """Window-Diffusion only: one dict per step (``step``, ``refresh``, ``queries`` and ``keys`` = rows run
    and keys attended per row (max over rows), ``active`` / ``window`` = batch row 0's positions, CPU)."""


def model_family(model) -> str | None:
    """``"llada"``, ``"dream"`` or ``None`` from the model config (``fastgen_family``, ``model_type``)."""
    config = getattr(model, "config", None)
    family = getattr(config, "fastgen_family", None)
    if family:
        return str(family).lower()
    model_type = str(getattr(config, "model_type", "") or "").lower()
    architectures = [a.lower() for a in (getattr(config, "architectures", None) or [])]
    if model_type == "llada" or any("llada" in a for a in architectures):
        return "llada"
    if model_type == "dream" or any("dream" in a for a in architectures):
        return "dream"
    return None


def resolve_mask_token_id(model, tokenizer=None) -> int:
    """The mask token id: ``config.fastgen_mask_token_id``, ``config.mask_token_id``, the family default,
    or the tokenizer's mask token; ``ValueError`` if none is known."""
    config = getattr(model, "config", None)
    for name in ("fastgen_mask_token_id", "mask_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    family = model_family(model)
    if family in KNOWN_MASK_TOKEN_IDS:
        return KNOWN_MASK_TOKEN_IDS[family]
    value = getattr(tokenizer, "mask_token_id", None)
    if isinstance(value, int):
        return value
    raise ValueError(
        f"mask_token_id=None and it cannot be inferred for model={type(model).__name__}; pass the id of the "
        f"mask token (known families: {KNOWN_MASK_TOKEN_IDS})"
    )


def dream_transfer_count(
    mask_count: torch.Tensor, step: int, steps: int, eps: float = DREAM_EPS
) -> torch.Tensor:
    """Tokens Dream's sampler commits at ``step`` (0-based) of ``steps`` for ``mask_count [B]`` masks.

    As Dream's ``diffusion_generate``: with ``timesteps = linspace(1, eps, steps + 1)`` (float32),
    ``t = timesteps[step]``, ``s = timesteps[step + 1]``, it commits ``int(mask_count * (1 - s / t))``
    and, at the last step, every mask left. (Dream averages ``mask_count`` over the batch; here each
    row uses its own, so a row in a batch commits what it commits alone.)
    """
    if step == steps - 1:
        return mask_count.clone()
    timesteps = torch.linspace(1, eps, steps + 1, device=mask_count.device)
    t, s = timesteps[step], timesteps[step + 1]
    return (mask_count.float() * (1 - s / t)).long()


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens committed at each of ``steps`` steps for ``mask_count`` masks per row: ``[B] -> [B, steps]``.

    As LLaDA's ``get_num_transfer_tokens``: ``mask_count // steps`` each step, the remainder spread one
    by one over the first steps.
    """
    base = mask_count // steps
    remainder = mask_count % steps
    step_index = torch.arange(steps, device=mask_count.device)
    return base[:, None] + (step_index[None, :] < remainder[:, None]).long()


def bidirectional_mask(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive full mask ``[B, 1, L, L]`` (0 attend, ``finfo.min`` padding key) from ``key_valid [B, L]``.

    Returned as an expanded (stride-0 along queries) view, so it costs O(B·L) memory.
    """
    b, n = key_valid.shape
    row = torch.zeros(b, 1, 1, n, dtype=dtype, device=key_valid.device)
    row.masked_fill_(~key_valid[:, None, None, :], torch.finfo(dtype).min)
    return row.expand(b, 1, n, n)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _lm_processor_module(model):
    """``fastgen.processors.transformers_lm`` when ``model`` has fastgen attention applied and the module
    offers the generation hooks; else ``None``."""
    if getattr(model, "_fastgen_adapter", None) is None:
        return None
    try:
        module = importlib.import_module("fastgen.processors.transformers_lm")
    except ModuleNotFoundError:
        return None
    if not all(hasattr(module, f) for f in ("begin_generation", "set_step", "end_generation")):
        return None
    return module


def _dream_p_transfer(step: int, steps: int, eps: float = DREAM_EPS) -> float:
    """Dream's ``1 - s / t`` at ``step`` of ``steps`` (float32 timesteps, as its sampler)."""
    timesteps = torch.linspace(1, eps, steps + 1)
    return float(1 - timesteps[step + 1] / timesteps[step])


def _recorded_window_config(model):
    """The WindowDiffusionConfig recorded on ``model`` by ``apply_sparse_attention`` (None if none)."""
    return getattr(model, "_fastgen_window_config", None)


@dataclass
class _Run:
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


class _WindowedRun:
    """The Window-Diffusion loop body: refresh and pruned steps, the phase plan, the trace.

    Sets are bool ``[B, N]`` over positions. LLaDA rules (``sliding=False``): after a refresh, window =
    every non-mask position plus the ``window`` leftmost masks of the current block; active = the
    ``active`` leftmost masks, plus the tokens decoded at this phase's pruned steps, plus (first pruned
    step only) the tokens decoded at the refresh. Dream rules (``sliding=True``): the refresh runs the
    prefix before the ``window``-th mask of the block and decodes the leftmost mask; pruned steps run the
    span from that token to just before the current ``active + 1``-th mask (the block's end when there is
    none) and attend to the refresh prefix. With a logit shift, the position before every candidate mask
    also runs (its logits predict the mask). A pruned
    step whose rows would leave the frozen window (only possible with confidence-threshold decoding or
    Dream's schedule committing more than ``ceil(block/steps)`` tokens) becomes a refresh step instead.
    """

    def __init__(self, pipe, run, config, num_blocks, steps_per_block, logits_shift, decide):
        self.pipe, self.run, self.config = pipe, run, config
        self.logits_shift, self.decide = logits_shift, decide
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
        from fastgen.processors import transformers_lm as adapter

        self.processor = processor
        self.state = adapter.begin_window(self.pipe.model, self.total)

    def end(self) -> None:
        from fastgen.processors import transformers_lm as adapter

        adapter.end_window(self.pipe.model)

    def begin_block(self, start: int, end: int) -> None:
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

    def _refresh(self, step, active, count, p_transfer, keep, full: bool = False) -> int:
        from fastgen.attention.window import leftmost

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
            chosen, commit = self.pipe._decide(
                logits, in_block, count, active, p_transfer=p_transfer, **self.decide
            )
            x[:, start:end] = torch.where(commit, chosen, x[:, start:end])
            decoded = torch.zeros_like(masks)
            decoded[:, start:end] = commit
            masks = self._masks()
            window_set = (~(x == self.pipe.mask_token_id) & run.key_valid) | leftmost(masks, cfg.window)
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
        rank = torch.cumsum(masks.long(), dim=1)
        at_window = masks & (rank == cfg.window)
        cut = torch.where(at_window.any(1), at_window.long().argmax(1), torch.full_like(rank[:, 0], end))
        length = int(cut.max().item())
        prefix = (self.cols[None, :length] < cut[:, None]) & run.key_valid[:, :length]
        span_masks = leftmost(masks, cfg.active)
        first = leftmost(masks, 1)
        logits, nfe = self._prefix_logits(prefix, length, span_masks)
        c_index, c_valid = self._pack(span_masks)
        force = first.gather(1, c_index.clamp(max=self.total - 1)) & c_valid
        chosen, commit = self.pipe._decide(
            logits, c_valid, torch.ones_like(count), active, p_transfer=p_transfer, force=force, **self.decide
        )
        self._commit(c_index, chosen, commit)
        window_set = torch.zeros_like(masks)
        window_set[:, :length] = prefix
        span_start = torch.where(first.any(1), first.long().argmax(1), torch.full_like(cut, self.total))
        self.plan = {"window": window_set, "span_start": span_start}
        self._record(step, True, window_set, window_set, length, length)
        return nfe

    def _pruned_sets(self, active):
        """``(query, candidates)`` bool ``[B, N]`` of the next pruned step, or None if it would leave the window."""
        from fastgen.attention.window import leftmost

        cfg, plan = self.config, self.plan
        masks = self._masks()
        if not cfg.sliding:
            query = leftmost(masks, cfg.active) | plan["pruned_decoded"]
            if plan.get("first", True):
                query = query | plan["refresh_decoded"]
            candidates = query & masks
        else:
            # the span ends before the (active + 1)-th mask, or at the block's end when there is none: the
            # reference's `ranks <= active`, so tokens decoded after the last mask stay recomputed
            rank = torch.cumsum(masks.long(), dim=1)
            after = masks & (rank == cfg.active + 1)
            block_end = torch.full_like(plan["span_start"], self.block_end)
            span_end = torch.where(after.any(1), after.long().argmax(1), block_end)
            query = (self.cols[None] >= plan["span_start"][:, None]) & (self.cols[None] < span_end[:, None])
            candidates = query & masks
        if self.logits_shift:
            query = query | torch.roll(candidates, -1, dims=1)  # position p - 1 predicts mask p
        outside = query & ~plan["window"] & active[:, None]
        if bool(outside.any()):
            return None
        return query & active[:, None], candidates & active[:, None]

    def _pruned(self, step, active, count, p_transfer, sets) -> int:
        from fastgen.attention.window import pack_positions

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
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + (run.cfg_scale + 1.0) * (cond - uncond)
            nfe = 2
        c_logits = logits.gather(1, row[..., None].expand(-1, -1, logits.shape[-1]))
        chosen, commit = pipe._decide(c_logits, c_valid, count, active, p_transfer=p_transfer, **self.decide)
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
        from fastgen.attention.window import pack_positions

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
            logits = logits[batch:] + (run.cfg_scale + 1.0) * (logits[:batch] - logits[batch:])
            nfe = 2
        row = torch.searchsorted(keep, source.clamp(max=length - 1).contiguous()).clamp(max=keep.numel() - 1)
        return logits.gather(1, row[..., None].expand(-1, -1, logits.shape[-1])), nfe

    def _record(self, step, refresh, query, window, queries, keys) -> None:
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


class DiffusionLMPipeline:
    """Generate text with a masked-diffusion LM (LLaDA, Dream, or any transformers model returning logits).

    Args:
        model: a transformers model whose output has ``.logits`` ``[B, L, V]``. Models whose ``forward``
            takes ``position_ids`` (native ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, Dream) get the
            bidirectional 4D mask and left-padding-aware position ids; others get the 2D padding mask.
        tokenizer: optional; needed for ``prompt=`` strings and ``.texts``.
        mask_token_id: id of the mask token; inferred from the config / family / tokenizer when ``None``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, mask_token_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = (
            int(mask_token_id) if mask_token_id is not None else resolve_mask_token_id(model, tokenizer)
        )
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._takes_use_cache = "use_cache" in params

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model parameters."""
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model takes (``max_position_embeddings`` / ``max_sequence_length``)."""
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    # ---------------------------------------------------------------- inputs
    def _prompt_rows(self, prompt, input_ids, attention_mask) -> list[list[int]]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt= (strings) or input_ids= (token ids)")
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError(
                    "prompt= needs a tokenizer; pass tokenizer= to the pipeline or use input_ids="
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
            return [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(
                f"input_ids must be an integer tensor [L] or [B, L], got shape {tuple(ids.shape)}"
            )
        if attention_mask is None:
            keep = torch.ones_like(ids, dtype=torch.bool)
        else:
            keep = torch.as_tensor(attention_mask).reshape(ids.shape).bool()
        # padding may be on either side: keep the real tokens of each row, re-pad on the left below
        return [row[k].tolist() for row, k in zip(ids.cpu(), keep.cpu())]

    def _pad_id(self) -> int:
        for source in (self.tokenizer, getattr(self.model, "config", None)):
            value = getattr(source, "pad_token_id", None)
            if isinstance(value, int) and value != self.mask_token_id:
                return value
        return 0

    def _generators(self, generator, batch: int, device: torch.device) -> list[torch.Generator]:
        if generator is None:
            seeds = [int(torch.randint(0, 2**62, ()).item()) + b for b in range(batch)]
        elif isinstance(generator, torch.Generator):
            base = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device).item())
            seeds = [base + b for b in range(batch)]
        elif isinstance(generator, int) and not isinstance(generator, bool):
            seeds = [generator + b for b in range(batch)]
        elif isinstance(generator, Sequence) and len(generator) == batch:
            seeds = [int(s) for s in generator]
        else:
            raise ValueError(
                f"generator={generator!r} must be None, an int seed (row b uses seed + b), a torch.Generator "
                f"or a list of {batch} per-row seeds"
            )
        gens = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(s)
            gens.append(g)
        return gens

    # ---------------------------------------------------------------- model call
    def _logits(self, ids, attn_mask_4d, key_valid, position_ids, keep) -> torch.Tensor:
        """Logits ``[B, len(keep), V]`` of the positions ``keep`` for the sequences ``ids``."""
        kwargs = {}
        if self._takes_position_ids:
            kwargs["attention_mask"] = attn_mask_4d
            kwargs["position_ids"] = position_ids
        elif not bool(key_valid.all()):
            kwargs["attention_mask"] = key_valid.long()
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(input_ids=ids, **kwargs).logits
        if not self._takes_logits_to_keep or logits.shape[1] != keep.numel():
            logits = logits[:, keep]
        return logits.float()

    # ---------------------------------------------------------------- generation
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gen_length: int = 128,
        steps: int = 128,
        block_length: int | None = None,
        remasking: str = "low_confidence",
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        confidence_threshold: float | None = None,
        logits_shift: bool | None = None,
        sampler: str | None = None,
        alg: str | None = None,
        alg_temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        generator: int | torch.Generator | Sequence[int] | None = None,
        acceleration=None,
        progress: bool = True,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> DiffusionLMOutput:
        """Generate ``gen_length`` tokens after each prompt.

        Args:
            prompt: a string or list of strings (needs a tokenizer); or pass ``input_ids``.
            input_ids: ``[L]`` or ``[B, L]`` token ids; with ``attention_mask`` (1 = real token, padding
                on either side) for a padded batch.
            gen_length: tokens to generate (a multiple of ``block_length``).
            steps: denoising steps over the whole generation (a multiple of the number of blocks).
            block_length: semi-autoregressive block length; tokens are committed inside the current
                block only. ``None``: ``gen_length`` (one block) with Window-Diffusion or Dream's sampler
                (neither has blocks in its reference), else 32. With Window-Diffusion and
                ``block_length < gen_length`` the active and window sets stay inside the current block
                (later blocks are far field) and every block starts with a refresh step.
            remasking: LLaDA sampler's confidence used to pick tokens to commit: ``"low_confidence"``
                (probability of the chosen token), ``"random"``, ``"entropy"`` (minus the entropy) or
                ``"margin"`` (top-1 minus top-2 probability).
            temperature: 0 = greedy; > 0 samples with float64 Gumbel-max noise as LLaDA.
            cfg_scale: classifier-free guidance, ``un + (cfg_scale + 1)(cond - un)``; the unconditional
                branch has the prompt replaced by masks; both run in one batched forward.
            confidence_threshold: also commit every masked token of the block whose confidence exceeds
                this (at least the scheduled count, at least one); a block may end in fewer steps.
            logits_shift: shift logits right by one (Dream); ``None`` = on for the Dream family.
            sampler: ``"llada"`` (linear schedule, ``remasking``, Gumbel-max sampling) or ``"dream"`` (Dream's
                ``diffusion_generate``: ``int(n_masked * (1 - s / t))`` tokens per step on the timesteps
                ``linspace(1, 1e-3, steps + 1)`` of each block, ``alg`` confidences); ``None`` = Dream's for
                the Dream family, LLaDA's otherwise.
            alg: Dream's confidence: ``"origin"`` (each mask commits with probability ``1 - s / t``),
                ``"maskgit_plus"`` (probability), ``"topk_margin"`` (top-1 minus top-2) or ``"entropy"``
                (minus the entropy; the default, as Dream's published settings).
            alg_temp: Dream: > 0 draws the committed positions from ``softmax(confidence / alg_temp)``
                instead of taking the most confident.
            top_p: Dream: nucleus filtering of the logits before sampling, in (0, 1].
            top_k: Dream: keep the ``top_k`` largest logits before sampling.
            eos_token_id: id(s) of EOS/EoT; once a block of a row is complete and the row holds one, the
                rest of that row is filled with it and the row stops; all rows stopped ends generation.
            generator: int seed (row ``b`` uses ``seed + b``), a list of per-row seeds, a
                ``torch.Generator`` (draws the base seed) or ``None`` (base seed from torch's global RNG).
            acceleration: a config or list of configs (e.g. ``SparseDConfig``) applied with
                ``fastgen.apply_sparse_attention`` for this call only (skipped if the model already has
                fastgen attention applied by the user). A ``WindowDiffusionConfig`` in the list (at most
                one) runs Window-Diffusion; ``[WindowDiffusionConfig(), SparseDConfig()]`` composes the
                two (SparseD's patterns on the refresh steps). ``None`` fields of the config take the
                model family's defaults.
            progress: show a tqdm bar over steps.
            callback: ``callback(step, sequences)`` after every step (``sequences`` is a copy).
        """
        from fastgen.configs import WindowDiffusionConfig

        _check_int("gen_length", gen_length)
        _check_int("steps", steps)
        family = model_family(self.model)
        configs = (
            []
            if acceleration is None
            else list(acceleration)
            if isinstance(acceleration, (list, tuple))
            else [acceleration]
        )
        window_configs = [c for c in configs if isinstance(c, WindowDiffusionConfig)]
        configs = [c for c in configs if not isinstance(c, WindowDiffusionConfig)]
        if len(window_configs) > 1:
            raise ValueError(
                f"acceleration holds {len(window_configs)} WindowDiffusionConfig; allowed: at most one"
            )
        window = window_configs[0] if window_configs else _recorded_window_config(self.model)
        # >>> Fast-dLLM hook (issue 25; pipelines/fast_dllm.py owns the rest; port after the split)
        from .fast_dllm import split_fast_dllm

        fast_dllm, configs = split_fast_dllm(configs, window_configs[0] if window_configs else None)
        if fast_dllm is not None and confidence_threshold is not None:
            raise ValueError(
                f"confidence_threshold={confidence_threshold!r} with a FastDLLMConfig; allowed: None "
                "(the config's threshold / factor decides)"
            )
        if fast_dllm is not None:
            if block_length not in (None, fast_dllm.block_length):
                raise ValueError(
                    f"block_length={block_length!r} differs from FastDLLMConfig.block_length="
                    f"{fast_dllm.block_length}; allowed: None or {fast_dllm.block_length}"
                )
            block_length = fast_dllm.block_length  # Fast-dLLM runs each block until it is full:
            steps = max(
                1, gen_length // block_length
            )  # steps is nominal (one per block), as its scripts pass
        # <<< Fast-dLLM hook
        if window is not None:
            window = window.resolved(family)
        if sampler is None:
            sampler = "dream" if family == "dream" else "llada"
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}")
        dream_options = {"alg": alg, "alg_temp": alg_temp, "top_p": top_p, "top_k": top_k}
        if sampler != "dream":
            for name, value in dream_options.items():
                if value is not None:
                    what = f"a {family!r} checkpoint" if family else "this model"
                    raise ValueError(
                        f"{name}={value!r} is an option of Dream's sampler, but {what} uses sampler="
                        f"{sampler!r}; allowed: {name}=None, or pass sampler='dream'"
                    )
        else:
            alg = "entropy" if alg is None else alg
            if alg not in DREAM_ALGS:
                raise ValueError(f"alg={alg!r} is unknown; allowed: {', '.join(DREAM_ALGS)}")
            if alg_temp is not None and (
                isinstance(alg_temp, bool)
                or not isinstance(alg_temp, (int, float))
                or not math.isfinite(alg_temp)
                or alg_temp < 0
            ):
                raise ValueError(f"alg_temp={alg_temp!r} must be None or a finite number >= 0")
            if top_p is not None and (
                isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
            ):
                raise ValueError(f"top_p={top_p!r} is out of range; allowed: None or 0 < top_p <= 1")
            if top_k is not None:
                _check_int("top_k", top_k)
        if block_length is None:
            block_length = gen_length if (window is not None or sampler == "dream") else 32
        _check_int("block_length", block_length)
        if gen_length % block_length:
            raise ValueError(
                f"block_length={block_length} must divide gen_length={gen_length} (allowed: divisors of gen_length)"
            )
        num_blocks = gen_length // block_length
        if steps % num_blocks:
            raise ValueError(
                f"steps={steps} must be a multiple of the number of blocks gen_length/block_length={num_blocks}"
            )
        if remasking not in REMASKING:
            raise ValueError(f"remasking={remasking!r} is unknown; allowed: {', '.join(REMASKING)}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
        if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg_scale={cfg_scale!r} must be a finite number >= 0")
        if confidence_threshold is not None and (
            not isinstance(confidence_threshold, (int, float)) or not math.isfinite(confidence_threshold)
        ):
            raise ValueError(f"confidence_threshold={confidence_threshold!r} must be None or a finite number")

        rows = self._prompt_rows(prompt, input_ids, attention_mask)
        prompt_length = max(len(r) for r in rows)
        total = prompt_length + gen_length
        limit = self.max_positions
        if limit is not None and total > limit:
            raise ValueError(
                f"gen_length={gen_length} plus the prompt ({prompt_length} tokens) = {total} exceeds the model's "
                f"max_position_embeddings={limit}"
            )
        if logits_shift is None:
            logits_shift = model_family(self.model) == "dream"
        if logits_shift and prompt_length == 0:
            raise ValueError("logits_shift=True needs a prompt of at least one token")
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])

        # >>> Fast-dLLM hook (issue 25)
        if fast_dllm is not None:
            from .fast_dllm import run_fast_dllm

            extra = {"alg_temp": alg_temp, "top_p": top_p, "top_k": top_k}
            if sampler == "dream" and alg != "entropy":
                extra["alg"] = alg
            given = {k: v for k, v in extra.items() if v is not None}
            if cfg_scale > 0 or remasking != "low_confidence" or given:
                raise ValueError(
                    f"cfg_scale={cfg_scale!r}, remasking={remasking!r}, {given} with a FastDLLMConfig; allowed: "
                    "cfg_scale=0, remasking='low_confidence', no Dream sampler options (Fast-dLLM's own rule)"
                )
            logger.info(
                "Fast-dLLM (%s): blocks of %d run until full; steps is not used",
                fast_dllm.cache,
                block_length,
            )
            return run_fast_dllm(
                self, fast_dllm, rows, prompt_length=prompt_length, gen_length=gen_length,
                temperature=float(temperature), logits_shift=bool(logits_shift), eos_ids=eos_ids,
                generator=generator, callback=callback,
            )  # fmt: skip
        # <<< Fast-dLLM hook
        if window is not None:
            self._check_window(window, gen_length, steps, block_length)
        user_applied = getattr(self.model, "_fastgen_adapter", None) is not None
        if configs and user_applied:
            logger.info("model already has fastgen attention applied; ignoring acceleration=%s", configs)
            configs = []
        import fastgen

        try:
            for config in configs:
                fastgen.apply_sparse_attention(self.model, config)
            with torch.no_grad():
                sequences, steps_run, nfe, trace = self._generate(
                    rows,
                    window=window,
                    sampler=sampler,
                    dream=dict(alg=alg, alg_temp=alg_temp, top_p=top_p, top_k=top_k),
                    prompt_length=prompt_length,
                    gen_length=gen_length,
                    steps=steps,
                    block_length=block_length,
                    remasking=remasking,
                    temperature=float(temperature),
                    cfg_scale=float(cfg_scale),
                    confidence_threshold=confidence_threshold,
                    logits_shift=bool(logits_shift),
                    eos_ids=eos_ids,
                    generator=generator,
                    progress=progress,
                    callback=callback,
                )
        finally:
            if configs:
                fastgen.remove_sparse_attention(self.model)

        texts = None
        if self.tokenizer is not None:
            stop = set(eos_ids)
            if not stop and isinstance(getattr(self.tokenizer, "eos_token_id", None), int):
                stop = {self.tokenizer.eos_token_id}
            texts = []
            for row in sequences[:, prompt_length:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return DiffusionLMOutput(
            sequences=sequences,
            texts=texts,
            steps_run=steps_run,
            nfe=nfe,
            prompt_length=prompt_length,
            window_trace=trace,
        )

    def _check_window(self, window, gen_length: int, steps: int, block_length: int) -> None:
        """Validate a resolved :class:`WindowDiffusionConfig` against this call (``ValueError``)."""
        if not self._takes_position_ids:
            raise ValueError(
                f"Window-Diffusion needs a model whose forward takes position_ids (the active tokens run at "
                f"their absolute positions); model={type(self.model).__name__} does not; allowed: "
                "transformers models using AttentionInterface (LlamaForCausalLM, Qwen2ForCausalLM, ...)"
            )
        if gen_length % block_length or steps % (gen_length // block_length):
            return  # reported by the block checks of __call__
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

    def _prepare(self, rows, prompt_length: int, gen_length: int, cfg_scale: float, generator) -> _Run:
        """The initial sequences, masks and position ids of one generation."""
        device, mask_id = self.device, self.mask_token_id
        batch, total = len(rows), prompt_length + gen_length
        x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
        key_valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        prompt_here = torch.zeros(batch, total, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            pad = prompt_length - len(row)
            x[b, :pad] = self._pad_id()
            x[b, pad:prompt_length] = torch.tensor(row, dtype=torch.long, device=device)
            key_valid[b, :pad] = False
            prompt_here[b, pad:prompt_length] = True
        # positions start at 0 on each row's first real token (as the prompt alone would have them)
        position_ids = (torch.cumsum(key_valid.long(), dim=1) - 1).clamp_min(0)
        use_cfg = cfg_scale > 0
        model_valid = torch.cat([key_valid, key_valid]) if use_cfg else key_valid
        model_positions = torch.cat([position_ids, position_ids]) if use_cfg else position_ids
        return _Run(
            x=x,
            key_valid=key_valid,
            prompt_here=prompt_here,
            position_ids=position_ids,
            gens=self._generators(generator, batch, device),
            cfg_scale=cfg_scale,
            model_valid=model_valid,
            model_positions=model_positions,
            mask_4d=bidirectional_mask(model_valid, self.dtype) if self._takes_position_ids else None,
        )

    def _full_logits(self, run: _Run, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits ``[B, len(keep), V]`` of a forward over the whole sequence (CFG combined) and its NFE."""
        x = run.x
        if run.cfg_scale > 0:
            unconditional = x.masked_fill(run.prompt_here, self.mask_token_id)
            both = self._logits(
                torch.cat([x, unconditional]), run.mask_4d, run.model_valid, run.model_positions, keep
            )
            batch = x.shape[0]
            cond, uncond = both[:batch], both[batch:]
            return uncond + (run.cfg_scale + 1.0) * (cond - uncond), 2
        return self._logits(x, run.mask_4d, run.model_valid, run.model_positions, keep), 1

    def _decide(
        self,
        logits: torch.Tensor,
        candidates: torch.Tensor,
        count: torch.Tensor,
        active: torch.Tensor,
        *,
        sampler: str,
        remasking: str,
        temperature: float,
        dream: dict,
        confidence_threshold: float | None,
        gens,
        p_transfer: float = 1.0,
        force: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen tokens and the commit decision ``[B, L]`` for candidate slots ``candidates [B, L]``.

        ``count [B]`` tokens are committed per active row (more with ``confidence_threshold``, at least
        one then); ``force`` marks slots committed first whatever their confidence.
        """
        if self.mask_token_id < logits.shape[-1]:
            # never "commit" the mask token itself (an untrained model may predict it)
            logits[..., self.mask_token_id] = -math.inf
        if sampler == "dream":
            chosen, confidence = self._predict_dream(logits, dream, temperature, gens, active)
        else:
            chosen, confidence = self._predict(logits, remasking, temperature, gens, active)
        confidence = confidence.masked_fill(~candidates, -math.inf)
        if force is not None:
            confidence = confidence.masked_fill(force & candidates, math.inf)
        count = torch.where(active, count, 0)
        if confidence_threshold is not None:
            above = ((confidence > confidence_threshold) & candidates).sum(1)
            count = torch.where(active, torch.maximum(torch.maximum(count, above), torch.ones_like(count)), 0)
        batch, length = candidates.shape
        if sampler == "dream" and dream["alg"] == "origin" and force is None:
            # Dream's "origin": every mask commits with probability 1 - s / t (1 at the last step)
            draw = torch.ones(batch, length, dtype=torch.float64, device=logits.device)
            for b in range(batch):
                if bool(active[b]):
                    draw[b] = torch.rand(length, generator=gens[b], dtype=torch.float64, device=logits.device)
            commit = (draw < p_transfer) & candidates & active[:, None]
            if confidence_threshold is not None:
                commit |= (confidence > confidence_threshold) & candidates & active[:, None]
            return chosen, commit
        if sampler == "dream" and dream["alg_temp"] and force is None:
            # positions drawn from softmax(confidence / alg_temp) without replacement
            commit = torch.zeros(batch, length, dtype=torch.bool, device=logits.device)
            weights = torch.softmax(confidence / dream["alg_temp"], dim=-1)
            for b in range(batch):
                n = int(min(int(count[b]), int(candidates[b].sum())))
                if bool(active[b]) and n > 0:
                    picked = torch.multinomial(weights[b].float(), n, replacement=False, generator=gens[b])
                    commit[b, picked] = True
            return chosen, commit & candidates
        order = confidence.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(length, device=logits.device).expand_as(order)
        )
        return chosen, (rank < count[:, None]) & candidates

    def _generate(
        self,
        rows,
        *,
        window,
        sampler,
        dream,
        prompt_length,
        gen_length,
        steps,
        block_length,
        remasking,
        temperature,
        cfg_scale,
        confidence_threshold,
        logits_shift,
        eos_ids,
        generator,
        progress,
        callback,
    ):
        from tqdm.auto import tqdm

        run = self._prepare(rows, prompt_length, gen_length, cfg_scale, generator)
        device, mask_id = self.device, self.mask_token_id
        x = run.x
        batch = x.shape[0]
        decide = dict(
            sampler=sampler,
            remasking=remasking,
            temperature=temperature,
            dream=dream,
            confidence_threshold=confidence_threshold,
            gens=run.gens,
        )
        processor = _lm_processor_module(self.model)
        num_blocks = gen_length // block_length
        steps_per_block = steps // num_blocks
        windowed = None
        if window is not None:
            windowed = _WindowedRun(self, run, window, num_blocks, steps_per_block, logits_shift, decide)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        step = nfe = 0
        bar = tqdm(total=steps, disable=not progress, desc="diffusion-LM steps", leave=False)
        if processor is not None:
            total_steps = windowed.planned_refreshes if windowed is not None else steps
            # the model gets the pipeline's own padding mask (run.mask_4d): declare it, so the
            # processor never reads the mask's values (no host read; traceable by torch.compile)
            declared = run.model_valid if run.mask_4d is not None else None
            processor.begin_generation(
                self.model, total_steps=total_steps, prompt_length=prompt_length, key_valid=declared
            )
        try:
            if windowed is not None:
                windowed.begin(processor)
            for block in range(num_blocks):
                start = prompt_length + block * block_length
                end = start + block_length
                positions = torch.arange(start, end, device=device)
                keep = (positions - 1).clamp_min(0) if logits_shift else positions
                schedule = num_transfer_tokens((x[:, start:end] == mask_id).sum(1), steps_per_block)
                if windowed is not None:
                    windowed.begin_block(start, end)
                for i in range(steps_per_block):
                    in_block = x[:, start:end] == mask_id  # [B, bl]
                    active = in_block.any(1) & ~done
                    if not bool(active.any()):
                        break
                    if sampler == "dream":
                        count = dream_transfer_count(in_block.sum(1), i, steps_per_block)
                        p_transfer = (
                            1.0 if i == steps_per_block - 1 else _dream_p_transfer(i, steps_per_block)
                        )
                    else:
                        count, p_transfer = schedule[:, i], 1.0
                    if windowed is not None:
                        last = i == steps_per_block - 1
                        nfe += windowed.step(step, active, count, p_transfer, keep, last=last)
                    else:
                        if processor is not None:
                            processor.set_step(self.model, step)
                        logits, calls = self._full_logits(run, keep)
                        nfe += calls
                        chosen, commit = self._decide(
                            logits, in_block, count, active, p_transfer=p_transfer, **decide
                        )
                        x[:, start:end] = torch.where(commit, chosen, x[:, start:end])
                    step += 1
                    bar.update(1)
                    if callback is not None:
                        callback(step - 1, x.clone())
                if eos_ids:
                    finished = (x[:, start:end] != mask_id).all(1)
                    has_eos = torch.isin(x[:, prompt_length:end], torch.tensor(eos_ids, device=device)).any(1)
                    stop = finished & has_eos & ~done
                    if bool(stop.any()):
                        rest = x[:, end:]
                        x[:, end:] = torch.where(stop[:, None] & (rest == mask_id), eos_ids[0], rest)
                        done |= stop
                    if bool(done.all()):
                        break
        finally:
            bar.close()
            if windowed is not None:
                windowed.end()
            if processor is not None:
                processor.end_generation(self.model)
        return x, step, nfe, (windowed.trace if windowed is not None else None)

    @staticmethod
    def _predict_dream(logits, dream, temperature, gens, active):
        """Dream's ``sample_tokens``: chosen tokens ``[B, L]`` and confidences ``[B, L]`` (float64).

        Logits are divided by ``temperature`` (> 0), filtered by ``top_p`` / ``top_k``; greedy takes the
        most probable token, otherwise a token is drawn from each row's generator. Confidence: its
        probability (``origin`` / ``maskgit_plus``), top-1 minus top-2 probability (``topk_margin``) or
        minus the entropy (``entropy``).
        """
        logits = logits.float()
        if temperature > 0:
            logits = logits / temperature
        top_p, top_k = dream["top_p"], dream["top_k"]
        if top_p is not None and top_p < 1:
            sorted_logits, sorted_index = torch.sort(logits, descending=True)
            cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
            remove = cumulative > top_p
            remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
            remove[..., 0] = False
            drop = torch.zeros_like(remove).scatter_(-1, sorted_index, remove)
            logits = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
        if top_k is not None:
            k = min(int(top_k), logits.shape[-1])
            logits = logits.masked_fill(
                logits < torch.topk(logits, k)[0][..., -1, None], torch.finfo(logits.dtype).min
            )
        probs = torch.softmax(logits, dim=-1)
        if temperature > 0:
            batch, length, _ = probs.shape
            chosen = probs.argmax(-1)
            for b in range(batch):
                if bool(active[b]) and length:
                    chosen[b] = torch.multinomial(probs[b], 1, generator=gens[b]).squeeze(-1)
            confidence = probs.gather(-1, chosen[..., None]).squeeze(-1)
        else:
            confidence, chosen = probs.max(dim=-1)
        if dream["alg"] == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[..., 0] - top2[..., 1]
        elif dream["alg"] == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        return chosen, confidence.double()

    @staticmethod
    def _predict(logits, remasking, temperature, gens, active):
        """Chosen tokens ``[B, bl]`` and their confidences ``[B, bl]`` (float64) from ``logits [B, bl, V]``.

        Randomness is drawn per row from that row's generator, and only for active rows, so a row's stream
        does not depend on the other rows of the batch.
        """
        batch, length, vocab = logits.shape
        if temperature > 0:
            noisy = torch.empty(batch, length, vocab, dtype=torch.float64, device=logits.device)
            for b in range(batch):
                if bool(active[b]):
                    u = torch.rand(
                        length, vocab, generator=gens[b], dtype=torch.float64, device=logits.device
                    )
                    # Gumbel-max in LLaDA's form: exp(logits) / (-log u)^temperature, in float64
                    noisy[b] = logits[b].double().exp() / (-torch.log(u)) ** temperature
                else:
                    noisy[b] = logits[b].double()
            chosen = noisy.argmax(-1)
        else:
            chosen = logits.argmax(-1)
        if remasking == "random":
            confidence = torch.zeros(batch, length, dtype=torch.float64, device=logits.device)
            for b in range(batch):
                if bool(active[b]):
                    confidence[b] = torch.rand(
                        length, generator=gens[b], dtype=torch.float64, device=logits.device
                    )
            return chosen, confidence
        probs = F.softmax(logits, dim=-1)
        if remasking == "low_confidence":
            confidence = probs.gather(-1, chosen[..., None]).squeeze(-1)
        elif remasking == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        else:  # margin
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[..., 0] - top2[..., 1]
        return chosen, confidence.double()


__all__ = [
    "KNOWN_MASK_TOKEN_IDS",
    "REMASKING",
    "DiffusionLMOutput",
    "DiffusionLMPipeline",
    "DREAM_ALGS",
    "SAMPLERS",
    "bidirectional_mask",
    "dream_transfer_count",
    "model_family",
    "num_transfer_tokens",
    "resolve_mask_token_id",
]
