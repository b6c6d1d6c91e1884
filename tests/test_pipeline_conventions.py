"""diffusers conventions: fastgen on a whole pipeline (both Wan 2.2 experts, one step counter),
generations marked by the scheduler, the context manager, attention backends kept, CPU offload."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from fastgen.pipelines.tiny_video import build_tiny_wan
from fastgen.pipelines.tiny_video_i2v import build_tiny_wan_i2v

import fastgen
from fastgen import RectifiedSpaAttnConfig
from fastgen.processors.rectified_base import RectifiedProcessorBase, collect_stats
from fastgen.tracking import StepTracker, get_step_tracker

SMALL = dict(height=64, width=64, num_frames=5, output_type="np")  # latent 2 x 8 x 8 = 128 tokens


def config(**kw):
    base = dict(sparsity=0.5, block_size=16, dense_layers=0, warmup_steps=1, min_tokens=64)
    return RectifiedSpaAttnConfig(**{**base, **kw})


def fastgen_processors(model) -> list:
    return [p for p in model.attn_processors.values() if isinstance(p, RectifiedProcessorBase)]


def record_steps(pipe, names=("transformer", "transformer_2")):
    """(model name, tracker step) for every forward call of the pipeline's transformers."""
    seen = []
    for name in names:
        model = getattr(pipe, name, None)
        if model is not None:  # on the first block: the tracker has seen the call's timestep by then
            tracker = get_step_tracker(model)
            model.blocks[0].register_forward_pre_hook(
                lambda m, args, name=name, tracker=tracker: seen.append((name, tracker.step))
            )
    return seen


def test_pipeline_apply_covers_both_experts_with_one_step_counter():
    pipe = build_tiny_wan_i2v(num_layers=2)
    originals = {n: dict(getattr(pipe, n).attn_processors) for n in ("transformer", "transformer_2")}
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    fastgen.apply_sparse_attention(pipe, config())
    for expert in (pipe.transformer, pipe.transformer_2):
        fastgen.record_attention_stats(expert, "summary")  # statistics are opt-in
    assert get_step_tracker(pipe.transformer) is get_step_tracker(pipe.transformer_2)
    assert len(fastgen_processors(pipe.transformer)) == 2 and len(fastgen_processors(pipe.transformer_2)) == 2
    steps = record_steps(pipe)
    gen = torch.Generator().manual_seed(0)
    pipe(image=image, prompt="a boat", num_inference_steps=2, generator=gen, **SMALL)
    # CFG: two calls per step; step 0 (t=1000) on the high-noise expert, step 1 (t < 900) on the other
    assert steps == [("transformer", 0)] * 2 + [("transformer_2", 1)] * 2
    assert [r["density"] for r in collect_stats(pipe.transformer_2)] == [0.5, 0.5]  # past the warm-up
    assert collect_stats(pipe.transformer) == []  # its only step was the dense warm-up step
    fastgen.remove_sparse_attention(pipe)
    for name, procs in originals.items():
        model = getattr(pipe, name)
        assert all(model.attn_processors[k] is v for k, v in procs.items())
        assert get_step_tracker(model) is None
    assert "set_timesteps" not in vars(pipe.scheduler)


@pytest.fixture(scope="module")
def wan_pipe():
    return build_tiny_wan(num_layers=2)


def test_every_pipeline_call_is_a_new_generation(wan_pipe):
    """Repeated 1-step runs (same timestep each time) were never seen as new by the timestep guess."""
    with fastgen.sparse_attention(wan_pipe, config(warmup_steps=0)):
        tracker = get_step_tracker(wan_pipe.transformer)
        resets = []
        tracker.add_reset_listener(lambda: resets.append(tracker.generation))
        start = tracker.generation
        for _ in range(3):
            wan_pipe(prompt="a fox", num_inference_steps=1, guidance_scale=1.0, **SMALL)
        assert tracker.generation == start + 3 and len(resets) == 3
        assert tracker.pipeline_driven


