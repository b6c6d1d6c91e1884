"""``fastgen bench causal`` at toy size: the figures it reports are present and consistent, and the
attention memory probe measures a real peak (an earlier probe read 0 on the CPU)."""

from __future__ import annotations

import pytest
import torch

from fastgen.bench import causal


def test_attention_memory_probe_sees_the_output_of_the_call():
    frames, block, frame_hw = 9, 64, (16, 32)  # 128 tokens per frame
    mem = causal.attention_memory(frames, block, torch.device("cpu"), frame_hw)
    out_bytes = 12 * 3 * 128 * 128 * 4  # the call's output [1, 12, 3 frames x 128, 128] fp32 alone
    for kind in ("dense", "light_forcing"):
        peak = mem[f"{kind}_attention_peak_bytes"]
        assert peak >= out_bytes, (kind, peak)  # the old ru_maxrss probe returned 0 here
        assert peak < 64 * out_bytes, (kind, peak)  # bounded: no N x N score matrix of several GB


@pytest.mark.slow  # a few seconds of generation per variant
def test_causal_bench_reports_every_variant_at_toy_size():
    result = causal.run_causal_bench(rounds=1, frames=9, block_size=64, frame_hw=(16, 32))
    assert result["dense_seconds_median"] > 0 and 0 <= result["attention_share"] <= 1
    variants = result["variants"]
    assert set(variants) >= {"light_forcing", "topk", "light_forcing_rectified"}
    for name in ("light_forcing", "topk"):
        row = variants[name]
        assert 0 < row["rel_l2_vs_dense"] < 0.5
        assert 0 < row["computed_fraction_of_dense_attention"] < 1
        assert row["seconds_median"] > 0 and row["ideal_speedup"] >= 1
