"""Window-Diffusion in the diffusion-LM pipeline: exactness oracles, a slow plain-PyTorch statement of
the rules, batch / padding / CFG, composition with SparseD and threshold decoding, bad input."""

from __future__ import annotations

import types

import pytest
import torch
from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline, num_transfer_tokens

import fastgen
from fastgen import SparseDConfig, WindowDiffusionConfig
from fastgen.attention.window import WindowKVCache, leftmost, pack_positions, window_attention
from fastgen.processors import transformers_lm
from tests.tiny_models import MASK, VOCAB, prompts, tiny_pipe

# ------------------------------------------------------------------------------------------- model-agnostic parts


def test_leftmost_and_pack_positions():
    sel = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    assert leftmost(sel, 2).long().tolist() == [[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]]
    assert leftmost(sel, torch.tensor([1, 0])).long().tolist() == [[1, 0, 0, 0, 0, 0], [0] * 6]
    index, valid = pack_positions(sel, dump_index=6)
    assert index.tolist() == [[0, 2, 3, 5], [3, 6, 6, 6]]
    assert valid.tolist() == [[True] * 4, [True, False, False, False]]


def test_cache_scatter_gather_and_window_attention_match_reference():
    torch.manual_seed(0)
    cache = WindowKVCache(10)
    k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    for layer in (0, 3):
        cache.write_prefix(layer, k, v)
    index = torch.tensor([[1, 4, 10], [0, 9, 2]])  # row 0 pads with the dump slot
    k_new, v_new = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    cache.scatter(3, index, k_new, v_new)
    expect_k = k.clone()
    expect_k[0, :, 1], expect_k[0, :, 4] = k_new[0, :, 0], k_new[0, :, 1]
    expect_k[1, :, 0], expect_k[1, :, 9], expect_k[1, :, 2] = k_new[1, :, 0], k_new[1, :, 1], k_new[1, :, 2]
    assert torch.equal(cache.keys[3][:, :, :10], expect_k) and torch.equal(cache.keys[0][:, :, :10], k)
    w_index = torch.tensor([[0, 1, 4, 10], [2, 3, 9, 5]])
    w_valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    kw, vw = cache.gather(3, w_index)
    q = torch.randn(2, 4, 3, 8)  # 4 query heads over 2 key/value heads
    out = window_attention(q, kw, vw, w_valid)
    for b in range(2):
        keys = [int(i) for i, ok in zip(w_index[b], w_valid[b]) if ok]
        kk = cache.keys[3][b][:, keys].repeat_interleave(2, 0)
        vv = cache.values[3][b][:, keys].repeat_interleave(2, 0)
        ref = torch.softmax(q[b] @ kk.transpose(-1, -2) / 8**0.5, -1) @ vv
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="refresh"):
        cache.gather(1, w_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_window_buffer_equals_scatter_then_gather_on_the_full_cache(dtype, batch):
    """The per-phase contiguous window buffer (gathered once, fresh rows written at their slots) holds what
    scattering into the full cache and gathering the window every step holds, and attends the same."""
    g = torch.Generator().manual_seed(2)
    n, heads, kv_heads, dim = 13, 4, 2, 8
    cache = WindowKVCache(n)
    k, v = (
        torch.randn(batch, kv_heads, n, dim, generator=g),
        torch.randn(batch, kv_heads, n, dim, generator=g),
    )
    cache.write_prefix(0, k.to(dtype), v.to(dtype))
    windows = [[0, 2, 3, 5, 6, 7, 11], [1, 4, 5, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]][:batch]
    selected = torch.zeros(batch, n, dtype=torch.bool)
    for b, w in enumerate(windows):
        selected[b, w] = True
    w_index, w_valid = pack_positions(selected, n)
    cache.freeze_window(w_index, w_valid)
    reference = WindowKVCache(n)
    reference.write_prefix(0, k.to(dtype), v.to(dtype))
    for queries in ([[2, 5, 11], [4, 9], [0, 12, 7]], [[3, 6], [1], [12]]):
        q_sel = torch.zeros(batch, n, dtype=torch.bool)
        for b, q in enumerate(queries[:batch]):
            q_sel[b, q] = True
        q_index, _ = pack_positions(q_sel, n)
        k_new = torch.randn(batch, kv_heads, q_index.shape[1], dim, generator=g).to(dtype)
        v_new = torch.randn(batch, kv_heads, q_index.shape[1], dim, generator=g).to(dtype)
        slots = cache.window_slots(q_index)
        cache.scatter_window(0, slots, k_new, v_new)
        reference.scatter(0, q_index, k_new, v_new)
        kw, vw, key_mask = cache.window(0)
        rk, rv = reference.gather(0, w_index)
        real = w_valid[:, None, :, None].expand_as(rk)  # padded entries hold anything (never attended)
        width = w_index.shape[1]
        assert torch.equal(kw[:, :, :width][real], rk[real]) and torch.equal(vw[:, :, :width][real], rv[real])
        assert (key_mask is None) == (batch == 1)
        q = torch.randn(batch, heads, q_index.shape[1], dim, generator=g).to(dtype)
        out = window_attention(q, kw, vw, key_mask)
        for b in range(batch):
            keys = windows[b]
            kk = reference.keys[0][b][:, keys].float().repeat_interleave(2, 0)
            vv = reference.values[0][b][:, keys].float().repeat_interleave(2, 0)
            ref = torch.softmax(q[b].float() @ kk.transpose(-1, -2) / dim**0.5, -1) @ vv
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[b].float(), ref, rtol=tol, atol=tol)
    outside = torch.tensor(
        [[1] + [n] * (w_index.shape[1] - 1)] * batch
    )  # position 1 is not in row 0's window
    with pytest.raises(ValueError, match="outside the phase's frozen window"):
        cache.window_slots(outside)


