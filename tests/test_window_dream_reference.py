"""Window-Diffusion's Dream (sliding) rules checked against a slow plain-PyTorch statement of them.

The statement is written here from DESIGN.md ("Window-Diffusion", Dream variant) and the authors' Dream
code (``nearest_sample_fast_v2_cache`` of vhicrgit/Window-Diffusion), one row at a time (the reference
runs batch 1), greedy, Dream's sampler (``alg="entropy"``: confidence = minus the entropy):

- step ``i`` with ``i % refresh_cycle == 0`` is a refresh: the sequence is cut just before the
  ``window``-th remaining mask (the whole sequence when fewer remain), that prefix runs one full
  bidirectional forward and only the leftmost mask is decoded (its own prediction); the keys and
  values of every prefix position are kept.
- every other step is pruned: the span from the token the refresh decoded to the position before the
  ``active + 1``-th remaining mask (the sequence end when there is none: the reference's
  ``ranks <= i_win_size``) is recomputed; every other prefix position keeps its stale keys/values; the
  span's queries attend to the whole refresh prefix. Dream's schedule decides how many of the span's
  masks are committed: ``int(n_masked * (1 - s / t))`` on ``linspace(1, 1e-3, steps + 1)``, all the
  rest at the last step, most confident first.
- with Dream's logit shift the prediction for position ``p`` comes from position ``p - 1``.

"Stale keys/values" are stated the slow way: each step is a FULL forward of the tiny Qwen2 (GQA) model
through an attention function that replaces the keys/values of the positions not recomputed by copies
kept in a dict. The pipeline's cached, pruned forwards must give the same tokens, token for token.
"""

from __future__ import annotations

import pytest
import torch
from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline

from fastgen import WindowDiffusionConfig
from tests.tiny_models import tiny_pipe

MASK = 61
VOCAB = 64
EPS = 1e-3


def tiny_qwen2(seed: int = 0) -> DiffusionLMPipeline:
    """A Dream-shaped tiny model (Qwen2ForCausalLM, 4 query heads over 2 key/value heads, 2 layers: the
    one of tests/test_window_diffusion.py) whose mask id is not the last vocabulary id."""
    model = tiny_pipe("dream", seed=seed).model
    model.config.fastgen_mask_token_id = MASK
    return DiffusionLMPipeline(model, mask_token_id=MASK)


