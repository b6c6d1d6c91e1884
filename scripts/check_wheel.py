"""Check the wheel a user installs: build it, install it into a clean virtual environment (today's
releases of every dependency; torch is the pinned CPU build), and from a directory outside the
checkout run the main job and build the native CPU kernel from the installed sources.

Used by ``.ci/run``; by hand: ``python3 scripts/check_wheel.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk; an unpinned torch pulls CUDA packages


def readme_main_job() -> list[str]:
    """The arguments of the ``fastgen generate`` command that README.md gives as the main job, with
    its ``--out`` removed (the check writes elsewhere)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if "fastgen generate" in line]
    if not lines:
        raise SystemExit("README.md gives no `fastgen generate` command")
    words = shlex.split(lines[0][lines[0].index("fastgen generate") :])[1:]
    if "--out" in words:
        at = words.index("--out")
        del words[at : at + 2]
    return words


KERNEL_CHECK = """
import os, sys
import fastgen, fastgen.kernels
from fastgen.kernels.cpu_attn import warm_up_cpu_kernel
here = os.path.realpath(sys.argv[1])
for module in (fastgen, fastgen.kernels):
    where = os.path.realpath(getattr(module, "__file__", None) or module.__path__[0])
    assert not where.startswith(here), f"{module.__name__} came from the checkout: {where}"
assert "site-packages" in fastgen.kernels.__path__[0], fastgen.kernels.__path__
reason = warm_up_cpu_kernel()
assert reason is None, f"the native CPU kernel did not build from the installed sources: {reason}"
print("fastgen.kernels from", fastgen.kernels.__path__[0], "; native CPU kernel built")
"""


def run(argv: list[str], **kwargs) -> None:
    """Run a command, echoing it; stop on failure."""
    print("+", " ".join(str(a) for a in argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fastgen-wheel-") as folder:
        work = Path(folder)
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(ROOT)])
        (wheel,) = (work / "dist").glob("fastgen_sparse-*.whl")
        run([sys.executable, "-m", "venv", str(work / "venv")])
        python, fastgen = work / "venv" / "bin" / "python", work / "venv" / "bin" / "fastgen"
        run([str(python), "-m", "pip", "install", "-q", TORCH, str(wheel)])
        outside = work / "user"
        outside.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["TORCH_EXTENSIONS_DIR"] = str(work / "torch_extensions")  # a build of its own, from the wheel
        run([str(fastgen), *readme_main_job(), "--out", str(outside / "tiny.mp4")], cwd=outside, env=env)
        if not (outside / "tiny.mp4").is_file():
            raise SystemExit("the main job wrote no video")
        run([str(python), "-c", KERNEL_CHECK, str(ROOT)], cwd=outside, env=env)
    print("wheel check passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