# ------------------------------------------------------------------------------------------- exactness oracles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_full_window_every_step_refresh_equals_dense_bit_for_bit(dtype, cfg_scale):
    pipe = tiny_pipe(dtype=dtype)
    ids, attn = prompts()
    kw = dict(input_ids=ids, attention_mask=attn, gen_length=20, steps=20, block_length=10, progress=False)
    kw.update(generator=0, cfg_scale=cfg_scale)
    dense = pipe(**kw)
    wd = pipe(acceleration=[WindowDiffusionConfig(window=20, active=20, refresh_cycle=1)], **kw)
    assert torch.equal(dense.sequences, wd.sequences)
    assert all(t["refresh"] for t in wd.window_trace)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_refresh_cache_equals_fresh_forward_keys_values(family):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    pipe = tiny_pipe(family)
    model = pipe.model
    ids, attn = prompts()
    x = torch.cat([ids, torch.full((2, 6), MASK)], 1)
    valid = torch.cat([attn.bool(), torch.ones(2, 6, dtype=torch.bool)], 1)
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    captured = {}

    def hook(name):
        def fn(module, inputs, output):
            captured[name] = output.detach()

        return fn

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(("k", i))))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook(("v", i))))
    try:
        state = transformers_lm.begin_window(model, x.shape[1])
        state.refresh()
        with torch.no_grad():
            from fastgen.pipelines.diffusion_lm import bidirectional_mask

            model(
                input_ids=x, attention_mask=bidirectional_mask(valid, torch.float32), position_ids=positions
            )
    finally:
        transformers_lm.end_window(model)
        for h in handles:
            h.remove()
    cos, sin = model.model.rotary_emb(torch.zeros(1), positions)
    heads, dim = (
        model.config.num_key_value_heads,
        model.config.hidden_size // model.config.num_attention_heads,
    )
    for i in range(model.config.num_hidden_layers):
        k = captured[("k", i)].view(2, -1, heads, dim).transpose(1, 2)
        v = captured[("v", i)].view(2, -1, heads, dim).transpose(1, 2)
        _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
        torch.testing.assert_close(state.cache.keys[i][:, :, : x.shape[1]], k_rot, rtol=1e-6, atol=1e-6)
        assert torch.equal(state.cache.values[i][:, :, : x.shape[1]], v)
    assert model.config._attn_implementation == "sdpa"


