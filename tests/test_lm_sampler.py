"""The diffusion-LM sampler's commit decision (pipelines/lm_sampler.py) against confidences computed here
from the probabilities: each LLaDA ``remasking`` mode and Dream ``alg`` commits the candidates its own
measure ranks first (the pipeline tests only check that every mask gets resolved)."""

from __future__ import annotations

import pytest
import torch
from fastgen.pipelines.lm_sampler import SamplerOptions, decide

# 4 candidate positions over a vocabulary of 5; each row of probabilities is built so the four measures
# disagree about which position is most confident
PROBS = torch.tensor(
    [
        [0.58, 0.21, 0.21, 0.00, 0.00],  # highest top-1 (0.58); margin 0.37; entropy 0.97
        [0.55, 0.1125, 0.1125, 0.1125, 0.1125],  # top-1 0.55; highest margin (0.44); entropy 1.3
        [0.50, 0.50, 0.00, 0.00, 0.00],  # top-1 0.50; margin 0; lowest entropy (0.69)
        [0.30, 0.30, 0.40, 0.00, 0.00],  # top-1 0.40; margin 0.10; entropy 1.09
    ]
)


def _expected(measure: str) -> int:
    top2 = PROBS.topk(2, dim=-1).values
    if measure == "probability":
        score = top2[:, 0]
    elif measure == "margin":
        score = top2[:, 0] - top2[:, 1]
    else:  # entropy: the least uncertain position first
        score = (PROBS * torch.log(PROBS + 1e-10)).sum(-1)
    return int(score.argmax())


@pytest.mark.parametrize(
    ("options", "measure"),
    [
        (dict(sampler="llada", remasking="low_confidence"), "probability"),
        (dict(sampler="llada", remasking="margin"), "margin"),
        (dict(sampler="llada", remasking="entropy"), "entropy"),
        (dict(sampler="dream", alg="maskgit_plus"), "probability"),
        (dict(sampler="dream", alg="topk_margin"), "margin"),
        (dict(sampler="dream", alg="entropy"), "entropy"),
    ],
)
def test_each_confidence_commits_what_its_measure_ranks_first(options, measure):
    logits = PROBS.clamp_min(1e-9).log()[None].clone()
    candidates = torch.ones(1, 4, dtype=torch.bool)
    gens = [torch.Generator().manual_seed(0)]
    chosen, commit = decide(
        logits,
        candidates,
        torch.tensor([1]),
        torch.tensor([True]),
        SamplerOptions(mask_token_id=99, **options),
        gens,
    )
    assert commit.sum() == 1 and int(commit[0].nonzero()) == _expected(measure)
    assert chosen[0].tolist() == PROBS.argmax(-1).tolist()  # greedy tokens


def test_the_measures_disagree_on_this_input():
    """The table above separates the three measures (else the test above could not tell them apart)."""
    assert len({_expected(m) for m in ("probability", "margin", "entropy")}) == 3


def test_threshold_commits_every_candidate_above_it_and_never_the_mask_token():
    logits = PROBS.clamp_min(1e-9).log()[None].clone()
    logits[..., 0] += 10.0  # token 0 would win everywhere...
    options = SamplerOptions(sampler="llada", mask_token_id=0, confidence_threshold=0.4)
    chosen, commit = decide(
        logits, torch.ones(1, 4, dtype=torch.bool), torch.tensor([1]), torch.tensor([True]), options, [None]
    )
    assert 0 not in chosen[0].tolist()  # ...but it is the mask token: never committed
    probs = torch.softmax(logits[0].clone().index_fill_(-1, torch.tensor([0]), -float("inf")), -1)
    above = (probs.max(-1).values > 0.4).sum()
    assert int(commit.sum()) == max(1, int(above))
