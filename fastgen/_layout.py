"""Where the modules of ``fastgen.kernels``, ``fastgen.pipelines`` and ``fastgen.app`` live.

Their code sits in the repository root's ``kernels/``, ``pipelines/`` and ``app/`` folders, which
are deliberately not packages (no ``__init__.py``): a package at the root would shadow the installed
distribution of the same name for anything run from the root (Hugging Face's ``kernels``, which
transformers imports, is the case that broke). Each subpackage's public surface is a module
(``fastgen/kernels.py``, ...) that sets its ``__path__`` to the folder found here, so
``fastgen.kernels.cpu_attn`` and ``from fastgen.pipelines import load_preset`` work the same in a
source checkout, an editable install and a wheel (where setuptools copies the folder to
``fastgen/<name>/``).
"""

from __future__ import annotations

import os


def subpackage_path(name: str, marker: str) -> list[str]:
    """``__path__`` of ``fastgen.<name>``: ``fastgen/<name>/`` when installed from a wheel, else the
    repository root's ``<name>/``; the folder must hold ``marker`` (so an unrelated folder of the
    same name, such as another distribution's, is never taken)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, name), os.path.join(os.path.dirname(here), name)):
        if os.path.isfile(os.path.join(folder, marker)):
            return [folder]
    raise ImportError(
        f"fastgen.{name}: its modules are missing (no {marker} beside {here}); reinstall fastgen"
    )
