"""Shared test fixtures: deterministic seeds, NaN-filled ``torch.empty`` / ``torch.empty_like`` /
``Tensor.new_empty``, a fresh log-once memory per test, the CPU engine switch."""

from __future__ import annotations

import os

# Triton decides between compiled and interpreted mode when it is first imported: on a machine
# without CUDA the kernels are tested in the interpreter, so set it before anything imports triton.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils._device  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# torch caches the set of factory functions a ``with torch.device(...)`` context redirects the first
# time one is entered: if that happened inside a test, the set would hold that test's NaN-filling
# wrapper below instead of ``torch.empty``, and every later ``with torch.device("meta")`` would
# allocate ``torch.empty`` on the CPU. Build the set now, from the real functions.
torch.utils._device._device_constructors()


def _nan_filled(factory):
    def wrapper(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        return t

    return wrapper


@pytest.fixture(autouse=True)
def _seed_and_nan_empty(monkeypatch):
    """Seed every test and make ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return
    NaN (as fla's conftest does), so a kernel or an op that reads memory it never wrote fails. The
    Triton wrappers allocate their outputs with ``torch.empty_like``."""
    torch.manual_seed(0)
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def _fresh_log_once_memory():
    """Each test sees fastgen's process-wide log-once lines afresh (a fallback logged by an earlier test
    must not hide the line a later test checks)."""
    from fastgen import _validation

    _validation._logged.clear()
    yield


@pytest.fixture(params=["native", "slabs"])
def cpu_engine(request, monkeypatch):
    """Run a CPU fast-path test twice: on the native kernel (fp32) and on PyTorch's flash kernel
    over gathered slabs (``FASTGEN_CPU_KERNEL=0``, and what every other dtype uses)."""
    if request.param == "slabs":
        monkeypatch.setenv("FASTGEN_CPU_KERNEL", "0")
    else:
        from fastgen.kernels.cpu_attn import cpu_kernel_unavailable

        why = cpu_kernel_unavailable()
        assert why is None, f"the native CPU kernel must build on the test machine: {why}"
    return request.param