class StaleKV:
    """The slow statement of a pruned step: a FULL forward in which the keys/values of every position
    not run fresh are replaced by stale copies kept in a dict, and every query sees only the window."""

    def __init__(self):
        self.stale: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh = None  # [B, N] bool: positions whose K/V are recomputed this step (None: all)
        self.window = None  # [B, N] bool: keys attended

    def __call__(self, module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = module.layer_idx
        if self.fresh is None:
            self.stale[layer] = (k.clone(), v.clone())
            keys_ok = attention_mask[:, 0, 0] == 0  # the pipeline's padding-aware additive mask
        else:
            old_k, old_v = self.stale[layer]
            f = self.fresh[:, None, :, None]
            k, v = torch.where(f, k, old_k), torch.where(f, v, old_v)
            self.stale[layer] = (k.clone(), v.clone())
            keys_ok = self.window
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~keys_ok[:, None, None, :], float("-inf"))
        return (torch.softmax(scores, -1) @ v).transpose(1, 2), None


def reference_window_generation(
    pipe, ids, attn, *, gen_length, steps, window, active, refresh_cycle, cfg_scale=0.0, shift=False
):
    """LLaDA rules of Window-Diffusion, one block, greedy low-confidence, written plainly. With ``shift``
    the logits of position p - 1 predict p, so p - 1 is recomputed with every active mask p."""
    from fastgen.pipelines.diffusion_lm import bidirectional_mask
    from transformers import AttentionInterface

    model = pipe.model
    attention = StaleKV()
    AttentionInterface.register("test_stale_kv", attention)
    saved = model.config._attn_implementation
    model.set_attn_implementation("test_stale_kv")
    batch, plen = ids.shape
    total = plen + gen_length
    x = torch.cat([ids.masked_fill(attn == 0, 0), torch.full((batch, gen_length), MASK)], 1)
    valid = torch.cat([attn.bool(), torch.ones(batch, gen_length, dtype=torch.bool)], 1)
    prompt = torch.zeros_like(valid)
    prompt[:, :plen] = attn.bool()
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    schedule = num_transfer_tokens(torch.full((batch,), gen_length), steps)
    gen = torch.zeros(batch, total, dtype=torch.bool)
    gen[:, plen:] = True

    def forward(fresh, window_set):
        both = cfg_scale > 0
        seq = torch.cat([x, x.masked_fill(prompt, MASK)]) if both else x
        v2 = torch.cat([valid, valid]) if both else valid
        attention.fresh = None if fresh is None else (torch.cat([fresh, fresh]) if both else fresh)
        attention.window = (
            None if window_set is None else (torch.cat([window_set, window_set]) if both else window_set)
        )
        pos = torch.cat([positions, positions]) if both else positions
        logits = model(
            input_ids=seq, attention_mask=bidirectional_mask(v2, torch.float32), position_ids=pos
        ).logits
        if both:
            logits = logits[batch:] + (cfg_scale + 1) * (logits[:batch] - logits[batch:])
        return logits.float()

    def commit(logits, allowed, counts):
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
        logits[..., MASK] = float("-inf")
        probs = torch.softmax(logits, -1)
        conf, tok = probs.max(-1)
        decoded = torch.zeros_like(allowed)
        for b in range(batch):
            cand = allowed[b].nonzero().flatten().tolist()
            cand.sort(key=lambda p: -conf[b, p].item())  # stable: ties keep position order
            for p in cand[: int(counts[b])]:
                x[b, p] = tok[b, p]
                decoded[b, p] = True
        return decoded

    try:
        with torch.no_grad():
            for step in range(steps):
                masks = (x == MASK) & gen
                if step % refresh_cycle == 0:
                    logits = forward(None, None)
                    refresh_decoded = commit(logits, masks, schedule[:, step])
                    masks = (x == MASK) & gen
                    rank = masks.long().cumsum(1)
                    window_set = (~masks & valid) | (masks & (rank <= window))
                    pruned_decoded = torch.zeros_like(masks)
                    first = True
                else:
                    rank = masks.long().cumsum(1)
                    act = (
                        (masks & (rank <= active))
                        | pruned_decoded
                        | (refresh_decoded if first else pruned_decoded)
                    )
                    assert not (act & ~window_set).any()  # the constraint keeps queries in the window
                    fresh = act | torch.roll(act & masks, -1, 1) if shift else act
                    logits = forward(fresh, window_set)
                    pruned_decoded |= commit(logits, act & masks, schedule[:, step])
                    first = False
    finally:
        model.set_attn_implementation(saved)
    return x


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_generation_equals_slow_stale_kv_statement_of_the_rules(cfg_scale):
    pipe = tiny_pipe()
    ids, attn = prompts()
    cfg = WindowDiffusionConfig(window=16, active=6, refresh_cycle=6)
    kw = dict(gen_length=30, steps=30)
    got = pipe(
        input_ids=ids, attention_mask=attn, acceleration=[cfg], cfg_scale=cfg_scale, progress=False, **kw
    )
    want = reference_window_generation(
        pipe, ids, attn, window=16, active=6, refresh_cycle=6, cfg_scale=cfg_scale, **kw
    )
    assert torch.equal(got.sequences, want)
    dense = pipe(
        input_ids=ids, attention_mask=attn, block_length=30, cfg_scale=cfg_scale, progress=False, **kw
    )
    assert not torch.equal(dense.sequences, got.sequences)  # the oracle is not the dense run in disguise
    pruned = [t for t in got.window_trace if not t["refresh"]]
    assert len(pruned) == 25 and max(t["queries"] for t in pruned) < 30
    assert all(set(t["active"].tolist()) <= set(t["window"].tolist()) for t in pruned)


