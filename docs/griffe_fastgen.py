"""A griffe extension for the API reference: fastgen's docstrings, read as Markdown.

fastgen's docstrings are Google style with a few reST habits: an ``Example:`` section (griffe's Google
parser knows ``Examples:``; ``Example:`` would render its ``>>>`` lines as quoted text) and Sphinx roles
such as ``:func:`~fastgen.attention.execute_plan```, shown here as code (``execute_plan``).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|data|mod|attr|obj|exc):`(~?)([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


def _role_as_code(match: re.Match) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class FastgenDocstrings(griffe.Extension):
    """Rewrite ``Example:`` to ``Examples:`` and Sphinx roles to code spans before parsing."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_role_as_code, text)
