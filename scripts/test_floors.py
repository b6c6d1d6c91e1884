"""Run the core tests on the lowest versions pyproject.toml declares (its ``>=`` floors).

Makes a virtual environment that sees the installed packages (``--system-site-packages``: torch and
the test tools come from there), installs every core dependency at exactly its declared floor on top,
and runs the tests of the code those dependencies serve (loaders, diffusion-LM pipeline, processors,
runners, metrics). Used by ``.ci/run``; by hand: ``python3 scripts/test_floors.py [pytest args]``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    raise SystemExit("scripts/test_floors.py needs Python >= 3.11 (tomllib)") from None

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FASTGEN_FLOORS_VENV", "/tmp/fastgen-floors-venv"))
TESTS = [
    "tests/test_lm_loaders.py",
    "tests/test_diffusion_lm.py",
    "tests/test_processors_wan.py",
    "tests/test_processors_hunyuan.py",
    "tests/test_sparsed.py",
    "tests/test_video_runner.py",
    "tests/test_text_runner.py",
    "tests/test_io_metrics.py",
    "tests/test_pipeline_conventions.py",
]
"""The tests of the code that transformers, diffusers, accelerate, safetensors, numpy... serve."""

SKIP = {"torch", "triton", "ninja"}
"""Floors not reinstalled: torch is the machine's CPU build (its floor is that version), triton and
ninja are tools whose floor is the version installed here."""


def floors() -> dict[str, str]:
    """``name -> floor`` of every core dependency declared as ``name>=floor`` in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for spec in project["dependencies"]:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", spec)
        if match is None:
            raise SystemExit(f"dependency {spec!r} has no >= floor")
        found[match.group(1)] = match.group(2)
    return found


def main(argv: list[str]) -> int:
    pins = [f"{name}=={version}" for name, version in floors().items() if name not in SKIP]
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    python = str(VENV / "bin" / "python")
    print("floors:", " ".join(pins), flush=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([python, "-m", "pytest", "-q", *TESTS, *argv], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
