"""Fast-dLLM (NVlabs/Fast-dLLM v1) for :class:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline`:
block-wise prefix / dual KV cache with confidence-aware parallel decoding, on transformers' native
classes (``LlamaForCausalLM`` for LLaDA, ``Qwen2ForCausalLM`` for Dream, run bidirectionally).

What its code does (``llada/generate.py``, ``dream/model/generation_utils_block.py``; see
``FastDLLMConfig`` for the options), and how this module states it:

- The answer is decoded in blocks, left to right. A block starts with one full forward (every position,
  a fresh cache) whose logits commit tokens at once: the refresh is fused with a decoding step.
- PrefixCache: later steps run ``x[:, block_start:]`` (the block and all the masked suffix) against the
  cached keys/values of ``[0, block_start)``. DualCache: later steps run only ``x[:, block_start:
  block_end]``; their keys/values overwrite the cache at the block's positions; the prefix and suffix
  keep the block-start keys/values.
- Candidates are the masks of the current block only. :func:`threshold_commit` / :func:`factor_commit`
  are the two commit rules. At least one token per step; nothing is re-masked.
- Dream's rules: logits shifted right by one (position ``p`` is predicted at ``p - 1``); the block-start
  forward commits exactly the block's first position (greedy), threshold steps follow.

Differences from the reference code, all on purpose:

- Batches with left padding are right: the padding keys are masked out and each row's positions start
  at its first real token (the reference LLaDA attention gets no mask; its dual cache mixes rows,
  issues #7 / PR #17), rows commit independently and a row whose block is full waits.
- The mask token itself is never committed (as dInfer and the pipeline do; the reference would loop on
  a model that predicts it).
- The cache holds post-RoPE keys (transformers' :class:`~transformers.DynamicCache` layout); with
  absolute positions preserved this equals the reference's pre-RoPE cache.
- Confidence: LLaDA's rules take the softmax in float64 (as the reference); Dream's in the logits' dtype.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ commit rules
def threshold_commit(confidence: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM's ``get_transfer_index`` with a threshold, per row: ``[B, L]`` bool.

    The most confident candidate is always committed (rows with a candidate); every other candidate is
    committed iff its confidence is ``>= threshold``.
    """
    conf = confidence.masked_fill(~candidates, -math.inf)
    commit = candidates & (conf >= threshold)
    top = conf.argmax(dim=1, keepdim=True)
    first = torch.zeros_like(commit).scatter_(1, top, True) & candidates
    return commit | first