def test_context_manager_restores_also_when_the_block_raises(wan_pipe):
    originals = dict(wan_pipe.transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with fastgen.sparse_attention(wan_pipe, config()) as applied:
            assert applied is wan_pipe and len(fastgen_processors(wan_pipe.transformer)) == 2
            raise RuntimeError("boom")
    assert all(wan_pipe.transformer.attn_processors[k] is v for k, v in originals.items())
    assert get_step_tracker(wan_pipe.transformer) is None
    with fastgen.sparse_attention(wan_pipe.transformer, config()):  # a bare model works too
        assert len(fastgen_processors(wan_pipe.transformer)) == 2
    assert all(wan_pipe.transformer.attn_processors[k] is v for k, v in originals.items())


def test_attention_backend_set_while_applied_survives_remove(wan_pipe):
    from diffusers.models.attention_dispatch import AttentionBackendName

    model = wan_pipe.transformer
    fastgen.apply_sparse_attention(model, config())
    model.set_attention_backend("_native_math")
    fastgen.remove_sparse_attention(model)
    backends = {getattr(p, "_attention_backend", None) for p in model.attn_processors.values()}
    assert backends == {AttentionBackendName("_native_math")}
    model.reset_attention_backend()
    assert {getattr(p, "_attention_backend", None) for p in model.attn_processors.values()} == {None}


def test_chunked_timesteps_do_not_reset_a_pipeline_driven_tracker():
    tracker = StepTracker(pipeline_driven=True)
    for t in (1000.0, 500.0, 1000.0, 500.0):  # chunk 0 then chunk 1 of an autoregressive video
        tracker.observe(t)
    assert tracker.step == 3 and tracker.generation == 0
    tracker.begin_generation()
    tracker.observe(1000.0)
    assert tracker.step == 0 and tracker.generation == 1


def test_explicit_steps_are_the_pipelines():
    tracker = StepTracker()
    tracker.explicit = True
    tracker.mark_step(4)
    tracker.observe(1000.0)
    tracker.observe(10.0)
    assert tracker.step == 4 and tracker.calls == 2 and tracker.generation == 0


def test_timestep_guess_only_without_a_pipeline_and_it_says_so(caplog):
    tracker = StepTracker()
    with caplog.at_level(logging.INFO, logger="fastgen.tracking"):
        for t in (1000.0, 500.0, 1000.0, 500.0, 1000.0):
            tracker.observe(t)
    assert tracker.generation == 2 and tracker.step == 0
    assert caplog.text.count("new generation guessed from the timestep") == 1
    assert "apply_sparse_attention(pipe, config)" in caplog.text


SEQUENTIAL_ON_CPU = (
    "accelerate's sequential offload to device='cpu' fails inside accelerate (TypeError in "
    "set_module_tensor_to_device) with or without fastgen; the same hooks installed per component "
    "(accelerate.cpu_offload) run here, and the pipeline method runs in `fastgen bench gpu` on CUDA"
)


@pytest.mark.parametrize(
    "offload",
    [
        "model",
        "accelerate_cpu_offload_hooks",
        pytest.param(
            "sequential",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=SEQUENTIAL_ON_CPU),
        ),
    ],
)
def test_cpu_offload_works_with_the_processors(offload):
    """Offload hooks (accelerate) and fastgen's tracker hook on the same transformer: same frames."""
    from fastgen.pipelines.video_runner import generate_video

    kw = dict(prompt="a fox", steps=2, height=64, width=64, frames=5, seed=1, progress=False)
    cfg = config(warmup_steps=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = generate_video(build_tiny_wan(device=device, num_layers=2), config=cfg, **kw)
    pipe = build_tiny_wan(num_layers=2)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:  # the hooks enable_sequential_cpu_offload installs, one component at a time, onto the CPU
        from accelerate import cpu_offload

        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                cpu_offload(component, torch.device(device), offload_buffers=len(component._parameters) > 0)
        assert pipe.transformer.proj_out.weight.device.type == "meta"  # weights live in the hook's map
    result = generate_video(pipe, config=cfg, **kw)
    assert np.abs(result["frames"].astype(int) - reference["frames"].astype(int)).max() <= 1
    assert [r["density"] for r in result["stats"]] == [0.5, 0.5]
    assert get_step_tracker(pipe.transformer) is None and not fastgen_processors(pipe.transformer)
