"""torch.compile and the sparse processors: zero graph breaks inside them and the same output as
eager (issue 12). The kernels are ``torch.library`` custom ops with fake implementations
(``torch.ops.fastgen.*``), the processors decide dense / sparse from shapes, Python config values
and a per-generation bool of the step tracker (never from tensor values), and the step-tracking
hook reads no timestep while traced (the pipeline's scheduler advances the step then)."""

from __future__ import annotations

import pytest
import torch

from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention, attention_stats, record_attention_stats


@pytest.fixture(autouse=True)
def _plain_torch_empty(monkeypatch):
    """The suite's NaN-filling ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty``
    (tests/conftest.py) are Python wrappers that dynamo would trace and break on; the traced code gets
    the real ones."""
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", torch._C.TensorBase.new_empty)


def _tiny_wan(dtype=torch.float32, level="summary", **config):
    from fastgen.pipelines.tiny_video import build_tiny_wan

    model = build_tiny_wan(num_layers=2, dtype=dtype).transformer
    apply_sparse_attention(
        model,
        RectifiedSpaAttnConfig(
            sparsity=0.5, block_size=16, dense_layers=0, warmup_steps=0, min_tokens=64, **config
        ),
    )
    record_attention_stats(model, level)  # statistics are opt-in
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 12, 32, generator=g).to(dtype),
        return_dict=False,
    )
    return model, inputs


