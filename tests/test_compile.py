"""torch.compile and the sparse processors: zero graph breaks inside them and the same output as
eager (issue 12). The kernels are ``torch.library`` custom ops with fake implementations
(``torch.ops.fastgen.*``), the processors decide dense / sparse from shapes, Python config values
and a per-generation bool of the step tracker (never from tensor values), and the step-tracking
hook reads no timestep while traced (the pipeline's scheduler advances the step then)."""

from __future__ import annotations

import pytest
import torch

from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention


def _tiny_wan():
    from fastgen.pipelines.tiny_video import build_tiny_wan

    model = build_tiny_wan(num_layers=2).transformer
    apply_sparse_attention(
        model,
        RectifiedSpaAttnConfig(sparsity=0.5, block_size=16, dense_layers=0, warmup_steps=0, min_tokens=64),
    )
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
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


def fastgen_rows(model):
    from fastgen import attention_stats

    return attention_stats(model)
