"""Dream's own sampler (``sampler="dream"``): the per-step token counts and the commit order of Dream's
``diffusion_generate``, checked on a tiny Qwen2 model against the formulas written here."""

from __future__ import annotations

import pytest
import torch
from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline, dream_transfer_count

from tests.tiny_models import MASK, prompts, tiny_pipe


def dream_counts(masks: int, steps: int, eps: float = 1e-3) -> list[int]:
    """Dream's schedule as a plain loop, assuming every scheduled token is committed."""
    timesteps = torch.linspace(1, eps, steps + 1)
    out = []
    for i in range(steps):
        n = masks - sum(out)
        if i == steps - 1:
            out.append(n)
        else:
            out.append(int(n * (1 - timesteps[i + 1] / timesteps[i])))
    return out


def test_sixteen_tokens_in_eight_steps_commit_dreams_counts():
    assert dream_counts(16, 8) == [1, 2, 2, 2, 2, 2, 2, 3]
    counts, left = [], torch.tensor([16])
    for i in range(8):
        c = dream_transfer_count(left, i, 8)
        counts.append(int(c))
        left = left - c
    assert counts == [1, 2, 2, 2, 2, 2, 2, 3]


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_greedy_counts_and_commit_order_follow_the_formulas(alg):
    pipe = tiny_pipe("dream")
    ids, _ = prompts(1)
    history = []
    out = pipe(input_ids=ids, gen_length=16, steps=8, alg=alg, progress=False,
               callback=lambda s, seq: history.append(seq))  # fmt: skip
    plen = out.prompt_length
    previous = torch.cat([ids, torch.full((1, 16), MASK)], 1)
    counts = []
    for seq in history:
        masks = previous[0] == MASK
        changed = (seq[0] != previous[0]).nonzero().flatten().tolist()
        counts.append(len(changed))
        # the formula: one full forward, logits shifted right by one, confidence of alg, top count
        with torch.no_grad():
            n = previous.shape[1]
            full = torch.zeros(1, 1, n, n)  # bidirectional: every key visible
            logits = pipe.model(
                input_ids=previous, attention_mask=full, position_ids=torch.arange(n)[None]
            ).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)[0].float()
        logits[:, MASK] = float("-inf")
        probs = torch.softmax(logits, -1)
        top, token = probs.max(-1)
        if alg == "topk_margin":
            two = probs.topk(2, -1).values
            confidence = two[:, 0] - two[:, 1]
        elif alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        else:
            confidence = top
        confidence = confidence.masked_fill(~masks, float("-inf"))
        expected = confidence.topk(len(changed)).indices.tolist() if changed else []
        assert sorted(changed) == sorted(expected)
        assert all(seq[0, p] == token[p] for p in changed)
        assert all(p >= plen for p in changed)
        previous = seq
    assert counts == [1, 2, 2, 2, 2, 2, 2, 3]
    assert not (out.sequences == MASK).any()


def test_default_for_dream_and_selectable_for_any_model():
    dream = tiny_pipe("dream")
    llada = tiny_pipe("llada")
    ids, _ = prompts(1)
    steps_seen = []
    dream(input_ids=ids, gen_length=16, steps=8, progress=False, callback=lambda s, q: steps_seen.append(q))
    assert (steps_seen[0] != MASK).sum() - (ids != 0).sum() <= 1  # Dream's first step commits 1 of 16
    got = llada(input_ids=ids, gen_length=16, steps=8, sampler="dream", logits_shift=False, progress=False)
    again = llada(input_ids=ids, gen_length=16, steps=8, sampler="dream", logits_shift=False, progress=False)
    assert torch.equal(got.sequences, again.sequences) and not (got.sequences == MASK).any()
    with pytest.raises(ValueError, match="alg_temp.*sampler"):
        llada(input_ids=ids, gen_length=16, steps=8, alg_temp=0.5, progress=False)
    with pytest.raises(ValueError, match="sampler='mdlm'"):
        llada(input_ids=ids, gen_length=16, steps=8, sampler="mdlm", progress=False)
    with pytest.raises(ValueError, match="alg='greedy'"):
        dream(input_ids=ids, gen_length=16, steps=8, alg="greedy", progress=False)
    with pytest.raises(ValueError, match="top_p"):
        dream(input_ids=ids, gen_length=16, steps=8, top_p=1.5, progress=False)


@pytest.mark.parametrize(
    "options",
    [dict(alg="origin"), dict(alg="entropy", alg_temp=0.3), dict(temperature=0.8, top_p=0.9),
     dict(temperature=1.0, top_k=5, alg="maskgit_plus")],
)  # fmt: skip
def test_sampling_options_are_seeded_per_row(options):
    pipe = tiny_pipe("dream")
    ids, attn = prompts(2)
    kw = dict(gen_length=16, steps=8, progress=False, **options)
    a = pipe(input_ids=ids, attention_mask=attn, generator=3, **kw)
    b = pipe(input_ids=ids, attention_mask=attn, generator=3, **kw)
    assert torch.equal(a.sequences, b.sequences) and not (a.sequences == MASK).any()
    alone = pipe(input_ids=ids[1][attn[1].bool()], generator=4, **kw)
    assert a.sequences[1, -16:].tolist() == alone.sequences[0, -16:].tolist()


def test_window_diffusion_on_dream_uses_dreams_schedule():
    pipe = tiny_pipe("dream")
    assert isinstance(pipe, DiffusionLMPipeline)
    ids, _ = prompts(1)
    from fastgen import WindowDiffusionConfig

    out = pipe(input_ids=ids, gen_length=32, steps=32, progress=False,
               acceleration=[WindowDiffusionConfig(window=24, active=4, refresh_cycle=8)])  # fmt: skip
    assert not (out.sequences == MASK).any()
    assert out.window_trace[0]["refresh"] and not out.window_trace[1]["refresh"]