@pytest.mark.slow  # dynamo tracing + inductor of a 2-layer transformer: minutes on the shared CPU
def test_rectified_wan_traces_without_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    model, inputs = _tiny_wan()
    with torch.no_grad():
        eager = model(**inputs)[0]
        explanation = torch._dynamo.explain(model)(**inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        compiled = torch.compile(model)(**inputs)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    rows = fastgen_rows(model)
    assert len(rows) == 2 and all(0 < row["density"] < 1 for row in rows)  # both layers ran sparse


@pytest.mark.slow  # one dynamo trace of the tiny Wan per variant
@pytest.mark.parametrize(
    "dtype, config",
    [
        (torch.float32, dict(selection="paper", form="paper")),  # the authors' rule (3D neighbours)
        (torch.bfloat16, {}),  # bf16 on the CPU: the slab engine, not the native kernel
    ],
    ids=["paper-selection", "bf16-slab"],
)
def test_rectified_variants_trace_without_graph_breaks(dtype, config):
    """The paths that still broke the graph: ``selection="paper"`` (``torch.unique`` of the first
    frame's blocks) and the CPU slab engine (reads of ragged / empty rows); eager's output."""
    torch._dynamo.reset()
    model, inputs = _tiny_wan(dtype, **config)
    with torch.no_grad():
        eager = model(**inputs)[0]
        explanation = torch._dynamo.explain(model)(**inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, backend="eager")(**inputs)[0]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    rows = fastgen_rows(model)  # both layers ran the sparse processor (the paper rule's 3D
    assert len(rows) == 2 and all(0 < row["density"] <= 1 for row in rows)  # neighbours may keep all)


def fastgen_rows(model):
    return attention_stats(model)


@pytest.mark.slow  # one dynamo trace of the tiny Wan, eager backend
def test_rectified_wan_with_statistics_off_traces_without_graph_breaks():
    """The default level ``"off"`` (statistics are opt-in): no graph break, eager's output, nothing
    recorded, and the sparse path ran (the output differs from the all-dense processors')."""
    torch._dynamo.reset()
    model, inputs = _tiny_wan(level="off")
    with torch.no_grad():
        eager = model(**inputs)[0]
        explanation = torch._dynamo.explain(model)(**inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, backend="eager")(**inputs)[0]
        apply_sparse_attention(model, RectifiedSpaAttnConfig(dense_layers=2, min_tokens=64))
        dense = model(**inputs)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert attention_stats(model) == []
    assert (eager - dense).abs().max() > 1e-3


@pytest.mark.slow  # two traces of the tiny Wan (dense warm-up step, then sparse), eager backend
def test_compiled_pipeline_compiles_once_per_phase_and_matches_eager():
    """A compiled transformer inside a pipeline: the warm-up step runs dense and the later steps
    sparse (the step comes from the scheduler, no timestep read in the trace), with one graph per
    phase, not one per step, and the same frames as the eager pipeline."""
    from fastgen.pipelines.tiny_video import build_tiny_wan
    from torch._dynamo.testing import CompileCounter

    import fastgen

    config = RectifiedSpaAttnConfig(
        sparsity=0.5, block_size=16, dense_layers=0, warmup_steps=1, min_tokens=64
    )
    small = dict(height=64, width=64, num_frames=5, output_type="np", guidance_scale=1.0)

    def run(pipe):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return pipe(prompt="a fox", num_inference_steps=4, generator=gen, **small).frames[0]

    torch._dynamo.reset()
    pipe = build_tiny_wan(num_layers=2)
    fastgen.apply_sparse_attention(pipe, config)
    fastgen.record_attention_stats(pipe.transformer, "summary")  # statistics are opt-in
    eager = run(pipe)
    counter = CompileCounter()
    pipe.transformer.compile(backend=counter)
    compiled = run(pipe)
    assert counter.frame_count == 2  # the warm-up graph and the sparse graph
    assert len(fastgen.attention_stats(pipe.transformer)) == 2  # the last step ran sparse
    again = run(pipe)  # a second generation: the warm-up graph again, from the cache
    assert counter.frame_count == 2
    torch.testing.assert_close(torch.as_tensor(compiled), torch.as_tensor(eager), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.as_tensor(again), torch.as_tensor(eager), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # one dynamo trace of a tiny HunyuanVideo (~4 min on the loaded 2-core machine)
def test_rectified_hunyuan_traces_as_one_graph_and_matches_eager():
    """HunyuanVideo's joint video + padded-text attention: one graph (no break) and eager's output."""
    from torch._dynamo.testing import CompileCounter

    from tests.tiny_models import inputs, tiny_hunyuan

    torch._dynamo.reset()
    model = tiny_hunyuan()
    apply_sparse_attention(
        model,
        RectifiedSpaAttnConfig(sparsity=0.5, block_size=16, dense_layers=0, warmup_steps=0, min_tokens=64),
    )
    record_attention_stats(model, "summary")  # statistics are opt-in
    kw = inputs(text_lengths=(6, 10))
    counter = CompileCounter()
    with torch.no_grad():
        eager = model(**kw, return_dict=False)[0]
        compiled = torch.compile(model, backend=counter)(**kw, return_dict=False)[0]
    assert counter.frame_count == 1  # one graph: no graph break
    assert len(fastgen_rows(model)) == 2  # both blocks ran sparse
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # one dynamo trace of a tiny causal Wan chunk forward (~3 min on the loaded machine)
def test_light_forcing_chunk_forward_traces_as_one_graph_and_matches_eager():
    """A Light Forcing chunk forward (chunk 1: KV cache of chunk 0 read, its own K/V written): one
    graph and eager's output. The chunk index is a Python int, so each chunk is its own graph."""
    from torch._dynamo.testing import CompileCounter

    import tests.test_light_forcing as lf
    from fastgen import LightForcingConfig
    from fastgen.processors.causal_wan import causal_generation

    torch._dynamo.reset()
    model = lf.lf_wan()
    apply_sparse_attention(model, LightForcingConfig(**lf.LF_TEST_CONFIG))
    clean, noisy, text = lf.lf_inputs()
    b, k, t = clean.shape[0], 3, lf.LF_STEPS[0]
    counter = CompileCounter()
    compiled_model = torch.compile(model, backend=counter)
    with (
        torch.no_grad(),
        causal_generation(
            model, batch_size=b, num_frames=12, frame_tokens=lf.LF_FRAME_TOKENS, frames_per_chunk=k
        ) as session,
    ):
        session.begin_chunk(0)
        session.begin_step(0, t)
        model(noisy[0][:, :, :k], torch.full((b,), t), text, return_dict=False)
        session.begin_chunk(1)
        session.begin_step(0, t)
        x = noisy[0][:, :, k : 2 * k]
        eager = model(x, torch.full((b,), t), text, return_dict=False)[0]
        compiled = compiled_model(x, torch.full((b,), t), text, return_dict=False)[0]  # same slot rewritten
    assert counter.frame_count == 1  # one graph: no graph break
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # dynamo traces of the tiny LLaDA: three phases x two dtypes (~1 min)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the CPU slab engine
def test_sparsed_pipeline_compiles_one_graph_per_phase_and_matches_eager(dtype):
    """SparseD inside the diffusion-LM pipeline with a compiled model and padded rows: one graph per
    phase (dense warm-up, pattern step, sparse steps; a graph break would add frames), none more
    for a second generation (new patterns, same guards), and the eager tokens. The pipeline declares
    its key padding, so the mask's values are never read in the trace; ``set_step`` decides the
    phase outside it."""
    from fastgen.pipelines.tiny_lm import build_tiny_llada
    from torch._dynamo.testing import CompileCounter

    from fastgen import SparseDConfig

    torch._dynamo.reset()
    pipe = build_tiny_llada(device="cpu", dtype=dtype)
    apply_sparse_attention(pipe.model, SparseDConfig(skip=0.25, select=0.3, block_size=16))
    kw = dict(gen_length=48, steps=8, block_length=48, generator=0, progress=False)
    prompts = ["The quick brown fox jumps over", "a lazy dog"]  # different lengths: left padding
    eager = pipe(prompts, **kw).sequences
    state = pipe.model._fastgen_sparsed
    assert state.sparse_calls == 6 * 2  # steps 2..7 sparse, 2 layers
    counter = CompileCounter()
    pipe.model.compile(backend=counter)
    compiled = pipe(prompts, **kw).sequences
    assert counter.frame_count == 3, counter.frame_count  # dense, pattern, sparse: no break
    assert state.sparse_calls == 6 * 2
    again = pipe(prompts, **kw).sequences
    assert counter.frame_count == 3
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


@pytest.mark.slow  # dynamo traces of tiny diffusion LMs: five or six graphs (~20 s each)
@pytest.mark.parametrize(
    "rules, with_sparsed, frames",
    [
        # refresh (cache empty), pruned (first row count), pruned (row count dynamic), refresh (cache
        # allocated), pruned (window width dynamic)
        ("llada", False, 5),
        ("llada", True, 6),  # + SparseD's sparse refreshes
        ("dream", False, 6),  # + the refresh prefix's length dynamic (it grows every phase)
    ],
)
def test_window_diffusion_pipeline_traces_without_breaks_and_matches_eager(rules, with_sparsed, frames):
    """Window-Diffusion inside the diffusion-LM pipeline with a compiled model and padded rows: no
    graph break, a bounded set of graphs for a whole generation (the pruned steps' row count and the
    phase's window width become dynamic dimensions after their first change instead of a recompile
    per step; a recompile per step or a break would add frames), none more for a second generation,
    and the eager tokens. LLaDA rules on the tiny LLaDA, alone and with SparseD on the refreshes;
    Dream rules (sliding span, truncated refresh prefix, logit shift) on a tiny GQA Qwen2. The sets,
    the packing and the check that every query lies in the frozen window run in the pipeline,
    outside the model."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    from fastgen import SparseDConfig, WindowDiffusionConfig
    from tests.tiny_models import prompts, tiny_pipe

    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_pipe(rules)
    ids, attn = prompts()  # batch 2, left padding
    if rules == "llada":
        wd = WindowDiffusionConfig(window=16, active=4, refresh_cycle=8)
    else:
        wd = WindowDiffusionConfig(window=24, active=4, refresh_cycle=8, sliding=True)
    acceleration = [wd, SparseDConfig(skip=0.25, select=0.3, block_size=16)] if with_sparsed else [wd]
    states = []  # SparseD's state of each generation (the pipeline removes it from the model at the end)
    kw = dict(
        input_ids=ids,
        attention_mask=attn,
        gen_length=48,
        steps=48,
        progress=False,
        acceleration=acceleration,
        callback=lambda step, x: states.append(getattr(pipe.model, "_fastgen_sparsed", None)),
    )
    eager = pipe(**kw)
    assert sum(t["refresh"] for t in eager.window_trace) == 6  # 48 steps, a refresh every 8
    sparse_calls = states[-1].sparse_calls if with_sparsed else 0
    assert sparse_calls == 4 * 2 or not with_sparsed  # 6 refreshes: 2 dense warm-up, 4 sparse x 2 layers
    counter = CompileCounter()
    pipe.model.compile(backend=counter)
    compiled = pipe(**kw).sequences
    if with_sparsed:  # the compiled refreshes ran SparseD's sparse path as often as eager's
        assert states[-1].sparse_calls == sparse_calls
    assert counter.frame_count == frames, counter.frame_count
    assert not counters["graph_break"], dict(counters["graph_break"])
    again = pipe(**kw).sequences
    assert counter.frame_count == frames
    assert torch.equal(compiled, eager.sequences) and torch.equal(again, eager.sequences)