def test_logit_shift_recomputes_the_position_before_each_active_mask():
    pipe = tiny_pipe("dream")
    ids, attn = prompts()
    cfg = WindowDiffusionConfig(window=16, active=5, refresh_cycle=6, sliding=False)
    kw = dict(gen_length=24, steps=24)
    got = pipe(input_ids=ids, attention_mask=attn, acceleration=[cfg], sampler="llada", progress=False, **kw)
    want = reference_window_generation(
        pipe, ids, attn, window=16, active=5, refresh_cycle=6, shift=True, **kw
    )
    assert torch.equal(got.sequences, want)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_batch_with_left_padding_equals_each_row_alone(family, cfg_scale):
    pipe = tiny_pipe(family)
    ids, attn = prompts(3)
    cfg = WindowDiffusionConfig(window=14, active=4, refresh_cycle=5)
    kw = dict(gen_length=24, steps=24, acceleration=[cfg], cfg_scale=cfg_scale, progress=False, generator=0)
    batch = pipe(input_ids=ids, attention_mask=attn, **kw)
    for b in range(3):
        alone = pipe(
            input_ids=ids[b][attn[b].bool()], generator=b, **{k: v for k, v in kw.items() if k != "generator"}
        )
        assert batch.sequences[b, -24:].tolist() == alone.sequences[0, -24:].tolist()


