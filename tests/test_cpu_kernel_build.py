"""The native CPU kernel's build never hangs: a stale torch ``lock`` left by a killed build is removed,
a live builder in another process is waited for only up to the timeout (then the PyTorch path)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from fastgen.kernels import cpu_attn


def _torch_like_load(calls):
    """Stands in for ``cpp_extension.load``: torch's own ``FileBaton`` on the folder's ``lock``, which
    would wait forever on a stale file; here it fails the test instead of hanging."""
    from torch.utils.file_baton import FileBaton

    def load(name, sources, extra_cflags, build_directory, **kwargs):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if not baton.try_acquire():
            raise AssertionError("torch would wait forever on the stale lock")
        calls.append(name)
        baton.release()

    return load


def test_stale_torch_lock_is_removed_with_a_log_line(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_attn._build_directory("fastgen_cpu_test")
    (folder / "lock").write_text("")  # what a process killed mid-build leaves behind
    calls = []
    monkeypatch.setattr(cpp_extension, "load", _torch_like_load(calls))
    with caplog.at_level(logging.WARNING, logger="fastgen.kernels.cpu_attn"):
        assert cpu_attn._compile("fastgen_cpu_test", [], timeout=5.0) is None
    assert calls == ["fastgen_cpu_test"]
    assert not (folder / "lock").exists()
    assert "left by a build of the native CPU kernel that was killed" in caplog.text


def test_build_folder_is_the_one_torch_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_attn._build_directory("fastgen_cpu_x") == tmp_path / "fastgen_cpu_x"


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fastgen.kernels.cpu_attn import exclusive_build
    with exclusive_build(Path(sys.argv[1]), timeout=5.0) as why:
        assert why is None
        print("holding", flush=True)
        time.sleep(60)
    """
)


def test_live_builder_is_waited_for_with_a_timeout_then_a_reason(tmp_path, monkeypatch, caplog):
    """Another live process holds the build: no hang, a log line, then a reason after the timeout."""
    from torch.utils import cpp_extension

    folder = tmp_path / "fastgen_cpu_test"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        (folder / "lock").write_text("")  # the live builder's torch lock: must NOT be removed
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
        monkeypatch.setattr(cpp_extension, "load", _torch_like_load([]))
        with caplog.at_level(logging.WARNING, logger="fastgen.kernels.cpu_attn"):
            why = cpu_attn._compile("fastgen_cpu_test", [], timeout=0.5)
        assert why is not None and "timed out after" in why and "FASTGEN_CPU_BUILD_TIMEOUT" in why
        assert f"waiting up to 0.5 s for process {holder.pid}" in caplog.text
        assert (folder / "lock").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: the OS released its lock, so the next build goes ahead (stale lock removed)
    deadline = time.monotonic() + 5
    calls = []
    monkeypatch.setattr(cpp_extension, "load", _torch_like_load(calls))
    while cpu_attn._compile("fastgen_cpu_test", [], timeout=0.5) is not None:
        assert time.monotonic() < deadline
    assert calls == ["fastgen_cpu_test"]


@pytest.mark.parametrize("raw", ["0", "-3", "soon"])
def test_bad_build_timeout_is_a_value_error(monkeypatch, raw):
    monkeypatch.setenv("FASTGEN_CPU_BUILD_TIMEOUT", raw)
    with pytest.raises(ValueError, match="FASTGEN_CPU_BUILD_TIMEOUT"):
        cpu_attn.build_timeout()


def test_build_folder_is_keyed_by_source_torch_and_interpreter(tmp_path, monkeypatch):
    """Two environments (another sys.prefix or torch) or checkouts (another source) get their own build
    folder instead of rebuilding over each other; the same environment always gets the same one."""
    import sys

    source = tmp_path / "k.cpp"
    source.write_text("int x;")
    name = cpu_attn.extension_name("AVX2", ["-O3"], source=source)
    assert name.startswith("fastgen_cpu_avx2_") and name == cpu_attn.extension_name(
        "AVX2", ["-O3"], source=source
    )
    others = set()
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    others.add(cpu_attn.extension_name("AVX2", ["-O3"], source=source))
    monkeypatch.undo()
    monkeypatch.setattr(cpu_attn.torch, "__version__", "0.0.1")
    others.add(cpu_attn.extension_name("AVX2", ["-O3"], source=source))
    monkeypatch.undo()
    source.write_text("int y;")
    others.add(cpu_attn.extension_name("AVX2", ["-O3"], source=source))
    others.add(cpu_attn.extension_name("AVX2", ["-O2"], source=source))
    assert name not in others and len(others) == 4
