"""Rectified SpaAttn processors on diffusers' HunyuanVideoTransformer3DModel: padded text, restore, hand-set."""

from __future__ import annotations

import numpy as np
import torch

import fastgen
from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention, remove_sparse_attention
from fastgen.processors import hunyuan_video
from fastgen.processors.hunyuan_video import HunyuanVideoRectifiedProcessor
from tests.tiny_models import inputs, tiny_hunyuan


def run(model, kw):
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def cfg(**kw):
    base = {"sparsity": 0.5, "block_size": 16, "dense_layers": 0, "warmup_steps": 0, "min_tokens": 32}
    base.update(kw)
    return RectifiedSpaAttnConfig(**base)


def test_sparsity_zero_matches_dense_with_padded_text():
    model = tiny_hunyuan()
    kw = inputs()
    ref = run(model, kw)
    apply_sparse_attention(model, cfg(sparsity=0.0))
    with fastgen.recording_attention_stats(model, "masks"):
        out = run(model, kw)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    rows = hunyuan_video.stats(model)
    assert [r["layer"] for r in rows] == [0, 1]  # double-stream block 0, single-stream block 0
    assert rows[0]["block_mask"].shape == (2, 13, 13)


def test_padded_text_content_is_ignored():
    model = tiny_hunyuan()
    apply_sparse_attention(model, cfg(sparsity=0.6))
    kw = inputs()
    out = run(model, kw)
    kw["encoder_hidden_states"][0, 6:] = 100.0  # garbage in batch 0's padding
    assert torch.allclose(run(model, kw), out, atol=1e-5)
    assert all(r["density"] < 1.0 for r in hunyuan_video.stats(model))


def test_refiner_untouched_and_remove_restores_exactly():
    model = tiny_hunyuan()
    kw = inputs()
    ref = run(model, kw)
    originals = dict(model.attn_processors)
    apply_sparse_attention(model, cfg())
    refiner = [k for k in originals if k.startswith("context_embedder")]
    assert refiner and all(model.attn_processors[k] is originals[k] for k in refiner)
    assert not torch.equal(run(model, kw), ref)
    remove_sparse_attention(model)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert torch.equal(run(model, kw), ref)


def test_set_by_hand_everywhere():
    model = tiny_hunyuan()
    kw = inputs()
    ref = run(model, kw)
    model.set_attn_processor(HunyuanVideoRectifiedProcessor(cfg(dense_layers=99)))  # refiner included
    assert torch.allclose(run(model, kw), ref, atol=1e-6)
    proc = HunyuanVideoRectifiedProcessor(cfg(sparsity=0.0))
    model.set_attn_processor(proc)
    proc.record_stats = "summary"  # statistics are opt-in
    assert torch.allclose(run(model, kw), ref, atol=1e-5, rtol=1e-4)
    assert [r["layer"] for r in proc.layer_stats()] == [0, 1]


def test_tiny_hunyuan_pipeline_generates():
    from fastgen.pipelines.tiny_video import build_tiny_hunyuan
    from fastgen.pipelines.video_runner import generate_video

    pipe = build_tiny_hunyuan()
    config = cfg(sparsity=0.0, min_tokens=16)
    small = {"steps": 2, "height": 64, "width": 64, "frames": 5}
    dense = generate_video(pipe, prompt="a fox", method="dense", progress=False, **small)
    sparse = generate_video(pipe, prompt="a fox", config=config, progress=False, **small)
    assert dense["frames"].shape == (5, 64, 64, 3)
    assert np.abs(dense["frames"].astype(int) - sparse["frames"].astype(int)).max() <= 1