def test_dream_rules_trace_span_and_prefix():
    pipe = tiny_pipe("dream")
    ids, attn = prompts(1)
    out = pipe(input_ids=ids, gen_length=40, steps=40, progress=False,
               acceleration=[WindowDiffusionConfig(window=20, active=6, refresh_cycle=8)])  # fmt: skip
    assert not (out.sequences == MASK).any()
    trace = out.window_trace
    assert [t["refresh"] for t in trace[:9]] == [True] + [False] * 7 + [True]
    plen = ids.shape[1]
    first = trace[0]
    assert first["keys"] == plen + 19  # the prefix stops before the 20th mask
    for t in trace[1:8]:
        span = t["active"].tolist()
        assert span == list(range(span[0], span[-1] + 1))  # contiguous span
        assert span[0] == plen  # starts at the token the refresh decoded (its logits predict the next)
        assert set(span) <= set(t["window"].tolist())


def test_defaults_per_family_and_block_length():
    assert WindowDiffusionConfig().resolved("llada") == WindowDiffusionConfig(64, 16, 32, False)
    assert WindowDiffusionConfig().resolved("dream") == WindowDiffusionConfig(128, 16, 32, True)
    assert WindowDiffusionConfig(window=80).resolved("dream").window == 80
    pipe = tiny_pipe()
    ids, _ = prompts(1)
    out = pipe(input_ids=ids, gen_length=64, steps=64, acceleration=WindowDiffusionConfig(), progress=False)
    # block_length defaults to gen_length: one phase of 32 steps then a refresh, as the reference
    assert [t["step"] for t in out.window_trace if t["refresh"]] == [0, 32]


def test_block_length_keeps_sets_inside_the_block():
    pipe = tiny_pipe()
    ids, _ = prompts(1)
    plen = ids.shape[1]
    cfg = WindowDiffusionConfig(window=12, active=4, refresh_cycle=4)
    out = pipe(input_ids=ids, gen_length=32, steps=32, block_length=16, acceleration=[cfg], progress=False)
    refresh_steps = [t["step"] for t in out.window_trace if t["refresh"]]
    assert refresh_steps == [0, 4, 8, 12, 16, 20, 24, 28]  # every block starts with a refresh
    for t in out.window_trace:
        block_end = plen + 16 * (t["step"] // 16 + 1)
        if not t["refresh"]:
            assert max(t["active"].tolist()) < block_end and max(t["window"].tolist()) < block_end


def test_apply_sparse_attention_records_config_for_the_pipeline():
    pipe = tiny_pipe()
    ids, _ = prompts(1)
    fastgen.apply_sparse_attention(pipe.model, WindowDiffusionConfig(window=16, active=4, refresh_cycle=4))
    try:
        out = pipe(input_ids=ids, gen_length=16, steps=16, progress=False)
        assert out.window_trace is not None and not out.window_trace[1]["refresh"]
    finally:
        fastgen.remove_sparse_attention(pipe.model)
    assert pipe(input_ids=ids, gen_length=16, steps=16, block_length=16, progress=False).window_trace is None


# ------------------------------------------------------------------------------------------- composition


def test_composition_with_sparsed_runs_sparse_refresh_steps(monkeypatch):
    pipe = tiny_pipe()
    ids, attn = prompts()
    calls = []
    real = transformers_lm.sparsed.sparsed_attention
    monkeypatch.setattr(
        transformers_lm.sparsed, "sparsed_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    wd = WindowDiffusionConfig(window=24, active=8, refresh_cycle=4)
    kw = dict(input_ids=ids, attention_mask=attn, gen_length=32, steps=32, progress=False)
    alone = pipe(acceleration=[wd], **kw)
    full_select = pipe(acceleration=[wd, SparseDConfig(skip=0.0, select=1.0, block_size=16)], **kw)
    assert calls  # refresh steps after the warm-up went through SparseD's block-sparse attention
    assert torch.equal(alone.sequences, full_select.sequences)  # select=1 keeps every block: same tokens
    calls.clear()
    sparse = pipe(acceleration=[SparseDConfig(skip=0.25, select=0.5, block_size=16), wd], **kw)
    # 8 refresh steps, 2 dense warm-up refreshes, 6 sparse ones x 2 layers
    assert len(calls) == 12 and not (sparse.sequences == MASK).any()
    assert pipe.model.config._attn_implementation == "sdpa"


def test_threshold_decoding_commits_more_and_stays_in_window():
    pipe = tiny_pipe()
    ids, attn = prompts()
    wd = WindowDiffusionConfig(window=20, active=8, refresh_cycle=8)
    kw = dict(input_ids=ids, attention_mask=attn, gen_length=40, steps=40, progress=False, acceleration=[wd])
    out = pipe(confidence_threshold=0.05, **kw)
    assert out.steps_run < 40 and not (out.sequences == MASK).any()
    assert all(set(t["active"].tolist()) <= set(t["window"].tolist()) for t in out.window_trace)
    everything = pipe(confidence_threshold=1e-9, **kw)
    assert everything.steps_run == 1  # the refresh step commits every mask above the threshold


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(window=8, active=16), "active"), (dict(window=0), "window"), (dict(refresh_cycle=-1), "refresh_cycle"),
     (dict(active=0), "active"), (dict(sliding="yes"), "sliding")],
)  # fmt: skip
def test_config_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        WindowDiffusionConfig(**kwargs)


