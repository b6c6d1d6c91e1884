"""The one validation layer of what a user can type, shared by ``fastgen generate``, ``fastgen batch``
(its command line and every row of its prompt file) and the demo.

Every option is described once in :data:`OPTIONS`: its type, its allowed range and which model families
and methods it belongs to. :func:`check_options` checks a set of given values (``None`` = not given)
against the run they are for (a :class:`Run`: family and method) before any model is loaded, and
returns one line per problem naming the option, the value and what is allowed, or the reason the option
does not apply (``--select is for SparseD (text); this run is video (tiny-wan) with rectified``).

Families:
    ``video``: a bidirectional video DiT (Wan, HunyuanVideo); methods ``rectified``, ``dense``.
    ``causal``: the autoregressive causal Wan (Self-Forcing); methods ``light_forcing``, ``dense``.
    ``text``: a diffusion LM (LLaDA, Dream); methods ``sparsed``, ``window_diffusion``,
    ``sparsed+window_diffusion``, ``dense``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

FAMILY_METHODS: dict[str, tuple[str, ...]] = {
    "video": ("rectified", "dense"),
    "causal": ("light_forcing", "dense"),
    "text": ("sparsed", "window_diffusion", "sparsed+window_diffusion", "dense"),
}
"""Methods each model family can run; the first is the default."""

FAMILY_NAMES = {"video": "video", "causal": "a causal Wan", "text": "text"}
"""How a family is named in messages."""

OUTPUT_EXTENSIONS = {"video": (".mp4",), "causal": (".mp4",), "text": (".txt",)}
"""Output file extensions allowed per family."""

_SPARSED = ("sparsed", "sparsed+window_diffusion")
_WINDOW = ("window_diffusion", "sparsed+window_diffusion")
_VIDEO_FAMILIES = ("video", "causal")


@dataclass(frozen=True)
class Run:
    """What a set of options is for: the model family, the method and the model's name (for messages)."""

    family: str
    """``"video"``, ``"causal"`` or ``"text"``."""
    method: str
    """The method that will run (resolved: never ``None``)."""
    source: str = ""
    """Preset name or checkpoint, for messages."""

    def describe(self) -> str:
        """``"video (tiny-wan) with rectified"``."""
        where = f" ({self.source})" if self.source else ""
        return f"{FAMILY_NAMES[self.family]}{where} with --method {self.method}"


# ----------------------------------------------------------------------------------------------------
# value checks: each returns None when the value is allowed, else "what is allowed"


def _int_at_least(low: int) -> Callable[[object], str | None]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            return f"an integer >= {low}"
        return None

    return check


def _float_in(low: float, high: float, *, low_open=False, high_open=False) -> Callable[[object], str | None]:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    text = f"a number in {left}{low:g}, {high:g}{right}"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return text
        if v < low or v > high or (low_open and v == low) or (high_open and v == high):
            return text
        return None

    return check


def _float_at_least(low: float) -> Callable[[object], str | None]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
            return f"a number >= {low:g}"
        return None

    return check


def _side(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v % 16:
        return "a multiple of 16, at least 16 (pixels)"
    return None


def _block_size(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
        return "a power of two >= 16 (16, 32, 64, 128, ...)"
    return None


def _choice(*allowed: str) -> Callable[[object], str | None]:
    def check(v):
        return None if v in allowed else "one of " + ", ".join(allowed)

    return check


def _text(v):
    return None if isinstance(v, str) else "a text"


def _existing_file(v):
    if not isinstance(v, str) or not os.path.isfile(v):
        return "an existing file"
    return None


@dataclass(frozen=True)
class Option:
    """One user-facing option: its check and where it applies."""

    name: str
    """Attribute / column name (``block_size``)."""
    check: Callable[[object], str | None]
    """``None`` when a value is allowed, else what is allowed."""
    families: tuple[str, ...]
    """Model families it applies to."""
    methods: tuple[str, ...] | None = None
    """Methods it applies to (``None``: every method of those families)."""
    purpose: str = ""
    """What it is for, in the message of an option given where it does not apply."""

    @property
    def flag(self) -> str:
        """The command-line spelling (``--block-size``)."""
        return "--" + self.name.replace("_", "-")


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option("seed", _int_at_least(0), ("video", "causal", "text")),
        Option("steps", _int_at_least(1), ("video", "causal", "text")),
        Option("height", _side, _VIDEO_FAMILIES, purpose="video"),
        Option("width", _side, _VIDEO_FAMILIES, purpose="video"),
        Option("frames", _int_at_least(1), _VIDEO_FAMILIES, purpose="video"),
        Option("guidance_scale", _float_at_least(0.0), _VIDEO_FAMILIES, purpose="video"),
        Option("negative_prompt", _text, _VIDEO_FAMILIES, purpose="video"),
        Option("image", _existing_file, ("video",), purpose="image-to-video pipelines (Wan I2V)"),
        Option("local_attn_frames", _int_at_least(1), ("causal",), purpose="the causal Wan"),
        Option("sink_frames", _int_at_least(0), ("causal",), purpose="the causal Wan"),
        Option(
            "sparsity",
            _float_in(0.0, 1.0, high_open=True),
            _VIDEO_FAMILIES,
            ("rectified", "light_forcing"),
            "Rectified SpaAttn / Light Forcing (video)",
        ),
        Option(
            "block_size",
            _block_size,
            ("video", "causal", "text"),
            ("rectified", "light_forcing", *_SPARSED),
            "Rectified SpaAttn, Light Forcing and SparseD",
        ),
        Option("dense_layers", _int_at_least(0), ("video",), ("rectified",), "Rectified SpaAttn (video)"),
        Option("warmup_steps", _int_at_least(0), ("video",), ("rectified",), "Rectified SpaAttn (video)"),
        Option(
            "form", _choice("exact", "paper", "none"), ("video",), ("rectified",), "Rectified SpaAttn (video)"
        ),
        Option("skip", _float_in(0.0, 1.0), ("text",), _SPARSED, "SparseD (text)"),
        Option("select", _float_in(0.0, 1.0, low_open=True), ("text",), _SPARSED, "SparseD (text)"),
        Option("window", _int_at_least(1), ("text",), _WINDOW, "Window-Diffusion (text)"),
        Option("active", _int_at_least(1), ("text",), _WINDOW, "Window-Diffusion (text)"),
        Option("refresh_cycle", _int_at_least(1), ("text",), _WINDOW, "Window-Diffusion (text)"),
        Option("gen_length", _int_at_least(1), ("text",), purpose="text"),
        Option("block_length", _int_at_least(1), ("text",), purpose="text"),
        Option("temperature", _float_at_least(0.0), ("text",), purpose="text"),
        Option("cfg_scale", _float_at_least(0.0), ("text",), purpose="text"),
        Option("rounds", _int_at_least(1), ("video", "causal", "text"), purpose="--compare-dense"),
    )
}
"""Every option a user can type for a generation, by name."""


