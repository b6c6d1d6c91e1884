"""Configuration dataclasses, one per method. Each validates itself in ``__post_init__`` and raises a
``ValueError`` that names the field, the bad value and what is allowed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ._validation import check_block_size, check_choice, check_int, check_number, is_number


def _field(obj, name: str) -> tuple[str, object]:
    return f"{type(obj).__name__}.{name}", getattr(obj, name)


def _check_fraction(
    obj, name: str, *, low: float, high: float, low_open: bool = False, high_open: bool = False
):
    check_number(*_field(obj, name), low, high, low_open=low_open, high_open=high_open)


def _check_int(obj, name: str, *, minimum: int = 0):
    check_int(*_field(obj, name), minimum)


def _check_block_size(obj, name: str = "block_size"):
    check_block_size(*_field(obj, name))


def _check_choice(obj, name: str, allowed: tuple):
    check_choice(*_field(obj, name), allowed)


class _ConfigMixin:
    def to_dict(self) -> dict:
        """Plain dict of the fields, with the method name (for manifests and logs)."""
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict):
        """Build from a dict, ignoring the ``method`` key; unknown keys raise ``ValueError``."""
        data = {k: v for k, v in data.items() if k != "method"}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class RectifiedSpaAttnConfig(_ConfigMixin):
    """Rectified SpaAttn for bidirectional video DiTs (Wan, HunyuanVideo). Frozen: derive variants
    with ``dataclasses.replace``.

    Example:
        >>> import dataclasses
        >>> from fastgen import RectifiedSpaAttnConfig
        >>> config = RectifiedSpaAttnConfig(sparsity=0.8, dense_layers=1, warmup_steps=5)
        >>> dataclasses.replace(config, sparsity=0.9).sparsity
        0.9
        >>> RectifiedSpaAttnConfig(sparsity=1.5)
        Traceback (most recent call last):
        ...
        ValueError: RectifiedSpaAttnConfig.sparsity=1.5 is out of range; allowed: [0.0, 1.0)

        Then ``apply_sparse_attention(pipe, config)`` installs it on a Wan or HunyuanVideo pipeline.
    """

    sparsity: float = 0.8
    """Fraction of key blocks dropped per query block, in [0, 1)."""
    block_size: int = 128
    """Tokens per block (power of two >= 16)."""
    dense_layers: int = 1
    """The first N transformer blocks stay dense."""
    warmup_steps: int = 5
    """The first N denoising steps stay dense (about 10-20% of the schedule in the paper)."""
    form: str = "exact"
    """``"exact"`` (mixed-resolution online softmax), ``"paper"`` (scaled sparse output + pooled values)
    or ``"none"`` (plain top-k block-sparse, no rectification)."""
    selection: str = "subblock"
    """Critical-block rule: ``"subblock"`` (multi-resolution IPAR, top-k), ``"pooled"`` (the paper's
    IPAR, top-k) or ``"paper"`` (the authors' rule: cumulative mass 0.3 or top-k, whichever keeps
    more, text ranked in the same sort, plus 3D-adjacent and first-frame blocks)."""
    mass_threshold: float | None = None
    """Also keep blocks until this cumulative estimated mass is reached (None: top-k only; for
    ``selection="paper"`` None means the authors' 0.3)."""
    reorder: bool = True
    """Reorder video tokens into compact 3D tiles before blocking (exact permutation)."""
    pool_splits: int = 4
    """Sub-blocks per block of the ``"subblock"`` estimate (power of two <= block_size); another value
    with another selection is a ``ValueError``."""
    isolated_keys: float | None = None
    """Outlier keys per key block attended exactly instead of pooled (0 disables). None: 1.0 in the
    exact form, 0 otherwise; the paper form has none."""
    gapr: bool = True
    """Compensate only dropped blocks that pass GAPR (False: every dropped block; a ``ValueError``
    with ``form="none"``, which compensates nothing)."""
    min_tokens: int = 256
    """Sequences shorter than this run dense attention."""

    method = "rectified"

    @property
    def resolved_isolated_keys(self) -> float:
        """``isolated_keys`` with None resolved for the form."""
        if self.isolated_keys is None:
            return 1.0 if self.form == "exact" else 0.0
        return float(self.isolated_keys)

    def __post_init__(self):
        _check_fraction(self, "sparsity", low=0.0, high=1.0, high_open=True)
        _check_block_size(self)
        _check_int(self, "dense_layers")
        _check_int(self, "warmup_steps")
        _check_choice(self, "form", ("exact", "paper", "none"))
        if self.mass_threshold is not None:
            _check_fraction(self, "mass_threshold", low=0.0, high=1.0, low_open=True)
        _check_choice(self, "selection", ("subblock", "pooled", "paper"))
        _check_int(self, "pool_splits", minimum=1)
        if self.pool_splits & (self.pool_splits - 1) or self.pool_splits > self.block_size:
            raise ValueError(
                f"RectifiedSpaAttnConfig.pool_splits={self.pool_splits!r} is not allowed; "
                f"allowed: a power of two in [1, block_size={self.block_size}]"
            )
        if self.isolated_keys is not None:
            if not is_number(self.isolated_keys) or self.isolated_keys < 0:
                raise ValueError(
                    f"RectifiedSpaAttnConfig.isolated_keys={self.isolated_keys!r} is out of range; "
                    "allowed: None or a number >= 0"
                )
            if self.form == "paper" and self.isolated_keys > 0:
                raise ValueError(
                    f"RectifiedSpaAttnConfig.isolated_keys={self.isolated_keys!r} is not allowed with "
                    "form='paper' (the paper form has no isolated keys); allowed: None or 0"
                )
        if self.pool_splits != 4 and self.selection != "subblock":
            raise ValueError(
                f"RectifiedSpaAttnConfig.pool_splits={self.pool_splits!r} only applies to "
                f"selection='subblock' (selection={self.selection!r}); leave it at 4"
            )
        _check_choice(self, "gapr", (True, False))
        if not self.gapr and self.form == "none":
            raise ValueError(
                "RectifiedSpaAttnConfig.gapr=False only applies to the forms that compensate "
                "(form='exact' or 'paper'), not form='none'; leave it at True"
            )
        _check_choice(self, "reorder", (True, False))
        _check_int(self, "min_tokens")


@dataclass
class LightForcingConfig(_ConfigMixin):
    """Light Forcing for autoregressive (chunked, KV-cached) video diffusion.

    Example:
        >>> from fastgen import LightForcingConfig
        >>> LightForcingConfig().sparsity, LightForcingConfig().sparsity_base
        (0.88, 0.98)
        >>> long = LightForcingConfig.long_video()  # the authors' long-video setting
        >>> long.sparsity, long.keep_frames, long.keep_sink, long.keep_near
        (0.85, 3, 1, 1)

        Then ``apply_sparse_attention(pipe.transformer, config)`` on a ``CausalWanPipeline``.
    """

    sparsity: float = 0.88
    """Target average sparsity over the video, in [0, 1)."""
    sparsity_base: float = 0.98
    """Asymptotic per-chunk sparsity of Chunk-Aware Growth, in [sparsity, 1)."""
    block_size: int = 128
    """Tokens per block (power of two >= 16)."""
    keep_frames: int = 6
    """History frames kept per query block at the frame level (sink + near + middle)."""
    keep_sink: int = 1
    """First frames always kept (attention sinks)."""
    keep_near: int = 2
    """Most recent history frames always kept."""
    rectify: bool = False
    """Beyond the paper: compensate GAPR-reliable dropped blocks with pooled keys (Rectified SpaAttn's exact form)."""
    pool_cache: bool = False
    """Beyond the paper: pool the cached frames' keys once per cached chunk and reuse them at later steps (False,
    as the authors' code: pool every call; ``fastgen bench causal --op`` measured no gain on the CPU)."""

    method = "light_forcing"

    @classmethod
    def long_video(cls, **overrides) -> LightForcingConfig:
        """The authors' long-video settings (sparsity 0.85 / 0.95, keep 3 / 1 / 1); generate with
        ``local_attn_frames=12, sink_frames=1`` in the pipeline call."""
        values = {"sparsity": 0.85, "sparsity_base": 0.95, "keep_frames": 3, "keep_sink": 1, "keep_near": 1}
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        _check_fraction(self, "sparsity", low=0.0, high=1.0, high_open=True)
        _check_fraction(self, "sparsity_base", low=0.0, high=1.0, high_open=True)
        if self.sparsity_base < self.sparsity:
            raise ValueError(
                f"LightForcingConfig.sparsity_base={self.sparsity_base!r} must be >= sparsity={self.sparsity!r}"
            )
        _check_block_size(self)
        _check_int(self, "keep_frames", minimum=1)
        _check_int(self, "keep_sink")
        _check_int(self, "keep_near")
        if self.keep_sink + self.keep_near > self.keep_frames:
            raise ValueError(
                f"LightForcingConfig.keep_sink + keep_near = {self.keep_sink + self.keep_near} must be <= "
                f"keep_frames={self.keep_frames}"
            )
        _check_choice(self, "rectify", (True, False))
        _check_choice(self, "pool_cache", (True, False))


@dataclass
class SparseDConfig(_ConfigMixin):
    """SparseD for diffusion LMs: head-specific block patterns from a dense warm-up, then reused.

    Example:
        >>> from fastgen import SparseDConfig
        >>> SparseDConfig(skip=0.2, select=0.3, block_size=32)
        SparseDConfig(skip=0.2, select=0.3, block_size=32)

        Then ``DiffusionLMPipeline(...)(prompt=..., acceleration=[config])``.
    """

    skip: float = 0.2
    """Fraction of all denoising steps run dense before the pattern is fixed, in [0, 1]."""
    select: float = 0.3
    """Fraction of key blocks kept per query block afterwards, in (0, 1]."""
    block_size: int = 128
    """Tokens per block (power of two >= 16; 32 suits short contexts, 128 long ones)."""

    method = "sparsed"

    def __post_init__(self):
        _check_fraction(self, "skip", low=0.0, high=1.0)
        _check_fraction(self, "select", low=0.0, high=1.0, low_open=True)
        _check_block_size(self)


WINDOW_DIFFUSION_DEFAULTS = {
    "llada": {"window": 64, "active": 16, "refresh_cycle": 32, "sliding": False},
    "dream": {"window": 128, "active": 16, "refresh_cycle": 32, "sliding": True},
}
"""Window-Diffusion defaults per model family: the authors' evaluation settings (LLaDA-8B-Base
GSM8K: 64/16/32; Dream-v0-7B: 128/16/32 with the sliding inner window). Other families get LLaDA's."""


@dataclass
class WindowDiffusionConfig(_ConfigMixin):
    """Window-Diffusion for diffusion LMs: windowed active tokens with a periodically refreshed KV cache.

    A field left ``None`` takes the model family's default (:data:`WINDOW_DIFFUSION_DEFAULTS`) when the
    pipeline runs; :meth:`resolved` does the same by hand.

    Example:
        >>> from fastgen import WindowDiffusionConfig
        >>> WindowDiffusionConfig().resolved("llada")
        WindowDiffusionConfig(window=64, active=16, refresh_cycle=32, sliding=False)
        >>> WindowDiffusionConfig(active=8).resolved("dream")
        WindowDiffusionConfig(window=128, active=8, refresh_cycle=32, sliding=True)

        Then ``DiffusionLMPipeline(...)(prompt=..., acceleration=[config])``.
    """

    window: int | None = None
    """Leftmost masks kept in the phase's frozen window (LLaDA rules), or the masks before the refresh
    step truncates the sequence (sliding); farther masks are pruned. None: family default (64 / 128)."""
    active: int | None = None
    """Leftmost masks recomputed at each pruned step (plus, LLaDA rules, the tokens decoded in the
    phase). None: family default (16)."""
    refresh_cycle: int | None = None
    """Steps per phase: one refresh step (full forward, cache rewritten) then ``refresh_cycle - 1``
    pruned steps. None: family default (32)."""
    sliding: bool | None = None
    """Dream's rules: the refresh step runs the prefix before the ``window``-th mask and decodes the
    leftmost mask; pruned steps run the contiguous span from that token up to the ``active + 1``-th mask
    (its end slides as masks are decoded). False: LLaDA's rules. None: family default (Dream True)."""

    method = "window_diffusion"

    def __post_init__(self):
        for name in ("window", "active", "refresh_cycle"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        if self.sliding is not None:
            _check_choice(self, "sliding", (True, False))
        if self.window is not None and self.active is not None and self.active > self.window:
            raise ValueError(
                f"WindowDiffusionConfig.active={self.active} must be <= window={self.window} "
                "(allowed: 1 <= active <= window)"
            )

    def resolved(self, family: str | None = None) -> WindowDiffusionConfig:
        """A copy with every ``None`` field set to ``family``'s default (LLaDA's for unknown families)."""
        defaults = WINDOW_DIFFUSION_DEFAULTS.get(family or "llada", WINDOW_DIFFUSION_DEFAULTS["llada"])
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return WindowDiffusionConfig(**{k: defaults[k] if v is None else v for k, v in values.items()})

    @classmethod
    def for_family(cls, family: str | None, **overrides) -> WindowDiffusionConfig:
        """The defaults of ``family`` (``"llada"``, ``"dream"``), with ``overrides`` applied."""
        return cls(**overrides).resolved(family)


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

    The ``steps`` argument of the pipeline call is not used (Fast-dLLM's threshold mode runs each block
    until it is full; the call logs that), and ``block_length`` must be None or this config's.

    Example:
        >>> from fastgen import FastDLLMConfig
        >>> FastDLLMConfig(cache="dual").threshold  # Fast-dLLM's default rule
        0.9
        >>> FastDLLMConfig(cache="dual", factor=1.0).threshold is None
        True

        With a diffusion LM pipeline (a baseline to compare fastgen's methods with)::

            out = pipe(prompt="...", gen_length=256, acceleration=FastDLLMConfig(cache="dual"))
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


METHOD_CONFIGS = {
    cls.method: cls
    for cls in (RectifiedSpaAttnConfig, LightForcingConfig, SparseDConfig, WindowDiffusionConfig)
}
"""Config class per method name (used by the CLI, batch manifests and the demo)."""


def config_from_dict(data: dict):
    """Rebuild a config from ``to_dict()`` output."""
    method = data.get("method")
    if method not in METHOD_CONFIGS:
        raise ValueError(f"method={method!r} is unknown; allowed: {sorted(METHOD_CONFIGS)}")
    return METHOD_CONFIGS[method].from_dict(data)


__all__ = [
    "FAST_DLLM_CACHES",
    "FAST_DLLM_RULES",
    "FastDLLMConfig",
    "LightForcingConfig",
    "METHOD_CONFIGS",
    "RectifiedSpaAttnConfig",
    "SparseDConfig",
    "WINDOW_DIFFUSION_DEFAULTS",
    "WindowDiffusionConfig",
    "config_from_dict",
]