def test_pipeline_bad_input_names_parameter():
    pipe = tiny_pipe()
    ids, _ = prompts(1)
    kw = dict(input_ids=ids, gen_length=32, steps=32, progress=False)
    with pytest.raises(ValueError, match=r"active=16 \+ \(refresh_cycle=32 - 1\).*window=20"):
        pipe(acceleration=[WindowDiffusionConfig(window=20)], **kw)
    with pytest.raises(ValueError, match="refresh_cycle=8.*window=12"):
        pipe(acceleration=[WindowDiffusionConfig(window=12, active=4, refresh_cycle=8, sliding=True)], **kw)
    with pytest.raises(ValueError, match="at most one"):
        pipe(acceleration=[WindowDiffusionConfig(), WindowDiffusionConfig()], **kw)
    with pytest.raises(ValueError, match="alg='entropy'.*sampler='dream'"):
        pipe(alg="entropy", **kw)
    with pytest.raises(ValueError, match="top_k"):
        pipe(top_k=5, **kw)

    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(mask_token_id=MASK, max_position_embeddings=64)
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    with pytest.raises(ValueError, match="position_ids"):
        DiffusionLMPipeline(NoPositions())(acceleration=[WindowDiffusionConfig(window=32)], **kw)


# ------------------------------------------------------------------------------------------- CLI, batch, runner


@pytest.mark.slow
def test_generate_cli_window_methods(capsys):
    from fastgen.cli import main

    for method in ("window_diffusion", "sparsed+window_diffusion"):
        argv = ["generate", "--preset", "tiny-llada", "--method", method, "--prompt", "Hi", "--gen-length", "32",
                "--steps", "32", "--window", "16", "--active", "4", "--refresh-cycle", "8", "--compare-dense"]  # fmt: skip
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert (
            f"[{method}]" in text and "refresh steps 4, pruned steps 28" in text and "token agreement" in text
        )


def test_batch_records_every_config_of_the_composition(tmp_path):
    from fastgen.batch import MANIFEST, read_records, run_batch
    from fastgen.cli import build_parser

    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"prompt": "Hello", "window": 16, "select": 0.5}\n{"prompt": "Why"}\n')
    out = tmp_path / "out"
    argv = ["batch", str(prompts_file), "--preset", "tiny-llada", "--method", "sparsed+window_diffusion",
            "--out-dir", str(out), "--gen-length", "16", "--steps", "16", "--active", "4", "--refresh-cycle", "4"]  # fmt: skip
    assert run_batch(build_parser().parse_args(argv)) == 0
    first, second = read_records(str(out / MANIFEST))
    assert first["status"] == second["status"] == "ok"
    wd, sp = first["config"]
    assert (wd["method"], wd["window"], wd["active"], wd["refresh_cycle"]) == ("window_diffusion", 16, 4, 4)
    assert (sp["method"], sp["select"]) == ("sparsed", 0.5)
    assert [c["method"] for c in second["config"]] == ["window_diffusion"]  # only the WD options were given