def _fmt(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def option_error(name: str, value, allowed: str, *, flag: bool = True) -> str:
    """``--steps=0 is not allowed; allowed: an integer >= 1`` (``steps=0 ...`` with ``flag=False``)."""
    shown = OPTIONS[name].flag if (flag and name in OPTIONS) else name
    return f"{shown}={_fmt(value)} is not allowed; allowed: {allowed}"


def resolve_method(family: str, method: str | None) -> str:
    """The method a run uses: ``method`` if the family can run it, else its default; a ``ValueError``
    naming the allowed ones otherwise."""
    allowed = FAMILY_METHODS[family]
    if method is None:
        return allowed[0]
    if method not in allowed:
        raise ValueError(
            f"--method={method!r} is not allowed for {FAMILY_NAMES[family]}; allowed: {', '.join(allowed)}"
        )
    return method


def check_options(values: Mapping[str, object], run: Run, *, flag: bool = True) -> list[str]:
    """One line per problem of ``values`` (name -> value; ``None`` = not given) for ``run``: a value out
    of range, or an option that does not apply to the run's family or method (with the reason).

    Names not in :data:`OPTIONS` are ignored (the caller checks its own, e.g. ``prompt``). With
    ``flag=False`` messages name the options as columns (``steps``) instead of flags (``--steps``).
    """
    problems = []
    for name, value in values.items():
        option = OPTIONS.get(name)
        if option is None or value is None:
            continue
        shown = option.flag if flag else name
        if run.family not in option.families or (
            option.methods is not None and run.method not in option.methods
        ):
            problems.append(
                f"{shown}={_fmt(value)} does not apply: it is for {option.purpose or 'another kind of run'}; "
                f"this run is {run.describe()}"
            )
            continue
        allowed = option.check(value)
        if allowed is not None:
            problems.append(f"{shown}={_fmt(value)} is not allowed; allowed: {allowed}")
    problems.extend(_check_together(values, run, flag=flag))
    return problems


def _check_together(values: Mapping[str, object], run: Run, *, flag: bool) -> list[str]:
    """Constraints between options (only between values that passed their own checks)."""

    def ok(name):
        v = values.get(name)
        return v if v is not None and OPTIONS[name].check(v) is None else None

    def shown(name):
        return OPTIONS[name].flag if flag else name

    problems = []
    if run.family == "text":
        gen, block, steps = ok("gen_length"), ok("block_length"), ok("steps")
        if gen is not None and block is not None and gen % block:
            problems.append(
                f"{shown('block_length')}={block} must divide {shown('gen_length')}={gen}; "
                "allowed: a divisor of the generation length"
            )
        if gen is not None and steps is not None and steps > gen:
            problems.append(
                f"{shown('steps')}={steps} is more than {shown('gen_length')}={gen}; allowed: at most one "
                "step per generated token"
            )
        if gen is not None and block is not None and steps is not None and not gen % block:
            blocks = gen // block
            if steps % blocks:
                problems.append(
                    f"{shown('steps')}={steps} must be a multiple of the number of blocks "
                    f"{shown('gen_length')}/{shown('block_length')}={blocks}"
                )
    return problems


def given(values: Mapping[str, object], names: Iterable[str]) -> dict[str, object]:
    """The entries of ``values`` named in ``names`` that are not ``None``."""
    return {k: values[k] for k in names if values.get(k) is not None}


__all__ = [
    "FAMILY_METHODS",
    "OPTIONS",
    "OUTPUT_EXTENSIONS",
    "Option",
    "Run",
    "check_options",
    "given",
    "option_error",
    "resolve_method",
]
