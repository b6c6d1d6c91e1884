"""Optional dependencies: which pip extra (or package) brings each one, and the message a user gets
instead of a raw ``ModuleNotFoundError`` traceback when one is missing.

The command line catches a missing optional module and prints :func:`missing_dependency_message`;
library code that needs one imports it through :func:`require`, which raises
:class:`MissingDependencyError` (an ``ImportError``) with the same words.
"""

from __future__ import annotations

import importlib
from types import ModuleType

OPTIONAL_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "gradio": ("the demo (fastgen demo)", "pip install 'fastgen-sparse[app]'"),
    "gradio_client": ("the demo's client", "pip install 'fastgen-sparse[app]'"),
    "matplotlib": ("plots and block-mask pictures", "pip install 'fastgen-sparse[app]' (or [bench])"),
    "triton": ("the GPU kernels (Linux + CUDA)", "pip install triton"),
    "hypothesis": ("the property tests", "pip install 'fastgen-sparse[test]'"),
    "playwright": ("the demo's browser test", "pip install 'fastgen-sparse[test]'"),
    "pytest": ("the tests", "pip install 'fastgen-sparse[test]'"),
    "imageio": ("writing and reading mp4 files", "pip install imageio imageio-ffmpeg"),
    "imageio_ffmpeg": ("writing and reading mp4 files", "pip install imageio-ffmpeg"),
    "accelerate": ("model CPU offload", "pip install accelerate"),
    "huggingface_hub": ("downloading checkpoints from the Hub", "pip install huggingface_hub"),
}
"""Top-level module -> (what needs it, how to install it)."""


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message says which and how to install it."""


def missing_dependency_message(err: BaseException) -> str | None:
    """The install hint for a ``ModuleNotFoundError`` of a known optional module, else None."""
    name = getattr(err, "name", None)
    if not isinstance(err, ImportError) or not name:
        return None
    top = name.split(".")[0]
    if top not in OPTIONAL_DEPENDENCIES:
        return None
    needed_for, install = OPTIONAL_DEPENDENCIES[top]
    return f"{top} is not installed; it is needed for {needed_for}. Install it with: {install}"


def require(module: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying what to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        message = missing_dependency_message(err)
        if message is None:
            raise
        raise MissingDependencyError(message, name=err.name) from err


__all__ = ["OPTIONAL_DEPENDENCIES", "MissingDependencyError", "missing_dependency_message", "require"]
