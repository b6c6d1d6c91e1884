"""fastgen's public names, where each is defined, and whether its docstring carries an example.

Used by the documentation build (``docs/hooks.py`` writes the API reference pages from it and fails
the build on a public name without a documented example) and by ``tests/test_docs.py`` (the same
check in the test suite). The public names are what ``fastgen``, ``fastgen.attention`` and
``fastgen.pipelines`` list in ``__all__``; where a name is defined is read from the object, so the
reference follows the code when modules move.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any

PUBLIC_MODULES = ("fastgen", "fastgen.attention", "fastgen.pipelines")
"""Modules whose ``__all__`` is the public API (one API reference page each)."""


@dataclass(frozen=True)
class PublicName:
    """One exported name: ``module.name`` is how users import it; ``target`` is where it is defined."""

    module: str
    name: str
    obj: Any
    target: str
    docstring: str | None

    @property
    def public_path(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def is_data(self) -> bool:
        return not (inspect.isclass(self.obj) or callable(self.obj))


def _own_docstring(obj: Any) -> str | None:
    """The docstring written for ``obj`` itself (not inherited, not dataclass' generated signature)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc:
        return None
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):  # written by @dataclass
        return None
    return inspect.cleandoc(doc)


def _data_origin(name: str, obj: Any) -> tuple[str, str | None] | None:
    """(module, attribute docstring) of the fastgen module whose source assigns ``name = obj``."""
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith("fastgen") or getattr(module, name, None) is not obj:
            continue
        try:
            tree = ast.parse(inspect.getsource(module))
        except (OSError, TypeError):
            continue
        body = tree.body
        for i, node in enumerate(body):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                following = body[i + 1] if i + 1 < len(body) else None
                doc = None
                if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                    if isinstance(following.value.value, str):
                        doc = inspect.cleandoc(following.value.value)
                return module_name, doc
    return None


def public_names() -> list[PublicName]:
    """Every name in the ``__all__`` of :data:`PUBLIC_MODULES`, resolved to where it is defined."""
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                target = f"{obj.__module__}.{obj.__qualname__}"
                doc = _own_docstring(obj)
            else:
                origin = _data_origin(name, obj)
                target, doc = (
                    (f"{origin[0]}.{name}", origin[1]) if origin else (f"{module_name}.{name}", None)
                )
            names.append(PublicName(module_name, name, obj, target, doc))
    return names


def has_example(docstring: str | None) -> bool:
    """True when the docstring shows an example: a ``>>>`` session or a fenced code block."""
    return bool(docstring) and (">>>" in docstring or "```" in docstring)


def undocumented(names: list[PublicName] | None = None) -> list[str]:
    """Public names whose docstring is missing or has no example, each with what is missing."""
    problems = []
    for entry in names if names is not None else public_names():
        if not entry.docstring:
            problems.append(f"{entry.public_path} (defined as {entry.target}): no docstring")
        elif not has_example(entry.docstring):
            problems.append(f"{entry.public_path} (defined as {entry.target}): docstring has no example")
    return problems
