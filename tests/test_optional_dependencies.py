"""A missing optional dependency gives a message that says what to install, never a raw traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastgen.cli import main
from fastgen.optional import OPTIONAL_DEPENDENCIES, MissingDependencyError, require


def _hide(monkeypatch, *modules):
    """Make ``import module`` fail as if it were not installed (``sys.modules[name] = None``)."""
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_demo_without_the_app_extra_says_what_to_install(monkeypatch, capsys):
    _hide(monkeypatch, "gradio", "gradio_client")
    monkeypatch.delitem(sys.modules, "fastgen.app.demo", raising=False)
    with pytest.raises(SystemExit) as err:
        main(["demo"])
    assert err.value.code == 3
    printed = capsys.readouterr().err
    assert "gradio is not installed" in printed and "pip install 'fastgen-sparse[app]'" in printed
    assert "Traceback" not in printed


@pytest.mark.slow  # a fresh interpreter importing torch: ~10-30 s on the shared machine
def test_demo_without_the_app_extra_in_a_fresh_process():
    """The console entry point, as a user runs it: one line on stderr, exit code 3, no traceback."""
    code = "import sys; sys.modules['gradio'] = None; from fastgen.cli import main; sys.exit(main(['demo']))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert "pip install 'fastgen-sparse[app]'" in run.stderr and "Traceback" not in run.stderr


def test_bench_plot_without_matplotlib_says_what_to_install(monkeypatch):
    from fastgen.bench.attention import write_plot

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError, match=r"pip install 'fastgen-sparse\[app\]' \(or \[bench\]\)"):
        write_plot({}, "unused.png")


@pytest.mark.parametrize("module", sorted(OPTIONAL_DEPENDENCIES))
def test_every_optional_dependency_has_an_install_hint(monkeypatch, module):
    _hide(monkeypatch, module)
    with pytest.raises(MissingDependencyError) as err:
        require(module)
    assert isinstance(err.value, ImportError) and err.value.name == module
    assert f"{module} is not installed" in str(err.value)
    assert OPTIONAL_DEPENDENCIES[module][1] in str(err.value)


def test_unknown_missing_module_is_not_disguised(monkeypatch):
    _hide(monkeypatch, "no_such_module_fastgen")
    with pytest.raises(ModuleNotFoundError) as err:
        require("no_such_module_fastgen")
    assert not isinstance(err.value, MissingDependencyError)
