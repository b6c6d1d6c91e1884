"""The prepared GPU check (``fastgen bench gpu``): its CPU subset under the Triton interpreter, its
JSON, and that it reports a kernel that disagrees with the reference."""

from __future__ import annotations

import json

import pytest
import torch
from fastgen.kernels.block_sparse_attn import _is_interpreted

from fastgen.bench import gpu

SMALL = (gpu.Shape("test-odd", 2, 1, 40, 16, block_size=16, text_tokens=3, keep=0.4),)

pytestmark = pytest.mark.skipif(
    not _is_interpreted() and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or CUDA"
)


def _run(**kw):
    if _is_interpreted():
        return gpu.run_gpu_check(interpret=True, shapes=SMALL, **kw)
    return gpu.run_gpu_check(shapes=SMALL, rounds=1, **kw)


def test_every_kernel_passes_in_both_half_dtypes():
    report = _run()
    assert report["all_ok"]
    seen = {(c["kernel"], c["dtype"]) for c in report["cases"]}
    assert seen == {
        (kernel, dtype)
        for kernel in ("block_sparse_attention_triton", "rectified_exact_attention_triton")
        for dtype in ("bfloat16", "float16")
    }
    for case in report["cases"]:
        assert case["checked_query_blocks"][0] == 0 and case["checked_query_blocks"][-1] == 2  # partial last
        assert 0 < case["rel_rmse"] <= case["tolerance"] and 0 < case["density"] < 1


def test_a_wrong_kernel_is_reported(monkeypatch):
    import fastgen.kernels as kernels

    real = kernels.block_sparse_attention_triton

    def off_by_a_bit(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.05, lse

    monkeypatch.setattr(kernels, "block_sparse_attention_triton", off_by_a_bit)
    report = _run(dtypes=("float16",))
    verdict = {c["kernel"]: c["ok"] for c in report["cases"]}
    assert verdict == {"block_sparse_attention_triton": False, "rectified_exact_attention_triton": True}
    assert not report["all_ok"]


def test_reference_equals_dense_attention_when_every_block_is_selected():
    """The check's own reference against plain softmax attention (every block kept, no extras)."""
    shape = gpu.Shape("full", 1, 2, 37, 16, block_size=16, keep=1.0)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=generator) for _ in range(3))
    selected = torch.arange(3, dtype=torch.int32).expand(1, 2, 3, 3)
    counts = torch.full((1, 2, 3), 3, dtype=torch.int32)
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    for block in range(3):
        rows = slice(16 * block, min(37, 16 * (block + 1)))
        got = gpu.reference_rows(q, k, v, selected, counts, block, shape)
        torch.testing.assert_close(got, dense[:, :, rows], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not _is_interpreted(), reason="the CLI subset runs under the interpreter")
def test_cli_writes_one_json(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "TINY_SHAPES", SMALL)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--interpret", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "interpret" and report["all_ok"] and len(report["cases"]) == 4
    assert {"torch", "triton", "device", "seconds"} <= set(report)


def test_cuda_mode_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(ValueError, match="needs CUDA"):
        gpu.run_gpu_check()
