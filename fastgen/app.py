"""Gradio demo: dense vs sparse side by side (``fastgen demo``, or ``python -m fastgen.app``).

The modules are in the repository's ``app/`` folder.
"""

from __future__ import annotations

import sys

from fastgen._layout import subpackage_path

__path__ = subpackage_path("app", "demo.py")  # the modules live in the root's app/


def main(argv: list[str] | None = None) -> int:
    """Parse the ``fastgen demo`` options and launch the demo."""
    from fastgen.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
