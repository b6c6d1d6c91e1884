"""CI runs what README.md tells a user to run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    """The one command in a fenced block of README.md that runs pytest."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if "pytest" in line]
    assert len(commands) == 1, f"README.md must give exactly one test command, found {commands}"
    return commands[0]


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    command = readme_test_command()
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in lines, f"README's test command is not a line of .ci/run: {command}"
    assert "venv" in command and "torch==2.13.0" in command  # a new user's install, never an unpinned torch
    before = lines[: lines.index(command)]
    assert any(re.match(r"rm -rf \.venv\b", line) for line in before), "CI must start from a new venv"
