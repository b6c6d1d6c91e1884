"""``fastgen.attention_stats(model)``: one interface for every method, the LM methods included."""

from __future__ import annotations

import pytest
import torch
from fastgen.pipelines.tiny_lm import build_tiny_llada

import fastgen
from fastgen import SparseDConfig, WindowDiffusionConfig
from fastgen.processors import transformers_lm

GEN = dict(gen_length=32, steps=8, block_length=32, progress=False, generator=0)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_llada(device="cpu", dtype=torch.float32)


def test_sparsed_rows_come_through_the_shared_interface(pipe):
    fastgen.apply_sparse_attention(pipe.model, SparseDConfig(skip=0.25, select=0.3, block_size=16))
    try:
        pipe(prompt="hello there", **GEN)
        rows = fastgen.attention_stats(pipe.model)
        own = transformers_lm.stats(pipe.model)
        assert rows and len(rows) == len(own)
        assert [r["layer"] for r in rows] == [r["layer"] for r in own]
        assert all(r["method"] == "sparsed" for r in rows)
        assert [r["density"] for r in rows] == [r["density"] for r in own]
        assert all(r["density"] < 1.0 for r in rows)  # the pattern dropped blocks
        assert all("block_mask" not in r for r in rows)  # masks are opt-in
        with fastgen.recording_attention_stats(pipe.model, "masks"):
            assert all(r["block_mask"].dtype == torch.bool for r in fastgen.attention_stats(pipe.model))
        fastgen.record_attention_stats(pipe.model, "off")
        assert fastgen.attention_stats(pipe.model) == []
    finally:
        fastgen.remove_sparse_attention(pipe.model)
    assert fastgen.attention_stats(pipe.model) == []


def test_window_diffusion_rows_match_its_trace(pipe):
    wd = WindowDiffusionConfig(window=16, active=4, refresh_cycle=4)
    out = pipe(prompt="hello there", acceleration=[wd], **GEN)
    rows = fastgen.attention_stats(pipe.model)
    assert rows and all(r["method"] == "window_diffusion" for r in rows)
    total = out.sequences.shape[1]
    scores = sum(t["queries"] * t["keys"] for t in out.window_trace)
    expected = scores / (len(out.window_trace) * total**2)
    assert rows[0]["density"] == pytest.approx(expected)
    assert 0.0 < rows[0]["density"] < 1.0 and rows[0]["steps"] == len(out.window_trace)
    assert len({r["layer"] for r in rows}) == pipe.model.config.num_hidden_layers
