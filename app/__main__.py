"""``python -m app`` (from the repository root) launches the Gradio demo; same options as ``fastgen demo``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the ``fastgen demo`` options and launch the demo."""
    from fastgen.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