def factor_commit(confidence: torch.Tensor, candidates: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's ``get_transfer_index_dynamic`` (the factor rule), per row: ``[B, L]`` bool.

    Candidates sorted by confidence, descending: the ``n``-th (1-based) passes when its confidence is
    ``>= 1 - factor / (n + 1)``; the first always passes. The committed tokens are the ranks before the
    first failure, except that a first failure at the last rank (or none) commits every candidate, as the
    reference code does.
    """
    conf = confidence.masked_fill(~candidates, -math.inf)
    values, order = conf.sort(dim=1, descending=True, stable=True)
    length = conf.shape[1]
    rank = torch.arange(length, device=conf.device)
    limit = 1.0 - factor / (rank.to(values.dtype) + 2.0)
    limit[0] = -math.inf
    count = candidates.sum(1, keepdim=True)
    fail = (values < limit) & (rank[None, :] < count)
    first_fail = torch.where(fail.any(1, keepdim=True), fail.long().argmax(1, keepdim=True), count)
    take = torch.where(first_fail >= count - 1, count, first_fail)
    chosen_sorted = rank[None, :] < take
    return torch.zeros_like(candidates).scatter_(1, order, chosen_sorted) & candidates


# ------------------------------------------------------------------------------------------------- cache
class FastDLLMCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` whose ``update`` follows Fast-dLLM's three kinds of forward.

    Set :attr:`mode` before each forward:

    - ``"refresh"``: the forward runs the whole sequence; its keys/values replace the cache.
    - ``"prefix"``: the forward runs ``[start, L)``; it attends to the cached ``[0, start)`` followed by
      its own keys/values; the cache is not changed (the prefix stays the block-start one).
    - ``"dual"``: the forward runs ``[start, end)``; its keys/values overwrite the cache there in place and
      it attends to the whole cache.
    """

    def __init__(self):
        super().__init__()
        self.mode = "refresh"
        """``"refresh"``, ``"prefix"`` or ``"dual"``."""
        self.start = 0
        """First position the forward runs (prefix and dual modes)."""
        self.end = 0
        """End of the overwritten span (dual mode)."""

    def _layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> DynamicLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(DynamicLayer())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        return layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Store / combine the keys and values of layer ``layer_idx`` as :attr:`mode` says."""
        layer = self._layer(layer_idx, key_states, value_states)
        if self.mode == "refresh":
            layer.keys, layer.values = key_states, value_states
            return key_states, value_states
        if self.mode == "prefix":
            start = self.start
            keys = torch.cat([layer.keys[:, :, :start], key_states], dim=2)
            values = torch.cat([layer.values[:, :, :start], value_states], dim=2)
            return keys, values
        layer.keys[:, :, self.start : self.end] = key_states
        layer.values[:, :, self.start : self.end] = value_states
        return layer.keys, layer.values


# --------------------------------------------------------------------------------------------- dispatch
def split_fast_dllm(configs: list, window) -> tuple[object | None, list]:
    """``(the FastDLLMConfig or None, the other configs)``; ValueError when it is combined with others."""
    from fastgen.configs import FastDLLMConfig

    fast = [c for c in configs if isinstance(c, FastDLLMConfig)]
    if not fast:
        return None, configs
    if len(fast) > 1 or len(fast) != len(configs) or window is not None:
        names = [type(c).__name__ for c in configs] + (
            ["WindowDiffusionConfig"] if window is not None else []
        )
        raise ValueError(
            f"acceleration={names} combines FastDLLMConfig with other configs; allowed: one FastDLLMConfig alone"
        )
    return fast[0], []


def fast_dllm_schedule(
    config, *, gen_length, block_length, confidence_threshold, cfg_scale, remasking, dream_options
) -> tuple[int, int]:
    """``(steps, block_length)`` of a Fast-dLLM call: each block runs until it is full, so ``steps`` is
    nominal (one per block, as Fast-dLLM's scripts pass it). Refuses, before any work, the pipeline
    options Fast-dLLM's own rule replaces (a threshold, CFG, another remasking, Dream's sampler options)."""
    if confidence_threshold is not None:
        raise ValueError(
            f"confidence_threshold={confidence_threshold!r} with a FastDLLMConfig; allowed: None "
            "(the config's threshold / factor decides)"
        )
    if block_length not in (None, config.block_length):
        raise ValueError(
            f"block_length={block_length!r} differs from FastDLLMConfig.block_length={config.block_length}; "
            f"allowed: None or {config.block_length}"
        )
    given = {name: value for name, value in dream_options.items() if value is not None}
    if cfg_scale != 0 or remasking not in (None, "low_confidence") or given:
        raise ValueError(
            f"cfg_scale={cfg_scale!r}, remasking={remasking!r}, {given} with a FastDLLMConfig; allowed: "
            "cfg_scale=0, remasking=None or 'low_confidence', no Dream sampler options (Fast-dLLM's own rule)"
        )
    if not isinstance(gen_length, int) or gen_length % config.block_length:
        raise ValueError(
            f"gen_length={gen_length!r} with FastDLLMConfig.block_length={config.block_length}; allowed: a "
            "multiple of the block length"
        )
    logger.info(
        "Fast-dLLM (%s cache): blocks of %d run until full; steps is not used",
        config.cache,
        config.block_length,
    )
    return max(1, gen_length // config.block_length), config.block_length


def _model_kwargs(model) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or not ({"cache", "past_key_values"} & set(params)):
        raise ValueError(
            f"acceleration=FastDLLMConfig needs a native transformers model taking position_ids and a KV cache "
            f"(LlamaForCausalLM / Qwen2ForCausalLM as load_diffusion_lm builds); got {type(model).__name__}"
        )
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _confidence(logits: torch.Tensor, rules: str, temperature: float, gens, active):
    """``(chosen [B, n], confidence [B, n] float64)`` from ``logits [B, n, V]`` (mask id already -inf)."""
    if rules == "dream":
        probs = torch.softmax(logits, dim=-1)  # Dream: in the logits' dtype
        confidence, chosen = probs.max(dim=-1)
        return chosen, confidence.double()
    if temperature > 0:  # LLaDA's Gumbel-max in float64, per row from the row's generator
        batch, n, vocab = logits.shape
        noisy = logits.double().clone()
        for b in range(batch):
            if bool(active[b]):
                u = torch.rand(n, vocab, generator=gens[b], dtype=torch.float64, device=logits.device)
                noisy[b] = logits[b].double().exp() / (-torch.log(u)) ** temperature
        chosen = noisy.argmax(-1)
    else:
        chosen = logits.argmax(-1)
    probs = torch.softmax(logits.double(), dim=-1)
    return chosen, probs.gather(-1, chosen[..., None]).squeeze(-1)


def generate_fast_dllm(
    pipe,
    rows: list[list[int]],
    config,
    *,
    prompt_length: int,
    gen_length: int,
    temperature: float = 0.0,
    logits_shift: bool = False,
    eos_ids: list[int] | None = None,
    generator=None,
    callback=None,
    family: str | None = None,
):
    """Run Fast-dLLM on the prompts ``rows`` (token id lists); returns ``(sequences, steps, nfe)``.
    ``family`` (``"llada"``, ``"dream"`` or None, the pipeline's detection) resolves the config's rules.

    ``sequences [B, prompt_length + gen_length]`` is left-padded like the pipeline's. ``steps`` counts
    decoding steps (forwards of the batch); ``nfe`` the model calls (equal here: no CFG). With ``eos_ids``
    a row whose completed blocks hold an EOS stops and its rest is filled with EOS (the pipeline's rule;
    Fast-dLLM v1 itself has no early stop).
    """
    block = config.block_length
    if gen_length % block:
        raise ValueError(
            f"FastDLLMConfig.block_length={block} must divide gen_length={gen_length} "
            "(allowed: divisors of gen_length)"
        )
    rules = config.resolved_rules(family)
    if rules == "dream" and temperature > 0:
        raise ValueError(f"temperature={temperature!r} with Fast-dLLM's Dream rules; allowed: 0 (greedy)")
    run = pipe._prepare(rows, prompt_length, gen_length, 0.0, generator)
    decoder = _FastDLLMDecoder(pipe, run, config, rules, temperature, logits_shift, eos_ids, callback)
    for b_index in range(gen_length // block):
        start = prompt_length + b_index * block
        decoder.decode_block(start, start + block)
        if decoder.stop_at_eos(prompt_length, start + block):
            break
    return decoder.x, decoder.steps, decoder.steps


class _FastDLLMDecoder:
    """One call's Fast-dLLM decoding state (:func:`generate_fast_dllm`): the sequences, the KV cache,
    the rows that stopped at EOS and the step count."""

    def __init__(
        self, pipe, run, config, rules: str, temperature: float, logits_shift: bool, eos_ids, callback
    ):
        self.model, self.run, self.config, self.rules = pipe.model, run, config, rules
        self.temperature, self.logits_shift, self.callback = temperature, logits_shift, callback
        self.cache_kw, self.takes_keep = _model_kwargs(pipe.model)
        self.x, self.mask_id, self.device = run.x, pipe.mask_token_id, pipe.device
        self.done = torch.zeros(self.x.shape[0], dtype=torch.bool, device=self.device)
        self.eos = torch.tensor(eos_ids or [], dtype=torch.long, device=self.device)
        self.cache = FastDLLMCache()
        self.steps = 0

    def forward(self, mode: str, start: int, end: int, keep: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, len(keep), V]`` (float32, mask id -inf); ``keep`` indexes the forward's input."""
        cache, run, total = self.cache, self.run, self.x.shape[1]
        cache.mode, cache.start, cache.end = mode, start, end
        lo, hi = (0, total) if mode == "refresh" else (start, total if mode == "prefix" else end)
        kwargs = {
            "input_ids": self.x[:, lo:hi],
            "attention_mask": run.mask_4d[:, :, lo:hi],  # [B, 1, L, L], an expanded view: slicing is free
            "position_ids": run.position_ids[:, lo:hi],
            "use_cache": True,
            self.cache_kw: cache,
        }
        if self.takes_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        if not self.takes_keep or logits.shape[1] != keep.numel():
            logits = logits[:, keep]
        logits = logits if self.rules == "dream" else logits.float()
        if self.mask_id < logits.shape[-1]:
            logits[..., self.mask_id] = -math.inf
        return logits

    def decode_block(self, start: int, end: int) -> None:
        """Steps on the block ``[start, end)`` until no active row has a masked token in it."""
        config, x = self.config, self.x
        positions = torch.arange(start, end, device=self.device)
        i = 0
        while True:
            in_block = x[:, start:end] == self.mask_id
            active = in_block.any(1) & ~self.done
            if not bool(active.any()):
                return
            refresh = i == 0 or (config.refresh_interval is not None and i % config.refresh_interval == 0)
            if config.cache == "none" or refresh:
                mode, base = "refresh", 0
            else:
                mode, base = config.cache, start
            source = positions - 1 if self.logits_shift else positions
            # Fast-dLLM's shifted cached forwards duplicate the first output (the block's first position,
            # committed at the block start under Dream's rules): source clamped to the forward's input
            keep = (source - base).clamp_min(0)
            logits = self.forward(mode, start, end, keep)
            chosen, confidence = _confidence(logits, self.rules, self.temperature, self.run.gens, active)
            candidates = in_block & active[:, None]
            if i == 0 and self.rules == "dream":
                commit = torch.zeros_like(candidates)
                commit[:, 0] = candidates[:, 0]
            elif config.threshold is not None:
                commit = threshold_commit(confidence, candidates, config.threshold)
            else:
                commit = factor_commit(confidence, candidates, config.factor)
            x[:, start:end] = torch.where(commit, chosen, x[:, start:end])
            i += 1
            self.steps += 1
            if self.callback is not None:
                self.callback(self.steps - 1, x.clone())

    def stop_at_eos(self, prompt_length: int, end: int) -> bool:
        """With EOS ids: rows whose generation up to ``end`` holds one stop, their masks after ``end``
        filled with EOS; True when every row has stopped."""
        eos, x = self.eos, self.x
        if not eos.numel():
            return False
        stop = torch.isin(x[:, prompt_length:end], eos).any(1) & ~self.done
        if bool(stop.any()):
            rest = x[:, end:]
            x[:, end:] = torch.where(stop[:, None] & (rest == self.mask_id), eos[0], rest)
            self.done |= stop
        return bool(self.done.all())


__all__ = [
    "FastDLLMCache",
    "factor_commit",
    "generate_fast_dllm",
    "fast_dllm_schedule",
    "split_fast_dllm",
    "threshold_commit",
]
