"""Issue 21, library level: adapters refuse configs they cannot run (with the reason), and options that a
code path cannot honour say so (a log line) or are refused, never silently dropped."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from fastgen.pipelines.tiny_video import build_tiny_causal_wan, build_tiny_wan

import fastgen
from fastgen import (
    LightForcingConfig,
    RectifiedSpaAttnConfig,
    apply_sparse_attention,
    remove_sparse_attention,
)
from fastgen.processors import light_forcing_wan, wan
from fastgen.processors.causal_wan import CausalWanSelfAttnProcessor, CausalWanState, causal_generation

SMALL_WAN = dict(height=16, width=16, num_frames=5, num_inference_steps=1, output_type="latent")


def rectified(**kw):
    base = {"sparsity": 0.5, "block_size": 16, "dense_layers": 0, "warmup_steps": 0, "min_tokens": 16}
    base.update(kw)
    return RectifiedSpaAttnConfig(**base)


def test_light_forcing_on_a_bidirectional_wan_pipeline_is_refused_with_the_reason():
    pipe = build_tiny_wan(num_layers=1)
    support = light_forcing_wan.supports_pipeline(pipe, LightForcingConfig())
    assert not support and "CausalWanPipeline" in support.reason
    with pytest.raises(
        ValueError, match=r"config=LightForcingConfig cannot run on pipe=WanPipeline: Light Forcing"
    ):
        apply_sparse_attention(pipe, LightForcingConfig())
    assert fastgen.tracking.get_step_tracker(pipe.transformer) is None  # nothing was installed


def test_light_forcing_on_the_transformer_of_a_wan_pipeline_fails_at_its_first_forward():
    pipe = build_tiny_wan(num_layers=1)
    pipe.set_progress_bar_config(disable=True)
    apply_sparse_attention(pipe.transformer, LightForcingConfig())  # the transformer alone cannot tell
    try:
        with pytest.raises(ValueError, match="outside the causal Wan's chunked generation"):
            pipe(prompt="a kite", **SMALL_WAN)
    finally:
        remove_sparse_attention(pipe.transformer)
    pipe(prompt="a kite", **SMALL_WAN)  # removed: runs again


def test_rectified_on_the_causal_wan_is_refused_at_apply_and_at_generation():
    pipe = build_tiny_causal_wan(num_layers=1)
    support = wan.supports_pipeline(pipe, rectified())
    assert not support and "LightForcingConfig" in support.reason
    with pytest.raises(
        ValueError, match=r"cannot run on pipe=CausalWanPipeline: .*allowed there: LightForcingConfig"
    ):
        apply_sparse_attention(pipe, rectified())
    apply_sparse_attention(pipe.transformer, rectified())  # the transformer alone cannot tell
    try:
        with pytest.raises(
            ValueError, match="RectifiedSpaAttnConfig applied; the causal Wan's chunked generation"
        ):
            with causal_generation(pipe.transformer, batch_size=1, num_frames=3, frame_tokens=16):
                pass
    finally:
        remove_sparse_attention(pipe.transformer)
    assert apply_sparse_attention(pipe, LightForcingConfig()) is pipe  # the causal method is accepted
    remove_sparse_attention(pipe)


def test_causal_self_attention_with_a_mask_during_a_generation_is_refused():
    state = CausalWanState()
    state.session = types.SimpleNamespace(rope_positions="absolute")
    proc = CausalWanSelfAttnProcessor(0, state)
    hidden = torch.randn(1, 8, 64)
    with pytest.raises(ValueError, match="attention_mask during a causal generation"):
        proc(None, hidden, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))


def _wan_attention():
    pipe = build_tiny_wan(num_layers=1)
    return pipe.transformer.blocks[0].attn1


def test_wan_self_attention_with_a_mask_runs_dense_with_the_fallback_line(caplog):
    attn = _wan_attention()
    proc = wan.WanRectifiedProcessor(rectified(), layer=0)
    hidden = torch.randn(1, 48, attn.inner_dim if hasattr(attn, "inner_dim") else 64)
    mask = torch.ones(1, 1, 48, 48, dtype=torch.bool)
    with caplog.at_level(logging.INFO, logger="fastgen"):
        out = proc(attn, hidden, attention_mask=mask)
        proc(attn, hidden, attention_mask=mask)
    dense = wan.WanRectifiedProcessor(rectified(sparsity=0.0), layer=0)
    assert torch.allclose(out, dense(attn, hidden, attention_mask=mask), atol=1e-6)
    assert caplog.text.count("runs dense attention: self-attention was given an attention_mask") == 1


def test_reorder_and_the_paper_rule_say_once_that_they_are_off_without_a_grid(caplog):
    attn = _wan_attention()
    hidden = torch.randn(1, 48, 64)
    for config, line in (
        (rectified(reorder=True), "reorder=True is off for this call"),
        (rectified(reorder=False, selection="paper", form="paper"), "selection='paper' runs without its 3-D"),
    ):
        proc = wan.WanRectifiedProcessor(config, layer=0)  # set by hand: no tracker, no RoPE table
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastgen"):
            proc(attn, hidden)
            proc(attn, hidden)
        assert caplog.text.count(line) == 1, caplog.text
        assert "grid of this call is unknown" in caplog.text
