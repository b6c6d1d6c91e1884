"""The one set of argument checks and the one log-once helper every fastgen layer uses.

Every check raises a ``ValueError`` whose one line names the parameter, the value and what is allowed;
``name`` is the parameter as the user wrote it (``"select"``, ``"LightForcingConfig.keep_frames"``).
This module imports nothing from fastgen, so any layer may use it without an import cycle.
"""

from __future__ import annotations

import logging

_logged: set[str] = set()
"""Messages already logged by :func:`log_once` without an own ``seen`` set (process-wide)."""


def log_once(
    logger: logging.Logger, message: str, level: int = logging.WARNING, seen: set[str] | None = None
) -> None:
    """Log ``message`` on ``logger`` the first time only: fallbacks must be visible but not flood the log.

    ``seen`` is the set that remembers what was logged (an instance's own set logs once per instance);
    without it, once per process."""
    seen = _logged if seen is None else seen
    if message not in seen:
        seen.add(message)
        logger.log(level, message)


def log_moved(old: str, new: str) -> None:
    """One deprecation line (once per process) for an old import path kept as a re-export shim."""
    log_once(
        logging.getLogger("fastgen.deprecation"),
        f"fastgen: `{old}` moved to `{new}`; the old import path works for one more release",
    )


def is_int(value) -> bool:
    """A Python integer and not a bool (``True`` is an ``int`` to ``isinstance``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A Python int or float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 0) -> None:
    """``value`` is an integer >= ``minimum``."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def check_int_in(name: str, value, low: int, high: int, *, high_open: bool = False) -> None:
    """``value`` is an integer in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    if not is_int(value) or value < low or (value >= high if high_open else value > high):
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range; allowed: integer in [{low}, {high}{hi}")


def check_number(
    name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """``value`` is a number in the interval from ``low`` to ``high`` (each end open or closed)."""
    if not is_number(value):
        raise ValueError(f"{name}={value!r} must be a number")
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is out of range; allowed: {lo}{low}, {high}{hi}")


def check_block_size(name: str, value) -> None:
    """``value`` is a power of two >= 16 (a block of tokens the engines tile by)."""
    if not is_int(value) or value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a power of two >= 16")


def check_choice(name: str, value, allowed: tuple) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")


__all__ = [
    "check_block_size",
    "check_choice",
    "check_int",
    "check_int_in",
    "check_number",
    "is_int",
    "is_number",
    "log_moved",
    "log_once",
]
