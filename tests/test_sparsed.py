"""SparseD: block importance, selection with separate budgets, padding-exact sparse attention, and the
transformers adapter (dense warm-up, fixed per-row patterns, CFG rows, remove, stats)."""

from __future__ import annotations

import pytest
import torch

from fastgen import SparseDConfig, apply_sparse_attention, remove_sparse_attention
from fastgen.attention import dense_attention
from fastgen.attention import sparsed as sparsed_mod
from fastgen.attention.sparsed import (
    SparseDPattern,
    compute_sparsed_pattern,
    dense_step_count,
    load_patterns,
    prompt_block_mask,
    save_patterns,
    sparsed_attention,
    sparsed_block_importance,
    sparsed_select,
)
from fastgen.processors import transformers_lm
from tests.helpers import masked_reference, rel_rmse, token_mask_from_blocks

transformers = pytest.importorskip("transformers")


def left_padding(batch: int, n: int, pads: list[int]) -> torch.Tensor:
    valid = torch.ones(batch, n, dtype=torch.bool)
    for row, pad in enumerate(pads):
        valid[row, :pad] = False
    return valid


def reference_importance(q, k, block_size, valid):
    """Materialised N x N reference of the tile importance."""
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1) * valid[:, None, :, None]
    b, h, n, _ = q.shape
    nb = -(-n // block_size)
    padded = torch.zeros(b, h, nb * block_size, nb * block_size)
    padded[:, :, :n, :n] = p
    mass = padded.view(b, h, nb, block_size, nb, block_size).sum((3, 5))
    qpad = torch.zeros(b, nb * block_size)
    qpad[:, :n] = valid.float()
    counts = qpad.view(b, nb, block_size).sum(-1)
    return mass / (counts.clamp_min(1)[:, None, :, None] * block_size)


# ---------------------------------------------------------------- importance and selection


@pytest.mark.parametrize("n", [75, 300])  # 300: 19 key blocks, more than D (several indicator passes)
@pytest.mark.parametrize("stream_elements", [1, 1 << 24])
def test_importance_streamed_equals_materialised(cpu_engine, monkeypatch, stream_elements, n):
    monkeypatch.setattr(sparsed_mod, "_STREAM_ELEMENTS", stream_elements)  # 1 = one query block per chunk
    q, k = torch.randn(2, 3, n, 16), torch.randn(2, 3, n, 16)
    valid = left_padding(2, n, [0, 21])
    got = sparsed_block_importance(q, k, 16, valid, query_padding_mask=valid)
    expected = reference_importance(q, k, 16, valid)
    nb = -(-n // 16)
    assert got.shape == (2, 3, nb, nb)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.all(got[1, :, :, 0] == 0)  # block 0 of row 1 is fully padded
    # without padding every query's mass sums to one: each query block (the partial last one too,
    # divided by its real queries) sums to 1 / block_size
    plain = sparsed_block_importance(q, k, 16)
    assert torch.allclose(plain.sum(-1), torch.full((2, 3, nb), 1 / 16), atol=1e-6)


def test_select_separate_budgets_and_padding():
    importance = torch.rand(2, 2, 4, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False  # row 1: three padded key blocks
    prompt = prompt_block_mask(6 * 16, 10 * 16, 16, 2)  # blocks 0-5 prompt, 6-9 generated
    keep = sparsed_select(importance, 0.3, key_valid_blocks=valid, prompt_blocks=prompt)
    # row 0: ceil(0.3 * 6) = 2 prompt blocks, ceil(0.3 * 4) = 2 generated blocks
    assert torch.all(keep[0, ..., :6].sum(-1) == 2) and torch.all(keep[0, ..., 6:].sum(-1) == 2)
    # row 1: 3 valid prompt blocks -> 1, padded blocks never kept
    assert torch.all(keep[1, ..., :6].sum(-1) == 1) and not keep[1, ..., :3].any()
    # within a region the kept blocks are the most important ones
    prompt_scores = importance[0, ..., :6].masked_fill(~keep[0, ..., :6], -1).amax(-1)
    dropped_best = importance[0, ..., :6].masked_fill(keep[0, ..., :6], -1).amax(-1)
    assert torch.all(keep[0, ..., :6].float().argmax(-1) >= 0) and torch.all(prompt_scores >= dropped_best)
    # one budget without a split; a tiny select still keeps at least one block per region
    assert torch.all(sparsed_select(importance, 0.3, key_valid_blocks=valid)[0].sum(-1) == 3)
    tiny = sparsed_select(importance, 0.01, key_valid_blocks=valid, prompt_blocks=prompt)
    assert torch.all(tiny[..., :6].sum(-1) == 1) and torch.all(tiny[..., 6:].sum(-1) == 1)
    # select = 1 keeps every valid block
    assert torch.equal(
        sparsed_select(importance, 1.0, key_valid_blocks=valid), valid[:, None, None].expand_as(keep)
    )


@pytest.mark.parametrize("select", [0.01, 0.13, 0.3, 0.5, 0.97, 1.0])
def test_selected_blocks_bound_holds_for_every_row(select):
    """The index-table width comes from the config alone (no read of the mask): it must bound what
    the selection keeps for any prompt split (int or per-row) and padding, and be tight without
    padding (one region: exactly ``ceil(select * nkb)``)."""
    g = torch.Generator().manual_seed(3)
    for nkb in (1, 2, 7, 10, 33):
        importance = torch.rand(3, 2, 4, nkb, generator=g)
        valid = torch.rand(3, nkb, generator=g) > 0.3
        valid[:, -1] = True
        one = sparsed_select(importance, select, key_valid_blocks=valid)
        bound_one = sparsed_mod.selected_blocks_bound(select, nkb, two_budgets=False)
        assert int(one.sum(-1).max()) <= bound_one
        full = sparsed_select(importance, select)
        assert int(full.sum(-1).max()) == bound_one
        for prompt_end in (0, 16, nkb * 8, torch.tensor([0, nkb * 16 - 5, 40])):
            if isinstance(prompt_end, torch.Tensor):
                prompt_end = prompt_end.clamp(max=nkb * 16)
            prompt = prompt_block_mask(prompt_end, nkb * 16, 16, 3)
            two = sparsed_select(importance, select, key_valid_blocks=valid, prompt_blocks=prompt)
            assert int(two.sum(-1).max()) <= sparsed_mod.selected_blocks_bound(select, nkb, two_budgets=True)


def test_declared_key_padding_is_checked_and_a_wrong_shape_falls_back_to_dense(caplog):
    """``begin_generation(key_valid=...)``: bad values raise naming the parameter; a call whose mask
    does not have the declared shape runs SDPA exactly (logged), never a misaligned padding."""
    model = tiny_llama()
    ids, valid = inputs()
    apply_sparse_attention(model, SparseDConfig(skip=0.0, select=0.3, block_size=BS))
    for bad in (valid.long(), valid[0], "yes"):
        with pytest.raises(ValueError, match="key_valid"):
            transformers_lm.begin_generation(model, 2, key_valid=bad)
    empty_row = valid.clone()
    empty_row[1] = False
    with pytest.raises(ValueError, match="key_valid"):
        transformers_lm.begin_generation(model, 2, key_valid=empty_row)
    # declared for batch 2, called with batch 1: dense (the SDPA function), logged; also when the
    # declared rows have no padding at all (nothing to misalign, but the call is not the declared one)
    transformers_lm.begin_generation(model, 2, key_valid=valid)
    transformers_lm.set_step(model, 0)
    forward(model, ids, valid)
    transformers_lm.set_step(model, 1)
    with caplog.at_level("INFO", logger="fastgen"):
        got = forward(model, ids[1:], valid[1:])
    assert model._fastgen_sparsed.sparse_calls == 0
    assert "declared key padding" in caplog.text
    transformers_lm.begin_generation(model, 2, key_valid=torch.ones_like(valid))
    transformers_lm.set_step(model, 0)
    forward(model, ids, torch.ones_like(valid))
    transformers_lm.set_step(model, 1)
    got_unpadded = forward(model, ids[1:], valid[1:])
    assert model._fastgen_sparsed.sparse_calls == 0
    remove_sparse_attention(model)
    assert torch.equal(got, forward(model, ids[1:], valid[1:]))
    assert torch.equal(got_unpadded, got)


def test_set_step_decides_the_phase_once():
    """The forward reads a phase string decided by ``set_step`` (one compiled graph per phase), not
    the step number."""
    model = tiny_llama()
    apply_sparse_attention(model, SparseDConfig(skip=0.25, select=0.3, block_size=BS))
    state = model._fastgen_sparsed
    transformers_lm.begin_generation(model, 8)
    phases = []
    for step in range(8):
        transformers_lm.set_step(model, step)
        phases.append(state.phase())
    assert phases == ["dense", "pattern"] + ["sparse"] * 6  # round(0.25 * 8) = 2 dense steps
    transformers_lm.end_generation(model)
    assert state.phase() == "dense"


def test_bad_values_raise():
    for bad in (dict(skip=-0.1), dict(skip=1.5), dict(select=0.0), dict(select=1.5), dict(block_size=24)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SparseDConfig(**bad)
    with pytest.raises(ValueError, match="select"):
        sparsed_select(torch.rand(1, 1, 2, 2), 0.0)
    with pytest.raises(ValueError, match="prompt_end"):
        prompt_block_mask(500, 100, 16, 1)
    with pytest.raises(ValueError, match="total_steps"):
        dense_step_count(0.2, 0)


def test_dense_step_count():
    assert dense_step_count(0.2, 16) == 3
    assert dense_step_count(0.0, 16) == 1  # one dense step is needed to compute the pattern
    assert dense_step_count(1.0, 16) == 16
    assert dense_step_count(0.5, 1) == 1


# ---------------------------------------------------------------- sparse attention


@pytest.mark.parametrize("backend", ["torch", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsed_attention_matches_masked_reference(backend, dtype):
    b, h, n, d, bs = 3, 2, 83, 16, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))
    valid = left_padding(b, n, [0, 21, 35])  # 21: partial block; 35: two full padded blocks + partial
    pattern = compute_sparsed_pattern(q, k, select=0.4, block_size=bs, key_padding_mask=valid, prompt_end=50)
    out = sparsed_attention(q, k, v, pattern.block_mask, bs, key_padding_mask=valid, backend=backend)
    token_mask = token_mask_from_blocks(pattern.block_mask, n, n, bs) & valid[:, None, None, :]
    expected, _ = masked_reference(q, k, v, token_mask)
    rows = valid[:, None, :, None].expand_as(out)
    assert not out.isnan().any()
    assert rel_rmse(out[rows], expected[rows]) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_sparsed_attention_all_blocks_is_dense_with_padding():
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    valid = left_padding(2, 70, [0, 13])
    mask = torch.ones(2, 2, 5, 5, dtype=torch.bool)
    out = sparsed_attention(q, k, v, mask, 16, key_padding_mask=valid)
    assert torch.allclose(out, dense_attention(q, k, v, key_padding_mask=valid), atol=1e-5)


def test_patterns_save_load(tmp_path):
    patterns = {i: torch.rand(2, 3, 4, 5) > 0.5 for i in range(3)}
    patterns[1] = SparseDPattern(patterns[1], block_size=32, num_tokens=150)
    path = tmp_path / "patterns.safetensors"
    save_patterns(path, patterns)
    loaded = load_patterns(path)
    assert list(loaded) == [0, 1, 2]
    assert torch.equal(loaded[0], patterns[0]) and torch.equal(loaded[1], patterns[1].block_mask)
    assert loaded[2].dtype == torch.bool


# ---------------------------------------------------------------- transformers adapter (tiny Llama)


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def full_mask(valid: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """The pipeline's padding-aware bidirectional mask [B, 1, N, N]."""
    mask = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)
    if additive:
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def forward(model, ids, valid, additive=False):
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=full_mask(valid, additive), position_ids=positions).logits


def run_generation(model, ids, valid, total_steps, prompt_length=None, additive=False):
    transformers_lm.begin_generation(model, total_steps, prompt_length=prompt_length)
    outs = []
    for step in range(total_steps):
        transformers_lm.set_step(model, step)
        outs.append(forward(model, ids, valid, additive))
    transformers_lm.end_generation(model)
    return outs


N, BS = 90, 16


def inputs(batch=2, pads=(0, 21)):
    torch.manual_seed(1)
    return torch.randint(0, 97, (batch, N)), left_padding(batch, N, list(pads))


@pytest.mark.parametrize("additive", [False, True])
def test_select_one_equals_dense_with_padding(additive):
    model = tiny_llama()
    ids, valid = inputs()
    dense = forward(model, ids, valid, additive)
    apply_sparse_attention(model, SparseDConfig(skip=0.0, select=1.0, block_size=BS))
    outs = run_generation(model, ids, valid, 3, prompt_length=60, additive=additive)
    assert model._fastgen_sparsed.sparse_calls == 4  # 2 sparse steps x 2 layers
    for out in outs:
        assert rel_rmse(out[valid], dense[valid]) < 1e-5
        assert not out.isnan().any()


def test_dense_steps_are_bit_identical_and_skip_one_is_dense():
    model = tiny_llama()
    ids, valid = inputs()
    dense = forward(model, ids, valid)
    apply_sparse_attention(model, SparseDConfig(skip=0.5, select=0.3, block_size=BS))
    outs = run_generation(model, ids, valid, 4)
    assert torch.equal(outs[0], dense) and torch.equal(outs[1], dense)
    assert not torch.equal(outs[2], dense)  # sparse from step 2 on
    apply_sparse_attention(model, SparseDConfig(skip=1.0, select=0.3, block_size=BS))
    assert all(torch.equal(out, dense) for out in run_generation(model, ids, valid, 4))
    assert model._fastgen_sparsed.sparse_calls == 0


def test_sparse_step_equals_masked_reference_with_same_pattern():
    model = tiny_llama()
    ids, valid = inputs()
    apply_sparse_attention(model, SparseDConfig(skip=0.0, select=0.3, block_size=BS))
    sparse = run_generation(model, ids, valid, 2, prompt_length=60)[1]
    state = model._fastgen_sparsed

    def reference_fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import repeat_kv

        groups = module.num_key_value_groups
        pattern = state.patterns[module.layer_idx].block_mask
        token_mask = token_mask_from_blocks(pattern, N, N, BS) & attention_mask
        out, _ = masked_reference(
            query, repeat_kv(key, groups), repeat_kv(value, groups), token_mask, scaling
        )
        return out.transpose(1, 2).contiguous(), None

    transformers.AttentionInterface.register("fastgen_test_masked", reference_fn)
    model.set_attn_implementation("fastgen_test_masked")
    expected = forward(model, ids, valid)
    model.set_attn_implementation(transformers_lm.IMPLEMENTATION)
    assert rel_rmse(sparse[valid], expected[valid]) < 1e-5
    # the pattern keeps prompt and generated keys with separate budgets: ceil(0.3 * 4) prompt blocks
    # (blocks 0-3 start before 60) and ceil(0.3 * 2) generated ones for row 0
    mask = state.patterns[0].block_mask
    assert torch.all(mask[0, ..., :4].sum(-1) == 2) and torch.all(mask[0, ..., 4:].sum(-1) == 1)
    assert not mask[1, ..., 0].any()  # row 1's first block is all padding


def test_padding_content_is_ignored_and_aligned_row_equals_alone():
    model = tiny_llama()
    apply_sparse_attention(model, SparseDConfig(skip=0.0, select=0.4, block_size=BS))
    ids, valid = inputs(pads=(0, 21))
    base = run_generation(model, ids, valid, 2, prompt_length=60)[1]
    garbage = ids.clone()
    garbage[1, :21] = (garbage[1, :21] + 7) % 97
    other = run_generation(model, garbage, valid, 2, prompt_length=60)[1]
    assert torch.allclose(base[valid], other[valid], atol=1e-5)
    # padding by whole blocks keeps block boundaries: the padded row equals the row alone
    ids, valid = inputs(pads=(0, 32))
    batched = run_generation(model, ids, valid, 2, prompt_length=60)[1]
    alone = run_generation(model, ids[1:, 32:], valid[1:, 32:], 2, prompt_length=28)[1]
    assert rel_rmse(batched[1, 32:], alone[0]) < 1e-5
    first = run_generation(model, ids[:1], valid[:1], 2, prompt_length=60)[1]
    assert rel_rmse(batched[0], first[0]) < 1e-5


def test_cfg_rows_get_their_own_patterns_and_reset():
    model = tiny_llama()
    apply_sparse_attention(model, SparseDConfig(skip=0.0, select=0.3, block_size=BS))
    ids, valid = inputs(pads=(0, 0))
    ids[1, :60] = 5  # unconditional branch: prompt replaced by one token
    run_generation(model, ids, valid, 2, prompt_length=60)
    patterns = {layer: p.block_mask.clone() for layer, p in model._fastgen_sparsed.patterns.items()}
    assert all(not torch.equal(mask[0], mask[1]) for mask in patterns.values())
    run_generation(model, ids[1:], valid[1:], 2, prompt_length=60)  # the uncond row alone
    for layer, pattern in model._fastgen_sparsed.patterns.items():
        assert torch.equal(pattern.block_mask[0], patterns[layer][1])
    transformers_lm.begin_generation(model, 2)
    assert model._fastgen_sparsed.patterns == {}


def test_stats_remove_and_non_padding_mask_fallback():
    model = tiny_llama()
    ids, valid = inputs()
    before = forward(model, ids, valid)
    apply_sparse_attention(model, SparseDConfig(skip=0.0, select=0.3, block_size=BS))
    assert [row["density"] for row in transformers_lm.stats(model)] == [1.0, 1.0]
    run_generation(model, ids, valid, 2, prompt_length=60)
    rows = transformers_lm.stats(model)
    assert [row["layer"] for row in rows] == [0, 1]
    assert all(0 < row["density"] < 1 and row["block_mask"].shape == (4, 6, 6) for row in rows)
    assert rows[0]["block_mask"].dtype == torch.bool and rows[0]["block_mask"].device.type == "cpu"
    # a causal mask is not a key padding mask: the step falls back to SDPA exactly
    transformers_lm.begin_generation(model, 2)
    transformers_lm.set_step(model, 1)
    causal = torch.ones(N, N, dtype=torch.bool).tril()[None, None].expand(2, 1, N, N)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=causal).logits
    remove_sparse_attention(model)
    with torch.no_grad():
        assert torch.equal(got, model(input_ids=ids, attention_mask=causal).logits)
    assert model.config._attn_implementation == "sdpa"
    assert not any("_fastgen_sparsed" in m.__dict__ for m in model.modules())
    assert torch.equal(forward(model, ids, valid), before)
    with pytest.raises(ValueError, match="step"):
        apply_sparse_attention(model, SparseDConfig())
        transformers_lm.begin_generation(model, 2)
        transformers_lm.set_step(model, 2)


# ---------------------------------------------------------------- end to end through the diffusion-LM pipeline


@pytest.fixture(scope="module")
def tiny_pipe():
    from fastgen.pipelines.tiny_lm import build_tiny_llada

    return build_tiny_llada(device="cpu", dtype=torch.float32)


PROMPTS = ["The quick brown fox jumps over", "a lazy dog"]  # different lengths: left padding
GEN = dict(gen_length=32, steps=8, block_length=16, generator=0, progress=False)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_pipeline_skip_one_and_select_one_equal_dense(tiny_pipe, cfg_scale):
    dense = tiny_pipe(prompt=PROMPTS, cfg_scale=cfg_scale, **GEN).sequences
    for config in (
        SparseDConfig(skip=1.0, block_size=16),
        SparseDConfig(skip=0.0, select=1.0, block_size=16),
    ):
        got = tiny_pipe(prompt=PROMPTS, cfg_scale=cfg_scale, acceleration=[config], **GEN).sequences
        assert torch.equal(got, dense), config
    assert getattr(tiny_pipe.model, "_fastgen_adapter", None) is None  # removed after the call


def test_pipeline_sparse_uses_patterns_per_branch(tiny_pipe):
    model = tiny_pipe.model
    apply_sparse_attention(model, SparseDConfig(skip=0.25, select=0.3, block_size=16))
    try:
        out = tiny_pipe(prompt=PROMPTS, cfg_scale=1.0, **GEN)
        state = model._fastgen_sparsed
        assert state.sparse_calls == 6 * 2  # steps 2..7 sparse, 2 layers
        mask = state.patterns[0].block_mask
        assert mask.shape[0] == 4  # cond rows then uncond rows, each with its own pattern
        assert not torch.equal(mask[0], mask[2])
        assert all(0 < row["density"] < 1 for row in transformers_lm.stats(model))
        assert not (out.sequences == tiny_pipe.mask_token_id).any()
    finally:
        remove_sparse_attention(model)


def test_bench_smoke():
    from fastgen.bench.sparsed import run_sparsed_bench

    result = run_sparsed_bench(
        prompt_length=96,
        gen_length=32,
        steps=4,
        block_length=32,
        block_size=32,
        hidden=64,
        heads=2,
        head_dim=32,
        layers=1,
        op_lengths=(200,),
    )
    e2e = result["end_to_end"]
    # the reported ratios are the measured times' (no figure that is not what it says)
    assert e2e["speedup"] == pytest.approx(e2e["dense_s"] / e2e["sparse_s"], rel=1e-6)
    assert e2e["dense_steps"] == 1  # skip 0.2 of 4 steps: the first step dense
    assert 0.0 <= e2e["token_agreement"] <= 1.0 and (e2e["token_agreement"] * 32) % 1 == 0  # of 32 tokens
    op = result["op"][0]
    assert op["length"] == 200 and op["speedup"] == pytest.approx(op["sdpa_s"] / op["sparse_s"], rel=1e-6)
    # select 0.3 of 7 key blocks (block 32 over 200 tokens) keeps whole blocks: ceil(2.1) = 3 per query block
    assert op["density"] == pytest.approx(3 / 7, rel=1e-6)
    assert 0.0 < op["rel_rmse"] < 0.5


@pytest.mark.parametrize("engine", ["torch", "gather"])
@pytest.mark.parametrize("prompt_end", [None, 40])
def test_pattern_and_attention_match_the_naive_reference(engine, prompt_end):
    """Pattern (importance + budgets) and the attention under it against the plain-PyTorch
    SparseD of ``fastgen.attention.sparsed_naive``: left-padded batch of 2, length not a block
    multiple."""
    from fastgen.attention.sparsed import compute_sparsed_pattern, sparsed_attention
    from fastgen.attention.sparsed_naive import sparsed_naive

    b, h, n, d, bs = 2, 2, 90, 16, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, :21] = False  # left padding: one whole block and part of the next
    pattern = compute_sparsed_pattern(
        q, k, select=0.4, block_size=bs, key_padding_mask=mask, prompt_end=prompt_end
    )
    out = sparsed_attention(q, k, v, pattern.block_mask, bs, key_padding_mask=mask, backend=engine)
    ref, ref_mask = sparsed_naive(
        q, k, v, select=0.4, block_size=bs, key_padding_mask=mask, prompt_end=prompt_end
    )
    assert torch.equal(pattern.block_mask.expand_as(ref_mask), ref_mask)
    valid_rows = mask[:, None, :, None].expand_as(out)
    err = (out - ref)[valid_rows].norm() / ref[valid_rows].norm()
    assert err < 1e-5
