"""Run the core tests on the lowest versions pyproject.toml declares (its ``>=`` floors).

Makes a virtual environment layered over the running interpreter's packages (a ``.pth`` line naming its
site-packages: torch and the test tools come from there; CI runs this with its fresh venv's python),
installs every core dependency at exactly its declared floor on top (the layer's own site-packages
come first on ``sys.path``), and runs the tests of the code those dependencies serve (loaders,
diffusion-LM pipeline, processors, runners, metrics). Used by ``.ci/run``; by hand:
``python3 scripts/test_floors.py [pytest args]``.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    raise SystemExit("scripts/test_floors.py needs Python >= 3.11 (tomllib)") from None

ROOT = Path(__file__).resolve().parents[1]
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
    # a new environment on every run (pip's cache keeps it quick), so nothing left from an earlier run counts
    with tempfile.TemporaryDirectory(prefix="fastgen-floors-") as folder:
        return run_on_floors(Path(folder) / "venv", pins, argv)


def run_on_floors(venv: Path, pins: list[str], argv: list[str]) -> int:
    """Make ``venv`` layered over this interpreter's packages, pin the floors in it, run the tests."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    layer = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the packages of the interpreter running this script (torch, pytest) under the floors
    Path(layer, "base-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    print("floors:", " ".join(pins), flush=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([python, "-m", "pytest", "-q", *TESTS, *argv], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
