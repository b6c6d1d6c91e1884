"""The checkout is safe to run from: nothing importable from the repository root shadows an installed
distribution, and code run with the root as working directory imports diffusers' and transformers'
models and every fastgen subpackage.

The root's ``kernels/`` folder once was a package: with the root on ``sys.path`` (``python -m pytest``,
``python -c``, a notebook beside README.md) it was found before Hugging Face's ``kernels``, which
transformers imports, and every model import failed.
"""

from __future__ import annotations

import importlib.metadata
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def root_importable_names() -> dict[str, str]:
    """Top-level names a regular import resolves in the repository root: ``name -> what``.

    A folder without ``__init__.py`` is only a namespace portion: any regular package or module of the
    same name elsewhere on ``sys.path`` wins over it, so it shadows nothing.
    """
    names = {}
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names[entry.name] = "package"
        elif entry.is_file() and entry.suffix in (".py", ".pyc", ".so") and entry.name != "setup.py":
            names[entry.name.split(".")[0]] = "module"
    return names


def _this_project() -> set[str]:
    """Distribution names that are this checkout: the declared name and metadata built into the root."""
    own = {"fastgen-sparse"}
    for dist in importlib.metadata.distributions():
        if Path(str(dist.locate_file(""))).resolve() == ROOT:  # an egg-info left in the root by a build
            own.add(dist.metadata["Name"])
    return own


def test_nothing_importable_from_the_root_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    names = root_importable_names()
    assert "fastgen" in names  # the check sees the root's packages at all
    own = _this_project()
    shadowing = {name: installed[name] for name in names if set(installed.get(name, ())) - own}
    assert not shadowing, f"root names that shadow installed distributions: {shadowing}"


def test_the_root_folders_of_the_subpackages_are_no_packages():
    # kernels/, pipelines/ and app/ hold fastgen.kernels / .pipelines / .app; an __init__.py there would
    # make `import kernels` from the root find this folder instead of Hugging Face's distribution.
    for folder in ("kernels", "pipelines", "app"):
        assert (ROOT / folder).is_dir()
        assert not (ROOT / folder / "__init__.py").exists(), folder


def _fastgen_modules() -> list[str]:
    """Every module of fastgen, its subpackages and the root folders they map."""
    import fastgen
    import fastgen.app
    import fastgen.kernels
    import fastgen.pipelines

    found = {"fastgen", "fastgen.kernels", "fastgen.pipelines", "fastgen.app"}
    for package in (fastgen, fastgen.kernels, fastgen.pipelines, fastgen.app):
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            if not info.name.rsplit(".", 1)[-1].startswith("__"):
                found.add(info.name)
    return sorted(found)


IMPORTS_FROM_THE_ROOT = """
import importlib, os, sys
import transformers.integrations.hub_kernels
import kernels
ours = os.path.join(os.path.realpath(sys.argv[1]), "kernels") + os.sep
assert not kernels.__file__ or not os.path.realpath(kernels.__file__).startswith(ours), kernels.__file__
from diffusers import AutoencoderKLWan, HunyuanVideoTransformer3DModel, WanTransformer3DModel
from transformers import LlamaForCausalLM
for name in sys.argv[2:]:
    importlib.import_module(name)
print("imported", len(sys.argv) - 2)
"""


@pytest.mark.parametrize("how", ["python -c", "python -m"])
def test_models_and_every_fastgen_module_import_with_the_root_as_working_directory(how, tmp_path):
    modules = [m for m in _fastgen_modules() if not m.endswith("__main__")]
    assert {"fastgen.kernels.cpu_attn", "fastgen.pipelines.diffusion_lm", "fastgen.app.demo"} <= set(modules)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    if how == "python -c":
        argv = [sys.executable, "-c", IMPORTS_FROM_THE_ROOT]
    else:  # a script module run with -m from the root, as `python -m pytest` or `python -m fastgen.cli` are
        script = tmp_path / "imports_from_root.py"
        script.write_text(IMPORTS_FROM_THE_ROOT)
        env["PYTHONPATH"] = str(tmp_path)
        argv = [sys.executable, "-m", "imports_from_root"]
    done = subprocess.run(
        [*argv, str(ROOT), *modules], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout


def test_every_package_of_the_source_tree_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly (the root folders are mapped): a new subpackage
    missing from the list installs from a checkout but is absent from the wheel a user installs. The
    mapped folders' subpackages (``pipelines/training/`` -> ``fastgen.pipelines.training``) count too."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "fastgen").rglob("__init__.py")
    }
    for folder in ("kernels", "pipelines", "app"):  # the mapped root folders and their subpackages
        assert not (ROOT / folder / "__init__.py").exists(), folder  # the root folder itself is no package
        found.add(f"fastgen.{folder}")
        found |= {
            ".".join(["fastgen", *init.parent.relative_to(ROOT).parts])
            for init in (ROOT / folder).rglob("*/__init__.py")
        }
    assert "fastgen.pipelines.training" in found  # the check sees the mapped folders' subpackages
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
