"""Light Forcing: Chunk-Aware Growth values, HSA against a loop statement of the rules, the sparse
attention against a dense masked reference, pooled-statistics reuse, bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fastgen import apply_sparse_attention, remove_sparse_attention
from fastgen.attention.light_forcing import (
    chunk_sparsities,
    hsa_block_mask,
    light_forcing_attention,
)
from fastgen.attention.light_forcing_naive import naive_light_forcing_attention
from fastgen.configs import LightForcingConfig
from tests.helpers import rel_rmse

# ------------------------------------------------------------------------------ Chunk-Aware Growth


def test_cag_values_of_the_paper():
    got = chunk_sparsities(21, 3, 0.88, 0.98)
    assert [round(s, 4) for s in got] == [0.0, 0.8270, 0.8551, 0.8718, 0.8832, 0.8917, 0.8982]
    # beta in closed form: s_1 = s_base - beta / sqrt(6)
    assert round((0.98 - got[1]) * math.sqrt(6), 4) == 0.3748


@pytest.mark.parametrize("local", [None, 12, 9])
def test_cag_keeps_the_attended_budget(local):
    frames, k, target, base = 24, 3, 0.85, 0.95
    got = chunk_sparsities(frames, k, target, base, local_attn_frames=local)
    assert len(got) == frames // k and got[0] == 0.0
    f = [k * (i + 1) for i in range(1, frames // k)]
    kv = [x if local is None else min(x, local) for x in f]
    spent = sum((1 - s) * n for s, n in zip(got[1:], kv))
    assert spent == pytest.approx(sum((1 - target) * n for n in kv), rel=1e-12)
    assert all(a < b for a, b in zip(got[1:], got[2:]))  # sparsity grows with the chunk index


def test_cag_single_chunk_and_bad_input():
    assert chunk_sparsities(3, 3, 0.8, 0.9) == [0.0]
    with pytest.raises(ValueError, match="num_frames=20 is not a whole number of chunks"):
        chunk_sparsities(20, 3, 0.88, 0.98)
    with pytest.raises(ValueError, match="local_attn_frames=2 is smaller than a chunk"):
        chunk_sparsities(21, 3, 0.88, 0.98, local_attn_frames=2)
    with pytest.raises(ValueError, match="sparsity_base=0.8 must be >= sparsity=0.88"):
        chunk_sparsities(21, 3, 0.88, 0.8)
    with pytest.raises(ValueError, match="sparsity=1.0 is out of range"):
        chunk_sparsities(21, 3, 1.0, 0.98)


# ------------------------------------------------------------------------------ HSA, loop reference


def loop_hsa(q, k, *, sparsity, block_size, frame_tokens, keep_frames, keep_sink, keep_near):
    """The rules of Hierarchical Sparse Attention, one (batch, head, query block) at a time."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    nqb, nkb = -(-nq // block_size), -(-nk // block_size)
    past = (nk - nq) // frame_tokens
    mask = torch.zeros(b, h, nqb, nkb, dtype=torch.bool)
    if past == 0:
        return mask | True
    keep = max(1, min(nkb, int((1.0 - sparsity) * nkb)))

    def block_tokens(j, n):
        return range(j * block_size, min(n, (j + 1) * block_size))

    def frames_of_block(j):
        return {t // frame_tokens for t in block_tokens(j, nk)}

    for bi in range(b):
        for hi in range(h):
            qd, kd = q[bi, hi].double(), k[bi, hi].double()
            key_means = [kd[list(block_tokens(j, nk))].mean(0) for j in range(nkb)]
            for i in range(nqb):
                q_mean = qd[list(block_tokens(i, nq))].mean(0)
                score = {j: float(q_mean @ key_means[j]) for j in range(nkb)}
                if past <= keep_frames:
                    candidates = set(range(nkb))
                else:
                    middle = list(range(keep_sink, past - keep_near))
                    frame_score = {
                        f: float(q_mean @ kd[f * frame_tokens : (f + 1) * frame_tokens].mean(0))
                        for f in middle
                    }
                    best = sorted(middle, key=lambda f: -frame_score[f])[
                        : keep_frames - keep_sink - keep_near
                    ]
                    kept_frames = set(range(keep_sink)) | set(range(past - keep_near, past)) | set(best)
                    kept_frames |= set(range(past, nk // frame_tokens))  # the current chunk
                    candidates = {j for j in range(nkb) if frames_of_block(j) & kept_frames}
                for j in sorted(candidates, key=lambda j: -score[j])[:keep]:
                    mask[bi, hi, i, j] = True
    return mask


def structured_qk(b, h, chunk_frames, past_frames, frame_tokens, d, dtype=torch.float32, seed=0):
    """Keys with a per-frame offset (so frames differ in relevance) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    frames = past_frames + chunk_frames
    offsets = torch.randn(b, h, frames, 1, d, generator=gen) * 1.5
    k = (offsets + torch.randn(b, h, frames, frame_tokens, d, generator=gen)).reshape(b, h, -1, d)
    q = torch.randn(b, h, chunk_frames * frame_tokens, d, generator=gen) + offsets[:, :, -1:, 0]
    return q.to(dtype), k.to(dtype)


HSA_CASES = [
    # (past frames, frame_tokens, block_size, keep_frames, keep_sink, keep_near, sparsity)
    pytest.param(0, 40, 16, 6, 1, 2, 0.8, id="no-history-dense"),
    pytest.param(4, 40, 16, 6, 1, 2, 0.8, id="one-stage-unaligned"),
    pytest.param(6, 32, 16, 6, 1, 2, 0.7, id="one-stage-at-keep_frames"),
    pytest.param(9, 40, 16, 6, 1, 2, 0.8, id="hierarchical-unaligned"),
    pytest.param(9, 32, 16, 6, 1, 2, 0.85, id="hierarchical-aligned"),
    pytest.param(10, 24, 16, 3, 1, 1, 0.6, id="hierarchical-long-config"),
    pytest.param(8, 48, 32, 3, 1, 2, 0.9, id="hierarchical-no-middle"),
    pytest.param(8, 20, 16, 4, 0, 0, 0.75, id="hierarchical-no-sink-no-near"),
]


@pytest.mark.parametrize(("past", "ft", "bs", "kf", "ks", "kn", "s"), HSA_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hsa_matches_the_rules(past, ft, bs, kf, ks, kn, s, dtype):
    q, k = structured_qk(2, 3, 3, past, ft, 16, dtype=dtype, seed=past + ft)
    args = dict(sparsity=s, block_size=bs, frame_tokens=ft, keep_frames=kf, keep_sink=ks, keep_near=kn)
    got = hsa_block_mask(q, k, **args)
    expected = loop_hsa(q, k, **args)
    assert got.shape == expected.shape == (2, 3, -(-q.shape[2] // bs), -(-k.shape[2] // bs))
    assert torch.equal(got, expected)
    if past:
        keep = max(1, int((1 - s) * got.shape[-1]))
        assert (got.sum(-1) <= keep).all() and (got.sum(-1) >= 1).all()


def test_hsa_current_chunk_is_a_candidate_not_forced():
    # past keys aligned with the queries, chunk keys orthogonal to them: the chunk is not kept
    q, k = structured_qk(1, 1, 3, 9, 32, 16, seed=3)
    k[:, :, -3 * 32 :] = -10 * q.mean(2, keepdim=True)
    mask = hsa_block_mask(
        q, k, sparsity=0.8, block_size=16, frame_tokens=32, keep_frames=6, keep_sink=1, keep_near=2
    )
    chunk_blocks = mask[..., -6:]
    assert not chunk_blocks.any()


def test_hsa_bad_input():
    q, k = structured_qk(1, 1, 3, 4, 32, 16)
    base = dict(sparsity=0.8, block_size=16, frame_tokens=32, keep_frames=6, keep_sink=1, keep_near=2)
    with pytest.raises(ValueError, match=r"keep_sink \+ keep_near = 4 \+ 3 = 7 must be <= keep_frames=6"):
        hsa_block_mask(q, k, **{**base, "keep_sink": 4, "keep_near": 3})
    with pytest.raises(ValueError, match="frame_tokens=30 does not divide"):
        hsa_block_mask(q, k, **{**base, "frame_tokens": 30})
    with pytest.raises(ValueError, match="fewer than q's"):
        hsa_block_mask(k, q, **base)
    with pytest.raises(ValueError, match="block_size=24 is not allowed"):
        hsa_block_mask(q, k, **{**base, "block_size": 24})
    with pytest.raises(
        ValueError, match="LightForcingConfig.keep_sink \\+ keep_near = 7 must be <= keep_frames=6"
    ):
        LightForcingConfig(keep_sink=4, keep_near=3)


# ------------------------------------------------------------------------------ attention


def _lf(q, k, v, **kwargs):
    args = dict(sparsity=0.75, block_size=16, frame_tokens=40, keep_frames=4, keep_sink=1, keep_near=1)
    args.update(kwargs)
    return light_forcing_attention(q, k, v, **args)


@pytest.mark.parametrize("past", [0, 3, 7])
@pytest.mark.parametrize("rectify", [False, True])
def test_attention_matches_reference_cpu(cpu_engine, past, rectify):
    q, k = structured_qk(2, 2, 3, past, 40, 32, seed=past)
    v = torch.randn_like(k)
    out, info = _lf(q, k, v, rectify=rectify)
    expected = naive_light_forcing_attention(q, k, v, info["block_mask"], 16, info["compensated"])
    assert rel_rmse(out, expected) < 1e-5
    assert info["regime"] == ("dense" if past == 0 else "one_stage" if past <= 4 else "hierarchical")
    if rectify and past:
        assert info["compensated"].any() and not (info["compensated"] & info["block_mask"]).any()


@pytest.mark.parametrize("backend", ["torch", pytest.param("flex", marks=pytest.mark.slow)])
def test_attention_matches_reference_bf16_and_other_backends(backend):
    q, k = structured_qk(1, 2, 3, 7, 40, 32, dtype=torch.bfloat16, seed=1)
    v = torch.randn_like(k)
    for rectify in (False, True):
        out, info = _lf(q, k, v, rectify=rectify, backend=backend)
        assert out.dtype == torch.bfloat16
        expected = naive_light_forcing_attention(q, k, v, info["block_mask"], 16, info["compensated"])
        assert rel_rmse(out, expected) < 2e-2


def test_attention_triton_interpreter():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    q, k = structured_qk(1, 1, 3, 5, 16, 16, seed=2)
    v = torch.randn_like(k)
    for rectify in (False, True):
        out, info = _lf(q, k, v, rectify=rectify, frame_tokens=16, keep_frames=3, backend="triton")
        expected = naive_light_forcing_attention(q, k, v, info["block_mask"], 16, info["compensated"])
        assert rel_rmse(out, expected) < 1e-4


def test_rectification_is_exact_on_block_constant_inputs():
    # q and k constant inside each block: every dropped block passes GAPR and its pooled key is exact
    b, h, d, bs, ft = 1, 2, 16, 16, 32
    frames, chunk = 10, 3
    kb = torch.randn(b, h, frames * ft // bs, 1, d)
    k = kb.expand(-1, -1, -1, bs, -1).reshape(b, h, -1, d)
    qb = torch.randn(b, h, chunk * ft // bs, 1, d)
    q = qb.expand(-1, -1, -1, bs, -1).reshape(b, h, -1, d)
    v = torch.randn_like(k)
    out, info = light_forcing_attention(
        q,
        k,
        v,
        sparsity=0.9,
        block_size=bs,
        frame_tokens=ft,
        keep_frames=4,
        keep_sink=1,
        keep_near=1,
        rectify=True,
    )
    assert info["regime"] == "hierarchical"
    assert torch.equal(info["compensated"], ~info["block_mask"])
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_rmse(out, dense) < 1e-5


def test_pooled_statistics_are_reused():
    q, k = structured_qk(1, 2, 3, 8, 40, 32, seed=5)
    v = torch.randn_like(k)
    out, info = _lf(q, k, v, rectify=True)
    past = info["past"]
    assert past.tokens == 8 * 40
    # the cached past is what is read at the next step: corrupting the cache's past keys and values
    # does not change the selection nor the pooled keys, only the exact attention to those keys
    k2 = k.clone()
    v2 = v.clone()
    k2[:, :, : 8 * 40] += torch.randn_like(k2[:, :, : 8 * 40])
    _, info_cached = _lf(q, k2, v2, rectify=True, pooled=past)
    _, info_fresh = _lf(q, k2, v2, rectify=True)
    # blocks partly in the past (320 tokens = 20 blocks of 16: none straddles) come from the cache
    assert torch.equal(info_cached["block_mask"], info["block_mask"])
    assert not torch.equal(info_fresh["block_mask"], info["block_mask"])
    # reuse gives bit-identical results when the cache did not change
    out_again, info_again = _lf(q, k, v, rectify=True, pooled=past)
    assert torch.equal(out_again, out) and torch.equal(info_again["block_mask"], info["block_mask"])


def test_pooled_statistics_extend_to_the_next_chunk():
    # frames of 40 tokens, blocks of 16: the past of chunk c ends inside a block; its cached
    # statistics, extended with chunk c, serve chunk c + 1 like a fresh pooling
    q, k = structured_qk(2, 1, 3, 10, 40, 32, seed=6)
    v = torch.randn_like(k)
    first = 7 * 40
    _, info_c = _lf(
        k[:, :, first : first + 3 * 40], k[:, :, : first + 3 * 40], v[:, :, : first + 3 * 40], rectify=True
    )
    out_cached, info_cached = _lf(q, k, v, rectify=True, pooled=info_c["past"])
    out_fresh, info_fresh = _lf(q, k, v, rectify=True)
    assert torch.equal(info_cached["block_mask"], info_fresh["block_mask"])
    assert torch.equal(info_cached["compensated"], info_fresh["compensated"])
    assert rel_rmse(out_cached, out_fresh) < 1e-6
    for name in ("block_keys", "frame_keys", "block_values", "block_key_deviation"):
        assert torch.allclose(
            getattr(info_cached["past"], name), getattr(info_fresh["past"], name), atol=1e-6
        )


# ------------------------------------------------------------------------------ on the causal Wan

LF_FRAME_HW = (8, 10)  # latent 8 x 10 -> 4 x 5 = 20 tokens per frame: blocks of 16 straddle frames
LF_FRAME_TOKENS = 20
LF_CHANNELS = 4
LF_TEXT_DIM = 16
LF_STEPS = [1000.0, 750.0]


def lf_wan(layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(11)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LF_CHANNELS,
        out_channels=LF_CHANNELS,
        text_dim=LF_TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()


def lf_inputs(batch=2, frames=12, seed=4):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, LF_CHANNELS, frames, *LF_FRAME_HW)
    clean = torch.randn(shape, generator=g)
    noisy = [torch.randn(shape, generator=g) for _ in LF_STEPS]
    text = torch.randn(batch, 5, LF_TEXT_DIM, generator=g)
    return clean, noisy, text


def lf_generate(model, clean, noisy, text, k=3, window=None, sinks=0):
    """Drive a causal session like CausalWanPipeline: denoising forwards per chunk, then the context pass."""
    from fastgen.processors.causal_wan import causal_generation

    b, _, frames = clean.shape[:3]
    preds = {}
    with torch.no_grad():
        with causal_generation(
            model,
            batch_size=b,
            num_frames=frames,
            frame_tokens=LF_FRAME_TOKENS,
            frames_per_chunk=k,
            local_attn_frames=window,
            sink_frames=sinks,
        ) as session:
            for c in range(frames // k):
                session.begin_chunk(c)
                chunk = slice(c * k, (c + 1) * k)
                for s, t in enumerate(LF_STEPS):
                    session.begin_step(s, t)
                    x = noisy[s][:, :, chunk]
                    preds[c, s] = model(x, torch.full((b,), t), text, return_dict=False)[0]
                session.begin_step(len(LF_STEPS), 0.0, context=True)
                x = clean[:, :, chunk]
                preds[c, "context"] = model(x, torch.zeros(b), text, return_dict=False)[0]
    return preds


def gapr_rule(q, k, mask, bs):
    """Rectified SpaAttn's GAPR, stated per block: a dropped block (I, J) is compensated when
    |q̄_I . k̄_J| > |a_I . k̄_J| + |q̄_I . b_J| (a, b: mean absolute deviation from the block mean), or when
    its pooling is exact (error 0)."""

    def stats(x):
        n = x.shape[2]
        means, devs = [], []
        for j in range(-(-n // bs)):
            block = x[:, :, j * bs : (j + 1) * bs].double()
            mean = block.mean(2)
            means.append(mean)
            devs.append((block - mean[:, :, None]).abs().mean(2))
        return torch.stack(means, 2), torch.stack(devs, 2)

    q_mean, a = stats(q)
    k_mean, b = stats(k)
    gain = (q_mean @ k_mean.transpose(-1, -2)).abs()
    error = (a @ k_mean.transpose(-1, -2)).abs() + (q_mean @ b.transpose(-1, -2)).abs()
    return ~mask & ((gain > error) | (error <= 0))


LF_TEST_CONFIG = dict(sparsity=0.6, sparsity_base=0.8, block_size=16, keep_frames=4, keep_sink=1, keep_near=1)


@pytest.mark.parametrize("rectify", [False, True])
def test_processor_chunks_match_the_rules(rectify):
    """Every chunk attention call of the installed processors equals the loop HSA rules at the chunk's CAG
    sparsity, run as a dense masked softmax (context pass included)."""
    from fastgen import apply_sparse_attention, remove_sparse_attention
    from fastgen.processors.light_forcing_wan import processors

    model = lf_wan()
    config = LightForcingConfig(**LF_TEST_CONFIG, rectify=rectify)
    apply_sparse_attention(model, config)
    calls = []
    for proc in processors(model):

        def record(query, key, value, info, proc=proc):
            out = type(proc).chunk_attention(proc, query, key, value, info)
            calls.append((query, key.clone(), value.clone(), out, info))
            return out

        proc.chunk_attention_fn = record
    clean, noisy, text = lf_inputs()
    lf_generate(model, clean, noisy, text)
    remove_sparse_attention(model)
    sparsities = chunk_sparsities(12, 3, 0.6, 0.8)
    assert len(calls) == 2 * 4 * 3  # layers x chunks x (2 steps + context pass)
    regimes = set()
    for query, key, value, out, info in calls:
        s = sparsities[info.chunk_index]
        rules = dict(
            sparsity=s, block_size=16, frame_tokens=LF_FRAME_TOKENS, keep_frames=4, keep_sink=1, keep_near=1
        )
        mask = loop_hsa(query, key, **rules)
        regimes.add((info.cached_frames > 0) + (info.cached_frames > 4))
        compensated = gapr_rule(query, key, mask, 16) if rectify and info.cached_frames else None
        want = naive_light_forcing_attention(query, key, value, mask, 16, compensated)
        assert rel_rmse(out, want) < 1e-5, (info.chunk_index, info.step_index, info.layer)
    assert regimes == {0, 1, 2}  # dense, one-stage and hierarchical chunks all ran


def test_remove_restores_dense_causal_generation_exactly():
    from fastgen import apply_sparse_attention, remove_sparse_attention

    model = lf_wan()
    clean, noisy, text = lf_inputs()
    dense = lf_generate(model, clean, noisy, text)
    originals = dict(model.attn_processors)
    apply_sparse_attention(model, LightForcingConfig(**LF_TEST_CONFIG))
    sparse = lf_generate(model, clean, noisy, text)
    remove_sparse_attention(model)
    again = lf_generate(model, clean, noisy, text)
    assert all(model.attn_processors[n] is p for n, p in originals.items())
    assert all(torch.equal(again[key], dense[key]) for key in dense)
    assert torch.equal(sparse[0, 0], dense[0, 0])  # chunk 0 is dense
    assert not torch.equal(sparse[3, 1], dense[3, 1])  # later chunks are sparse


def test_zero_sparsity_is_dense_and_stats_per_chunk():
    from fastgen import apply_sparse_attention, record_attention_stats
    from fastgen.processors.light_forcing_wan import stats

    model = lf_wan()
    clean, noisy, text = lf_inputs(batch=1)
    dense = lf_generate(model, clean, noisy, text)
    # sparsity 0 keeps every candidate; with keep_frames >= every past frame all blocks are candidates
    no_drop = {**LF_TEST_CONFIG, "sparsity": 0.0, "sparsity_base": 0.0, "keep_frames": 12}
    apply_sparse_attention(model, LightForcingConfig(**no_drop))
    record_attention_stats(model, "summary")  # statistics are opt-in
    full = lf_generate(model, clean, noisy, text)
    assert max(rel_rmse(full[key], dense[key]) for key in dense) < 1e-5
    rows = stats(model)
    assert [(r["chunk"], r["layer"]) for r in rows] == [(c, layer) for c in range(4) for layer in range(2)]
    assert all(r["density"] == pytest.approx(1.0) for r in rows)
    assert all(r["calls"] == 3 for r in rows)  # two denoising steps and the context pass

    apply_sparse_attention(model, LightForcingConfig(**LF_TEST_CONFIG))
    record_attention_stats(model, "summary")
    lf_generate(model, clean, noisy, text)
    summary = stats(model)
    assert summary and all(r["block_mask"] is None for r in summary)  # the "summary" level keeps no masks
    import fastgen

    with fastgen.recording_attention_stats(model, "masks"):
        lf_generate(model, clean, noisy, text)
    rows = stats(model)
    shared = fastgen.attention_stats(
        model
    )  # the interface every method reports through: last chunk per layer
    assert [(r["layer"], r["chunk"]) for r in shared] == [(0, 3), (1, 3)]
    assert all(0.0 < r["density"] < 1.0 for r in shared)
    s = chunk_sparsities(12, 3, 0.6, 0.8)
    for r in rows:
        assert r["sparsity"] == pytest.approx(s[r["chunk"]])
        if r["chunk"] == 0:
            assert r["regime"] == "dense" and r["density"] == 1.0 and r["block_mask"] is None
        else:
            assert r["regime"] == ("one_stage" if r["chunk"] == 1 else "hierarchical")
            nkb = -(-3 * (r["chunk"] + 1) * LF_FRAME_TOKENS // 16)
            assert r["block_mask"].shape == (2, -(-3 * LF_FRAME_TOKENS // 16), nkb)
            assert 0.0 < r["density"] < 1.0
            assert r["density"] == pytest.approx(max(1, int((1 - s[r["chunk"]]) * nkb)) / nkb, abs=0.15)
            assert 0 < r["keys_per_query"] < 3 * (r["chunk"] + 1) * LF_FRAME_TOKENS


@pytest.mark.parametrize(("window", "sinks"), [(None, 0), (9, 1)])
def test_pooled_cache_reuse_matches_pooling_every_call(window, sinks):
    from fastgen import apply_sparse_attention

    model = lf_wan(layers=1)
    clean, noisy, text = lf_inputs(frames=15)
    results = {}
    for pool_cache in (True, False):
        apply_sparse_attention(
            model, LightForcingConfig(**LF_TEST_CONFIG, rectify=True, pool_cache=pool_cache)
        )
        results[pool_cache] = lf_generate(model, clean, noisy, text, window=window, sinks=sinks)
    assert max(rel_rmse(results[True][key], results[False][key]) for key in results[True]) < 1e-6


def test_apply_bad_input():
    from fastgen import apply_sparse_attention

    with pytest.raises(ValueError, match="no adapter supports model=Linear"):
        apply_sparse_attention(torch.nn.Linear(2, 2), LightForcingConfig())
    with pytest.raises(ValueError, match="LightForcingConfig.keep_frames=0 must be an integer >= 1"):
        LightForcingConfig(keep_frames=0)
    with pytest.raises(ValueError, match="LightForcingConfig.rectify='yes' is not allowed"):
        LightForcingConfig(rectify="yes")
    long = LightForcingConfig.long_video()
    assert (long.sparsity, long.sparsity_base, long.keep_frames, long.keep_sink, long.keep_near) == (
        0.85,
        0.95,
        3,
        1,
        1,
    )


# ------------------------------------------------------------------------------ CLI, batch, demo

SMALL_CAUSAL = ["--height", "64", "--width", "64", "--frames", "21", "--steps", "2", "--block-size", "16"]
"""tiny-causal-wan at 6 latent frames (2 chunks) of 4 x 4 = 16 tokens: one block of 16 per frame."""


@pytest.mark.slow  # three tiny-causal-wan generations (~20 s on an idle 2-core machine)
def test_cli_generate_causal_light_forcing_compare_dense(tmp_path, capsys):
    from fastgen.cli import main
    from fastgen.io import read_video

    out = tmp_path / "lf.mp4"
    argv = ["generate", "--preset", "tiny-causal-wan", "--method", "light_forcing", "--compare-dense"]
    assert main([*argv, *SMALL_CAUSAL, "--prompt", "a red kite", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(light_forcing)" in printed and "Light Forcing density per chunk" in printed
    assert "0: 1.000" in printed  # chunk 0 dense
    assert "speedup" in printed and "PSNR" in printed
    assert read_video(out).shape == (21, 64, 64, 3)
    with pytest.raises(SystemExit):
        main(
            [
                "generate",
                "--preset",
                "tiny-causal-wan",
                "--method",
                "rectified",
                *SMALL_CAUSAL,
                "--prompt",
                "x",
            ]
        )
    assert "--method='rectified' is not allowed for a causal Wan" in capsys.readouterr().err


@pytest.mark.slow  # three tiny-causal-wan generations (~20 s on an idle 2-core machine)
def test_batch_causal_light_forcing(tmp_path):
    from fastgen.batch import MANIFEST, read_records, run_batch
    from fastgen.cli import build_parser
    from fastgen.io import read_video

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "seed": 3, "sparsity": 0.7}\n')
    out = tmp_path / "out"
    argv = [
        "batch",
        str(prompts),
        "--preset",
        "tiny-causal-wan",
        "--method",
        "light_forcing",
        "--out-dir",
        str(out),
    ]
    assert run_batch(build_parser().parse_args([*argv, *SMALL_CAUSAL, "--compare-dense"])) == 0
    (record,) = read_records(str(out / MANIFEST))
    assert record["status"] == "ok" and record["method"] == "light_forcing"
    assert record["config"]["sparsity"] == 0.7 and record["config"]["block_size"] == 16
    assert 0.0 < record["density"] < 1.0 and record["ssim"] is not None and record["speedup"] > 0
    assert read_video(out / record["output"]).shape == (21, 64, 64, 3)


@pytest.mark.slow  # three tiny-causal-wan generations (~20 s on an idle 2-core machine)
def test_demo_causal_tab_backend(tmp_path):
    pytest.importorskip("gradio")
    from fastgen.app.demo import CausalDemoBackend, DemoLimits, LazyPipeline
    from fastgen.pipelines.causal_video_runner import generate_causal_video

    from fastgen.pipelines import load_preset

    backend = CausalDemoBackend(
        pipeline=LazyPipeline(lambda: load_preset("tiny-causal-wan", num_layers=2)),
        generate=generate_causal_video,
        limits=DemoLimits(max_frames=33, max_side=128, max_steps=4),
    )
    dense, sparse, table, metrics, density, mask, chunk, layer, head, state = backend.run(
        "a cat", 0.7, 0.9, 16, False, 2, 1, 64, 64, 21
    )
    assert os.path.getsize(dense) > 0 and os.path.getsize(sparse) > 0
    assert "density of chunk 1" in table and metrics["chunk_density"]["0"] == 1.0
    assert 0.0 < metrics["chunk_density"]["1"] < 1.0
    for picture in (density, mask):
        with open(picture, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert chunk.value == "1" and layer.value == "0"  # the last sparse chunk, first layer
    assert {row["chunk"] for row in state["stats"]} == {0, 1}
    again = backend.redraw_mask(state, "1", "1", 1)
    assert again.endswith(".png") and os.path.getsize(again) > 0
    import gradio as gr

    with pytest.raises(gr.Error, match="sparsity base"):
        backend.run("a cat", 0.7, 1.5, 16, False, 2, 1, 64, 64, 21)


def test_causal_runner_bad_input():
    from fastgen.pipelines.causal_video_runner import denoising_timesteps, generate_causal_video

    assert denoising_timesteps(4) == pytest.approx([1000.0, 937.5, 833.333333, 625.0])
    with pytest.raises(ValueError, match="method='rectified' is not allowed for a causal Wan"):
        generate_causal_video(object(), prompt="x", method="rectified")
    with pytest.raises(ValueError, match="steps=0 must be an integer >= 1"):
        denoising_timesteps(0)


def _pipe_latents(pipe, latents, text, **kwargs):
    g = torch.Generator().manual_seed(9)
    out = pipe(
        prompt_embeds=text,
        num_frames=4 * (latents.shape[2] - 1) + 1,
        height=8 * LF_FRAME_HW[0],
        width=8 * LF_FRAME_HW[1],
        latents=latents.clone(),
        generator=g,
        denoising_timesteps=[1000.0, 750.0],
        output_type="latent",
        **kwargs,
    )
    return out.frames


def test_pipeline_apply_remove_exact_and_window_rope():
    from fastgen.pipelines import CausalWanPipeline

    pipe = CausalWanPipeline(transformer=lf_wan())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, LF_CHANNELS, 12, *LF_FRAME_HW, generator=g)
    text = torch.randn(2, 5, LF_TEXT_DIM, generator=g)
    dense = _pipe_latents(pipe, latents, text)
    apply_sparse_attention(pipe.transformer, LightForcingConfig(**LF_TEST_CONFIG))
    sparse = _pipe_latents(pipe, latents, text)
    remove_sparse_attention(pipe.transformer)
    again = _pipe_latents(pipe, latents, text)
    assert torch.equal(again, dense)
    assert torch.equal(sparse[:, :, :3], dense[:, :, :3])  # chunk 0 dense
    assert 1e-4 < rel_rmse(sparse, dense) < 0.5
    # the authors' long-video setting: rolling window with a sink, keys rotated by window position on
    # read; the pooled statistics kept across steps and chunks serve it exactly like pooling every call
    window = dict(local_attn_frames=9, sink_frames=1, rope_positions="window")
    results = []
    for pool_cache in (True, False):
        config = LightForcingConfig.long_video(
            block_size=16, sparsity=0.6, sparsity_base=0.8, pool_cache=pool_cache
        )
        apply_sparse_attention(pipe.transformer, config)
        results.append(_pipe_latents(pipe, latents, text, **window))
        remove_sparse_attention(pipe.transformer)
    assert rel_rmse(results[0], results[1]) < 1e-6