@pytest.mark.slow
def test_window_bench_report_at_a_tiny_size():
    from fastgen.bench.window import format_table, run_window_bench

    report = run_window_bench(families=("llada", "dream"), prompt_length=16, gen_lengths=(32,), agreement_up_to=32,
                              sparsed=SparseDConfig(block_size=16))  # fmt: skip
    assert [r["family"] for r in report["results"]] == ["llada", "dream"]
    for row in report["results"]:
        for name in ("window_diffusion", "window_diffusion+sparsed", "window_diffusion+threshold"):
            assert row[name]["tokens_per_s"] > 0 and row[name]["predicted_flop_ratio"] >= 1.0
            assert 0.0 <= row[name]["token_agreement"] <= 1.0
        cost = row["forward_cost"]
        assert cost["full_over_pruned_forward"] > 0 and cost["speedup_bound"] > 0
    assert "window_diffusion+threshold" in format_table(report) and "speed-up bound" in format_table(report)


def test_window_bench_pruned_attention_section():
    from fastgen.bench.window import format_table, pruned_attention_bench

    rows = pruned_attention_bench(((5, 40),), block_sizes=(16,), heads=2, head_dim=16, rounds=1, calls=1)
    names = [r["variant"] for r in rows]
    assert names[0] == "sdpa" and {"sparsed block 16 gather", "sparsed block 16 torch"} <= set(names)
    assert all(r["ms"] > 0 and r["queries"] == 5 and r["keys"] == 40 for r in rows)
    assert "sparsed block 16 torch" in format_table({"results": [], "pruned_attention": rows})


def test_window_bench_real_scale_shapes_are_the_published_models():
    """``--scale real`` builds the published LLaDA-8B and Dream-7B shapes (meta device: nothing is
    allocated). Expected figures from the model cards, not from the bench's table: LLaDA-8B 8.02B
    parameters, MHA, no attention biases, mask id 126336; Dream-7B (Qwen2.5-7B) 7.61B, 4 KV heads, q/k/v
    biases, mask id 151666."""
    from fastgen.bench.window import build_model

    expected = {"llada": (8.02e9, 32, False, 126336), "dream": (7.61e9, 4, True, 151666)}
    for family, (params, kv_heads, bias, mask_id) in expected.items():
        pipe = build_model(family, 1536, device="meta", dtype="bfloat16", scale="real")
        model = pipe.model
        assert abs(sum(p.numel() for p in model.parameters()) - params) / params < 0.005
        attn = model.model.layers[0].self_attn
        assert model.config.num_key_value_heads == kv_heads and (attn.q_proj.bias is not None) == bias
        assert pipe.mask_token_id == mask_id and next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale='huge'"):
        build_model("llada", 64, scale="huge")


def test_window_bench_real_scale_path_runs_with_a_mask_id_inside_the_vocabulary(monkeypatch):
    """The real-scale path of the bench end to end, on a shrunken copy of the real table: the mask id is
    not the last id there, and the prompt's random tokens stay below it."""
    from fastgen.bench import window as bench

    small = {"hidden": 64, "heads": 2, "kv_heads": 1, "head_dim": 32, "layers": 2, "mlp": 128,
             "vocab": 300, "mask_token_id": 290, "rope_theta": 10000.0}  # fmt: skip
    monkeypatch.setitem(bench.REAL_SHAPES, "dream", small)
    report = bench.run_window_bench(families=("dream",), prompt_length=16, gen_lengths=(16,), agreement_up_to=16,
                                    variants=("window_diffusion",), scale="real", device="cpu", dtype="float32")  # fmt: skip
    row = report["results"][0]
    assert report["scale"] == "real" and row["shape"] == small
    assert row["window_diffusion"]["steps_run"] == 16 and row["window_diffusion"]["tokens_per_s"] > 0
