"""``FastDLLMConfig``: Fast-dLLM (block-wise KV cache + confidence-aware parallel decoding) as an
acceleration option of :class:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline`.

Kept in its own module (the lead re-exports it from ``fastgen``); it validates itself in
``__post_init__`` like the configs of :mod:`fastgen.configs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .configs import _check_choice, _check_fraction, _check_int, _ConfigMixin

FAST_DLLM_CACHES = ("prefix", "dual", "none")
"""Cache modes: Fast-dLLM's PrefixCache, DualCache, or no cache (a full forward every step)."""

FAST_DLLM_RULES = ("llada", "dream")
"""Decoding rules: LLaDA's (``llada/generate.py``) or Dream's (``dream/model/generation_utils_block.py``)."""


@dataclass
class FastDLLMConfig(_ConfigMixin):
    """Fast-dLLM (NVlabs/Fast-dLLM v1) as its code implements it.

    Generation runs block by block (``block_length`` positions, left to right). Every block starts with a
    full forward whose logits also commit tokens (the refresh is fused with a decoding step) and whose
    keys/values become the cache; the block's later steps reuse it:

    - ``cache="prefix"``: the prompt and finished blocks are cached; the current block and the whole
      masked suffix are recomputed every step.
    - ``cache="dual"``: prefix and suffix are cached; only the block's positions are recomputed and their
      keys/values overwrite the cache in place.
    - ``cache="none"``: every step is a full forward (Fast-dLLM's ``generate`` with a threshold).

    Commit rule (one of ``threshold`` / ``factor``), candidates = masks of the current block only, per row:
    ``threshold`` commits the most confident candidate always and every other one with confidence
    ``>= threshold``; ``factor`` commits the longest prefix of the confidence ranking whose ``n``-th token
    (1-based) has confidence ``>= 1 - factor / (n + 1)`` (the first always; a failure only at the last rank
    commits all, as the reference code does). Nothing is re-masked; a block ends when it has no mask.
    Dream's rules shift the logits right by one and commit exactly the block's first position (greedy) at
    the block-start forward, threshold steps after that.

    The ``steps`` and ``block_length`` arguments of the pipeline call are not used (Fast-dLLM's threshold
    mode runs each block until it is full); the call logs that once.
    """

    cache: str = "prefix"
    """``"prefix"`` (Fast-dLLM's default), ``"dual"`` or ``"none"``."""
    threshold: float | None = None
    """Confidence threshold in (0, 1]; ``None``: 0.9 (Fast-dLLM's default) unless ``factor`` is set."""
    factor: float | None = None
    """Factor rule's ``f`` > 0 (Fast-dLLM's forks use 1.0); not together with ``threshold``."""
    block_length: int = 32
    """Positions per block (Fast-dLLM: 32 in every published setting); must divide ``gen_length``."""
    refresh_interval: int | None = None
    """``None``: refresh only at block starts (Fast-dLLM). ``k``: also a full (fused) refresh every ``k``
    steps inside a block (dInfer's option); ``1`` makes every step a full forward."""
    rules: str | None = None
    """``"llada"`` or ``"dream"``; ``None``: the model family's (Dream for Dream checkpoints)."""

    method = "fast_dllm"

    def __post_init__(self):
        _check_choice(self, "cache", FAST_DLLM_CACHES)
        if self.threshold is not None and self.factor is not None:
            raise ValueError(
                f"FastDLLMConfig.threshold={self.threshold!r}, factor={self.factor!r}: set at most one "
                "(allowed: threshold in (0, 1], or factor > 0, or neither for threshold 0.9)"
            )
        if self.threshold is None and self.factor is None:
            self.threshold = 0.9
        if self.threshold is not None:
            _check_fraction(self, "threshold", low=0.0, high=1.0, low_open=True)
        if self.factor is not None:
            _check_fraction(self, "factor", low=0.0, high=float("inf"), low_open=True, high_open=True)
        _check_int(self, "block_length", minimum=1)
        if self.refresh_interval is not None:
            _check_int(self, "refresh_interval", minimum=1)
        if self.rules is not None:
            _check_choice(self, "rules", FAST_DLLM_RULES)

    def resolved_rules(self, family: str | None) -> str:
        """``rules``, or the family's (``"dream"`` for Dream, ``"llada"`` otherwise) when it is ``None``."""
        if self.rules is not None:
            return self.rules
        return "dream" if family == "dream" else "llada"


__all__ = ["FAST_DLLM_CACHES", "FAST_DLLM_RULES", "FastDLLMConfig"]