def prompt_rows(lengths=(11, 6), seed=3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, MASK, (n,), generator=g) for n in lengths]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` left-padded to the longest (pad id 0)."""
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - row.numel() :] = row
        attn[b, width - row.numel() :] = 1
    return ids, attn


class StaleKeysValues:
    """Attention function of the slow statement: a full forward whose keys/values are fresh only at
    ``fresh`` positions (all of them when ``fresh`` is None) and copies from ``kept`` elsewhere."""

    def __init__(self):
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh: torch.Tensor | None = None  # [L] bool

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = module.layer_idx
        if self.fresh is not None:
            old_key, old_value = self.kept[layer]
            keep_fresh = self.fresh[None, None, :, None]
            key = torch.where(keep_fresh, key, old_key)
            value = torch.where(keep_fresh, value, old_value)
        self.kept[layer] = (key.clone(), value.clone())
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        probs = torch.softmax((query @ key.transpose(-1, -2)) * scaling, dim=-1)  # every key: no masks
        return (probs @ value).transpose(1, 2), None


def dream_count(masked: int, step: int, steps: int) -> int:
    if step == steps - 1:
        return masked
    timesteps = torch.linspace(1, EPS, steps + 1)
    return int(masked * (1 - timesteps[step + 1] / timesteps[step]))


def reference_dream_window(pipe, prompt, *, gen_length, steps, window, active, refresh_cycle, shift):
    """The Dream rules for one unpadded row, every step a full forward with stale keys/values.

    Returns the final sequence and, per step, ``(kind, positions)``: the prefix a refresh ran, or the
    span a pruned step recomputed."""
    from transformers import AttentionInterface

    model = pipe.model
    attention = StaleKeysValues()
    AttentionInterface.register("test_dream_stale_kv", attention)
    saved = model.config._attn_implementation
    model.set_attn_implementation("test_dream_stale_kv")
    plen = prompt.numel()
    total = plen + gen_length
    x = torch.cat([prompt, torch.full((gen_length,), MASK)])
    trace = []

    def predictions(length: int):
        """Greedy tokens and minus-entropy confidences ``[length]`` for a forward of ``x[:length]``."""
        ids = x[:length][None]
        bidirectional = torch.zeros(1, 1, length, length)
        logits = model(input_ids=ids, attention_mask=bidirectional, position_ids=torch.arange(length)[None])
        logits = logits.logits[0].float()
        if shift:  # logits[p - 1] predict token p
            logits = torch.cat([logits[:1], logits[:-1]])
        logits[:, MASK] = float("-inf")  # the mask token itself is never committed
        probs = torch.softmax(logits, -1)
        return probs.argmax(-1), (probs * torch.log(probs + 1e-10)).sum(-1)

    try:
        with torch.no_grad():
            for step in range(steps):
                masks = x == MASK
                if not masks.any():
                    break
                rank = masks.long().cumsum(0)
                if step % refresh_cycle == 0:
                    attention.fresh = None
                    beyond = (masks & (rank == window)).nonzero().flatten()
                    cut = int(beyond[0]) if beyond.numel() else total
                    token, _ = predictions(cut)
                    span_start = int(masks.nonzero()[0])
                    x[span_start] = token[span_start]
                    trace.append(("refresh", list(range(cut))))
                    continue
                after = (masks & (rank == active + 1)).nonzero().flatten()
                span_end = int(after[0]) if after.numel() else total
                positions = torch.arange(total)
                span = (positions >= span_start) & (positions < span_end)
                candidates = span & masks
                count = dream_count(int(masks.sum()), step, steps)
                if step == steps - 1 and bool((masks & ~span).any()):
                    # the pipeline's rule for the last step (the reference would leave these masks)
                    attention.fresh = None
                    token, confidence = predictions(total)
                    x[masks] = token[masks]
                    trace.append(("full", list(range(total))))
                    continue
                assert span_end <= cut, (
                    "the span left the refresh prefix: pick a config within the constraint"
                )
                attention.fresh = span[:cut]
                token, confidence = predictions(cut)
                order = sorted(candidates.nonzero().flatten().tolist(), key=lambda p: -float(confidence[p]))
                for p in order[:count]:
                    x[p] = token[p]
                trace.append(("pruned", span.nonzero().flatten().tolist()))
    finally:
        model.set_attn_implementation(saved)
        attention.fresh = None
    return x, trace


CASES = {  # gen_length, steps, window, active, refresh_cycle
    "one-token-per-step": (40, 40, 20, 6, 8),
    "reference-shape": (48, 48, 24, 5, 12),
    "two-tokens-per-step": (36, 18, 20, 4, 6),
}


@pytest.mark.parametrize("shift", [True, False], ids=["logit-shift", "no-shift"])
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_the_slow_statement_of_the_dream_rules(case, shift):
    gen_length, steps, window, active, refresh_cycle = CASES[case]
    pipe = tiny_qwen2()
    prompt = prompt_rows()[0]
    cfg = WindowDiffusionConfig(window=window, active=active, refresh_cycle=refresh_cycle, sliding=True)
    kw = dict(gen_length=gen_length, steps=steps, logits_shift=shift, progress=False)
    got = pipe(input_ids=prompt[None], acceleration=[cfg], **kw)
    want, trace = reference_dream_window(
        pipe, prompt, gen_length=gen_length, steps=steps, window=window, active=active,
        refresh_cycle=refresh_cycle, shift=shift,
    )  # fmt: skip
    assert got.sequences[0].tolist() == want.tolist()
    assert not (want == MASK).any()
    # the same positions were recomputed at every step (the refresh prefix, then each pruned span)
    assert [("refresh" if t["refresh"] else "pruned") for t in got.window_trace] == [k for k, _ in trace]
    for entry, (kind, positions) in zip(got.window_trace, trace):
        assert entry["active"].tolist() == positions, (entry["step"], kind)
    # the statement really prunes: every span is shorter than the prefix it attends to
    prefix = 0
    for kind, positions in trace:
        prefix = len(positions) if kind == "refresh" else prefix
        assert kind == "refresh" or len(positions) < prefix
    # ... and it is not dense decoding in disguise
    dense = pipe(input_ids=prompt[None], **kw)
    assert dense.sequences[0].tolist() != want.tolist()


def test_the_statement_fails_on_a_perturbed_rule():
    """The check has teeth: recomputing one position fewer per span changes the tokens."""
    gen_length, steps, window, active, refresh_cycle = CASES["one-token-per-step"]
    pipe = tiny_qwen2()
    prompt = prompt_rows()[0]
    kw = dict(gen_length=gen_length, steps=steps, window=window, refresh_cycle=refresh_cycle, shift=True)
    want, _ = reference_dream_window(pipe, prompt, active=active, **kw)
    other, _ = reference_dream_window(pipe, prompt, active=active - 3, **kw)
    assert want.tolist() != other.tolist()


@pytest.mark.parametrize("shift", [True, False], ids=["logit-shift", "no-shift"])
def test_batch_of_two_with_left_padding_equals_rows_alone_and_the_statement(shift):
    gen_length, steps, window, active, refresh_cycle = CASES["one-token-per-step"]
    pipe = tiny_qwen2(seed=1)
    rows = prompt_rows((11, 6), seed=5)
    ids, attn = left_padded(rows)
    width = ids.shape[1]
    cfg = WindowDiffusionConfig(window=window, active=active, refresh_cycle=refresh_cycle, sliding=True)
    kw = dict(gen_length=gen_length, steps=steps, logits_shift=shift, acceleration=[cfg], progress=False)
    batch = pipe(input_ids=ids, attention_mask=attn, **kw)
    for b, row in enumerate(rows):
        alone = pipe(input_ids=row[None], **kw)
        assert batch.sequences[b, width:].tolist() == alone.sequences[0, row.numel() :].tolist()
        want, _ = reference_dream_window(
            pipe, row, gen_length=gen_length, steps=steps, window=window, active=active,
            refresh_cycle=refresh_cycle, shift=shift,
        )  # fmt: skip
        assert alone.sequences[0].tolist() == want.tolist()


# ------------------------------------------------------------------------------------------- SparseD on
# Dream-rule refreshes: the refresh prefix grows every phase, so SparseD's one pattern (computed at the last
# dense refresh) is reused on longer calls: tiles it saw keep its decision, tiles of blocks it never saw
# (partial or absent then) are computed densely. Checked against sparsed_naive (the plain-PyTorch SparseD).


def naive_pattern_for_length(mask0: torch.Tensor, seen_tokens: int, num_tokens: int, bs: int) -> torch.Tensor:
    """The reuse rule written out tile by tile."""
    b, h = mask0.shape[:2]
    nb, nb0 = -(-num_tokens // bs), -(-seen_tokens // bs)
    out = torch.ones(b, h, nb, nb, dtype=torch.bool)

    def seen(block):
        positions = range(block * bs, min((block + 1) * bs, num_tokens))
        return block < nb0 and all(p < seen_tokens and p // bs == block for p in positions)

    for i in range(nb):
        for j in range(nb):
            if seen(i) and seen(j):
                out[:, :, i, j] = mask0[:, :, i, j]
    return out


def naive_block_attention(q, k, v, mask, bs, valid):
    """fp64 attention of each query block over the keys of its kept blocks (padded keys excluded)."""
    b, h, n, _ = q.shape
    out = torch.zeros(b, h, n, q.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(-(-n // bs)):
                allowed = torch.zeros(n, dtype=torch.bool)
                for j in range(mask.shape[-1]):
                    if mask[bi, hi, i, j]:
                        allowed[j * bs : (j + 1) * bs] = True
                allowed &= valid[bi]
                rows = slice(i * bs, min(n, (i + 1) * bs))
                scores = q[bi, hi, rows].double() @ k[bi, hi, allowed].double().T * q.shape[-1] ** -0.5
                out[bi, hi, rows] = torch.softmax(scores, -1) @ v[bi, hi, allowed].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [100, 60, 70])
def test_sparsed_pattern_reused_on_another_length_matches_naive(dtype, num_tokens):
    from fastgen.attention.sparsed import compute_sparsed_pattern, sparsed_attention
    from fastgen.attention.sparsed_naive import sparsed_naive
    from tests.helpers import rel_rmse

    torch.manual_seed(0)
    bs, seen_tokens, prompt_end = 16, 70, 23
    valid0 = torch.ones(2, seen_tokens, dtype=torch.bool)
    valid0[1, :9] = False  # left padding in row 1
    q0, k0, v0 = (torch.randn(2, 2, seen_tokens, 16) for _ in range(3))
    pattern = compute_sparsed_pattern(
        q0, k0, select=0.4, block_size=bs, key_padding_mask=valid0, prompt_end=prompt_end
    )
    _, mask0 = sparsed_naive(
        q0, k0, v0, select=0.4, block_size=bs, key_padding_mask=valid0, prompt_end=prompt_end
    )
    assert torch.equal(pattern.block_mask, mask0)
    mask = pattern.for_length(num_tokens)
    want_mask = naive_pattern_for_length(mask0, seen_tokens, num_tokens, bs)
    assert torch.equal(mask, want_mask)
    assert 0 < mask.float().mean() < 1  # some tiles sparse, some dense
    valid = torch.ones(2, num_tokens, dtype=torch.bool)
    valid[1, :9] = False
    q, k, v = (torch.randn(2, 2, num_tokens, 16).to(dtype) for _ in range(3))
    got = sparsed_attention(q, k, v, mask, bs, key_padding_mask=valid)
    want = naive_block_attention(q, k, v, want_mask, bs, valid)
    assert rel_rmse(got[1, :, 9:], want[1, :, 9:]) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_rmse(got[0], want[0]) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="num_tokens"):
        pattern.for_length(0)


def test_sparsed_runs_sparse_on_dream_rule_refreshes_with_the_naive_pattern(monkeypatch):
    from fastgen import SparseDConfig
    from fastgen.attention.sparsed_naive import sparsed_naive
    from fastgen.processors.transformers_lm import sparsed as transformers_lm

    pipe = tiny_qwen2()
    prompt = prompt_rows((21,))[0]
    calls, patterns = [], []
    real_attention, real_pattern = transformers_lm.sparsed_attention, transformers_lm.compute_sparsed_pattern

    def recording_attention(q, k, v, block_mask, block_size, **kw):
        calls.append((q.shape[2], block_mask.clone()))
        return real_attention(q, k, v, block_mask, block_size, **kw)

    def recording_pattern(q, k, **kw):
        out = real_pattern(q, k, **kw)
        patterns.append((q.clone(), k.clone(), kw, out))
        return out

    monkeypatch.setattr(transformers_lm, "sparsed_attention", recording_attention)
    monkeypatch.setattr(transformers_lm, "compute_sparsed_pattern", recording_pattern)
    wd = WindowDiffusionConfig(window=20, active=6, refresh_cycle=8, sliding=True)
    kw = dict(input_ids=prompt[None], gen_length=48, steps=48, progress=False)
    out = pipe(acceleration=[wd, SparseDConfig(skip=0.2, select=0.5, block_size=16)], **kw)
    refresh_lengths = [t["keys"] for t in out.window_trace if t["refresh"]]
    assert len(refresh_lengths) == 6 and len(set(refresh_lengths)) > 1  # the prefix grows
    # 6 refreshes: round(0.2 * 6) = 1 dense one computes the pattern, the 5 others x 2 layers run sparse
    assert len(patterns) == 2 and len(calls) == 10 and not (out.sequences == MASK).any()
    seen_tokens = patterns[0][0].shape[2]
    for q, k, options, pattern in patterns:
        _, naive = sparsed_naive(
            q,
            k,
            k,
            select=0.5,
            block_size=16,
            prompt_end=options["prompt_end"],
            key_padding_mask=options["key_padding_mask"],
        )
        assert torch.equal(pattern.block_mask, naive)
    layer_of_call = [0, 1] * 5
    for (length, mask), layer in zip(calls, layer_of_call):
        want = naive_pattern_for_length(patterns[layer][3].block_mask, seen_tokens, length, 16)
        assert torch.equal(mask, want)
    assert any(length != seen_tokens for length, _ in calls)
    assert any(not bool(mask.all()) for _, mask in calls)  # really sparse, not dense under another name
    # select=1 keeps every block: the same tokens as Window-Diffusion alone
    alone = pipe(acceleration=[wd], **kw)
    everything = pipe(acceleration=[wd, SparseDConfig(skip=0.2, select=1.0, block_size=16)], **kw)
    assert torch.equal(alone.sequences, everything.sequences)


def test_sparsed_on_padded_dream_rule_refreshes_keeps_the_padding(monkeypatch):
    """Dream-rule refreshes of a left-padded batch run prefixes of the sequence: SparseD takes their key
    padding from the pipeline's declared mask (its first ``n`` positions), so with ``select=1`` the
    tokens are those of Window-Diffusion alone, and a sparse pattern still decodes every mask."""
    from fastgen import SparseDConfig
    from fastgen.processors.transformers_lm import sparsed as transformers_lm

    calls = []
    real = transformers_lm.sparsed_attention
    monkeypatch.setattr(
        transformers_lm,
        "sparsed_attention",
        lambda q, *a, **k: calls.append((q.shape[2], k["key_padding_mask"])) or real(q, *a, **k),
    )
    pipe = tiny_qwen2(seed=1)
    rows = prompt_rows((21, 9), seed=7)
    ids, attn = left_padded(rows)
    width = ids.shape[1]
    wd = WindowDiffusionConfig(window=20, active=6, refresh_cycle=8, sliding=True)
    kw = dict(input_ids=ids, attention_mask=attn, gen_length=48, steps=48, progress=False)
    alone = pipe(acceleration=[wd], **kw)
    everything = pipe(acceleration=[wd, SparseDConfig(skip=0.2, select=1.0, block_size=16)], **kw)
    assert calls  # the refreshes after the warm-up ran sparse, on prefixes of several lengths,
    assert len({n for n, _ in calls}) > 1  # each with the first n declared positions as its padding
    key_valid = torch.cat([attn.bool(), torch.ones(len(rows), 48, dtype=torch.bool)], dim=1)
    assert all(torch.equal(padding, key_valid[:, :n]) for n, padding in calls)
    assert torch.equal(alone.sequences, everything.sequences)
    sparse = pipe(acceleration=[wd, SparseDConfig(skip=0.2, select=0.3, block_size=16)], **kw)
    assert not (sparse.sequences[:, width:] == MASK).any()
