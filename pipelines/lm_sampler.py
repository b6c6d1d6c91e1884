"""The masked-diffusion LM sampler: which tokens a denoising step commits (model-agnostic).

Given the logits of the candidate (masked) positions, a step picks a token per position and a
confidence, then commits the ``count`` most confident candidates of each active row (or, with
``confidence_threshold``, every candidate above it too). Two samplers:

- LLaDA (Nie et al., 2025): linear schedule (:func:`num_transfer_tokens`), Gumbel-max sampling in
  float64, confidences ``low_confidence`` / ``random`` / ``entropy`` / ``margin`` (``remasking``);
- Dream (Ye et al., 2025): ``diffusion_generate``'s schedule (:func:`dream_transfer_count`), top-p /
  top-k filtering, confidences ``origin`` / ``maskgit_plus`` / ``topk_margin`` / ``entropy`` (``alg``).

Randomness is drawn per row from that row's generator, and only for active rows, so a row's tokens do
not depend on the other rows of the batch. :func:`cfg_combine` is the one classifier-free-guidance
combination the pipeline and the Window-Diffusion loop use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REMASKING = ("low_confidence", "random", "entropy", "margin")
"""Allowed ``remasking`` (confidence) strategies."""

SAMPLERS = ("llada", "dream")
"""Allowed ``sampler`` values: LLaDA's linear schedule or Dream's ``diffusion_generate`` schedule."""

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
"""Allowed ``alg`` (confidence) values of Dream's sampler."""

DREAM_EPS = 1e-3
"""Dream's final timestep: ``timesteps = linspace(1, eps, steps + 1)``."""


@dataclass(frozen=True)
class SamplerOptions:
    """What a step needs to decide its commits (validated by the pipeline before any work)."""

    sampler: str
    """``"llada"`` or ``"dream"``."""
    mask_token_id: int
    """Never committed as a token (an untrained model may predict it)."""
    remasking: str = "low_confidence"
    """LLaDA sampler's confidence."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples."""
    confidence_threshold: float | None = None
    """Also commit every candidate above this confidence."""
    alg: str | None = None
    """Dream sampler's confidence."""
    alg_temp: float | None = None
    """Dream: > 0 draws the committed positions from ``softmax(confidence / alg_temp)``."""
    top_p: float | None = None
    """Dream: nucleus filtering."""
    top_k: int | None = None
    """Dream: top-k filtering."""


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance as LLaDA writes it: ``un + (cfg_scale + 1) (cond - un)``."""
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def dream_transfer_count(
    mask_count: torch.Tensor, step: int, steps: int, eps: float = DREAM_EPS
) -> torch.Tensor:
    """Tokens Dream's sampler commits at ``step`` (0-based) of ``steps`` for ``mask_count [B]`` masks.

    As Dream's ``diffusion_generate``: with ``timesteps = linspace(1, eps, steps + 1)`` (float32),
    ``t = timesteps[step]``, ``s = timesteps[step + 1]``, it commits ``int(mask_count * (1 - s / t))``
    and, at the last step, every mask left. (Dream averages ``mask_count`` over the batch; here each
    row uses its own, so a row in a batch commits what it commits alone.)
    """
    if step == steps - 1:
        return mask_count.clone()
    timesteps = torch.linspace(1, eps, steps + 1, device=mask_count.device)
    t, s = timesteps[step], timesteps[step + 1]
    return (mask_count.float() * (1 - s / t)).long()


def dream_p_transfer(step: int, steps: int, eps: float = DREAM_EPS) -> float:
    """Dream's ``1 - s / t`` at ``step`` of ``steps`` (float32 timesteps, as its sampler; 1 at the last step)."""
    if step == steps - 1:
        return 1.0
    timesteps = torch.linspace(1, eps, steps + 1)
    return float(1 - timesteps[step + 1] / timesteps[step])


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens committed at each of ``steps`` steps for ``mask_count`` masks per row: ``[B] -> [B, steps]``.

    As LLaDA's ``get_num_transfer_tokens``: ``mask_count // steps`` each step, the remainder spread one
    by one over the first steps.
    """
    base = mask_count // steps
    remainder = mask_count % steps
    step_index = torch.arange(steps, device=mask_count.device)
    return base[:, None] + (step_index[None, :] < remainder[:, None]).long()


def decide(
    logits: torch.Tensor,
    candidates: torch.Tensor,
    count: torch.Tensor,
    active: torch.Tensor,
    options: SamplerOptions,
    gens: list[torch.Generator],
    *,
    p_transfer: float = 1.0,
    force: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen tokens and the commit decision ``[B, L]`` for candidate slots ``candidates [B, L]``.

    ``count [B]`` tokens are committed per active row (more with ``confidence_threshold``, at least
    one then); ``force`` marks slots committed first whatever their confidence.
    """
    if options.mask_token_id < logits.shape[-1]:
        # never "commit" the mask token itself (an untrained model may predict it)
        logits[..., options.mask_token_id] = -math.inf
    if options.sampler == "dream":
        chosen, confidence = predict_dream(logits, options, gens, active)
    else:
        chosen, confidence = predict_llada(logits, options.remasking, options.temperature, gens, active)
    confidence_threshold = options.confidence_threshold
    confidence = confidence.masked_fill(~candidates, -math.inf)
    if force is not None:
        confidence = confidence.masked_fill(force & candidates, math.inf)
    count = torch.where(active, count, 0)
    if confidence_threshold is not None:
        above = ((confidence > confidence_threshold) & candidates).sum(1)
        count = torch.where(active, torch.maximum(torch.maximum(count, above), torch.ones_like(count)), 0)
    batch, length = candidates.shape
    if options.sampler == "dream" and options.alg == "origin" and force is None:
        # Dream's "origin": every mask commits with probability 1 - s / t (1 at the last step)
        draw = torch.ones(batch, length, dtype=torch.float64, device=logits.device)
        for b in range(batch):
            if bool(active[b]):
                draw[b] = torch.rand(length, generator=gens[b], dtype=torch.float64, device=logits.device)
        commit = (draw < p_transfer) & candidates & active[:, None]
        if confidence_threshold is not None:
            commit |= (confidence > confidence_threshold) & candidates & active[:, None]
        return chosen, commit
    if options.sampler == "dream" and options.alg_temp and force is None:
        # positions drawn from softmax(confidence / alg_temp) without replacement
        commit = torch.zeros(batch, length, dtype=torch.bool, device=logits.device)
        weights = torch.softmax(confidence / options.alg_temp, dim=-1)
        for b in range(batch):
            n = int(min(int(count[b]), int(candidates[b].sum())))
            if bool(active[b]) and n > 0:
                picked = torch.multinomial(weights[b].float(), n, replacement=False, generator=gens[b])
                commit[b, picked] = True
        return chosen, commit & candidates
    order = confidence.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(length, device=logits.device).expand_as(order)
    )
    return chosen, (rank < count[:, None]) & candidates


def predict_dream(logits, options: SamplerOptions, gens, active):
    """Dream's ``sample_tokens``: chosen tokens ``[B, L]`` and confidences ``[B, L]`` (float64).

    Logits are divided by ``temperature`` (> 0), filtered by ``top_p`` / ``top_k``; greedy takes the
    most probable token, otherwise a token is drawn from each row's generator. Confidence: its
    probability (``origin`` / ``maskgit_plus``), top-1 minus top-2 probability (``topk_margin``) or
    minus the entropy (``entropy``).
    """
    temperature = options.temperature
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    top_p, top_k = options.top_p, options.top_k
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_index = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
        remove[..., 0] = False
        drop = torch.zeros_like(remove).scatter_(-1, sorted_index, remove)
        logits = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        logits = logits.masked_fill(
            logits < torch.topk(logits, k)[0][..., -1, None], torch.finfo(logits.dtype).min
        )
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        batch, length, _ = probs.shape
        chosen = probs.argmax(-1)
        for b in range(batch):
            if bool(active[b]) and length:
                chosen[b] = torch.multinomial(probs[b], 1, generator=gens[b]).squeeze(-1)
        confidence = probs.gather(-1, chosen[..., None]).squeeze(-1)
    else:
        confidence, chosen = probs.max(dim=-1)
    if options.alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif options.alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return chosen, confidence.double()


def predict_llada(logits, remasking, temperature, gens, active):
    """Chosen tokens ``[B, bl]`` and their confidences ``[B, bl]`` (float64) from ``logits [B, bl, V]``.

    Randomness is drawn per row from that row's generator, and only for active rows, so a row's stream
    does not depend on the other rows of the batch.
    """
    batch, length, vocab = logits.shape
    if temperature > 0:
        noisy = torch.empty(batch, length, vocab, dtype=torch.float64, device=logits.device)
        for b in range(batch):
            if bool(active[b]):
                u = torch.rand(length, vocab, generator=gens[b], dtype=torch.float64, device=logits.device)
                # Gumbel-max in LLaDA's form: exp(logits) / (-log u)^temperature, in float64
                noisy[b] = logits[b].double().exp() / (-torch.log(u)) ** temperature
            else:
                noisy[b] = logits[b].double()
        chosen = noisy.argmax(-1)
    else:
        chosen = logits.argmax(-1)
    if remasking == "random":
        confidence = torch.zeros(batch, length, dtype=torch.float64, device=logits.device)
        for b in range(batch):
            if bool(active[b]):
                confidence[b] = torch.rand(
                    length, generator=gens[b], dtype=torch.float64, device=logits.device
                )
        return chosen, confidence
    probs = F.softmax(logits, dim=-1)
    if remasking == "low_confidence":
        confidence = probs.gather(-1, chosen[..., None]).squeeze(-1)
    elif remasking == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    else:  # margin
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    return chosen, confidence.double()


__all__ = [
    "DREAM_ALGS",
    "DREAM_EPS",
    "REMASKING",
    "SAMPLERS",
    "SamplerOptions",
    "cfg_combine",
    "decide",
    "dream_p_transfer",
    "dream_transfer_count",
    "num_transfer_tokens",
    "predict_dream",
    "predict_llada",
]
