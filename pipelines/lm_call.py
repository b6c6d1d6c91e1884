"""The checks of one :class:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline` call, all run before any
model call: the prompt rows, the ``acceleration=`` configs (Window-Diffusion's apart), the sampler and its
options, the schedule (``gen_length`` / ``steps`` / ``block_length``, Window-Diffusion's rules) and the
rest of the call, resolved into one :class:`LMCall`. Each raises one ``ValueError`` naming the parameter,
its value and what is allowed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen._validation import check_choice, check_int, check_number
from fastgen.attention.window_rules import check_window_schedule
from fastgen.configs import WindowDiffusionConfig
from fastgen.processors import transformers_lm as lm_adapter

from .lm_family import model_family
from .lm_sampler import DREAM_ALGS, REMASKING, SAMPLERS, SamplerOptions


@dataclass
class LMCall:
    """One call's checked options (everything
    :meth:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline.__call__` resolved before any work)."""

    rows: list[list[int]]
    prompt_length: int
    gen_length: int
    steps: int
    block_length: int
    options: SamplerOptions
    cfg_scale: float
    logits_shift: bool
    eos_ids: list[int]
    window: WindowDiffusionConfig | None


def prompt_rows(pipe, prompt, input_ids, attention_mask) -> list[list[int]]:
    """The real tokens of each prompt (``prompt`` strings through ``pipe.tokenizer``, or the rows of
    ``input_ids`` without the positions ``attention_mask`` marks as padding, on either side)."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt= (strings) or input_ids= (token ids)")
    if prompt is not None:
        if pipe.tokenizer is None:
            raise ValueError("prompt= needs a tokenizer; pass tokenizer= to the pipeline or use input_ids=")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        return [list(pipe.tokenizer(p)["input_ids"]) for p in prompts]
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [L] or [B, L], got shape {tuple(ids.shape)}")
    if attention_mask is None:
        keep = torch.ones_like(ids, dtype=torch.bool)
    else:
        keep = torch.as_tensor(attention_mask).reshape(ids.shape).bool()
    # padding may be on either side: keep the real tokens of each row, re-pad on the left below
    return [row[k].tolist() for row, k in zip(ids.cpu(), keep.cpu())]


def resolve_acceleration(pipe, acceleration) -> tuple[list, WindowDiffusionConfig | None]:
    """The configs to apply for this call (Window-Diffusion's apart) and the resolved window config
    (the call's, else the one recorded on the model by ``apply_sparse_attention``)."""
    configs = list(acceleration) if isinstance(acceleration, (list, tuple)) else [acceleration]
    configs = [c for c in configs if c is not None]
    seen: dict[type, int] = {}
    for config in configs:
        seen[type(config)] = seen.get(type(config), 0) + 1
    for kind, count in seen.items():
        if count > 1:
            raise ValueError(
                f"acceleration holds {count} {kind.__name__}; allowed: at most one config per method"
            )
    window_configs = [c for c in configs if isinstance(c, WindowDiffusionConfig)]
    configs = [c for c in configs if not isinstance(c, WindowDiffusionConfig)]
    window = window_configs[0] if window_configs else lm_adapter.window_config(pipe.model)
    if window is not None:
        window = window.resolved(model_family(pipe.model))
        if not pipe._takes_position_ids:
            raise ValueError(
                f"Window-Diffusion needs a model whose forward takes position_ids (the active tokens run "
                f"at their absolute positions); model={type(pipe.model).__name__} does not; allowed: "
                "transformers models using AttentionInterface (LlamaForCausalLM, Qwen2ForCausalLM, ...)"
            )
    return configs, window


def resolve_sampler(
    pipe, sampler, remasking, temperature, confidence_threshold, alg, alg_temp, top_p, top_k
) -> SamplerOptions:
    """The sampler and its options, checked: Dream's options only with Dream's sampler, ``remasking``
    only with LLaDA's."""
    family = model_family(pipe.model)
    if sampler is None:
        sampler = "dream" if family == "dream" else "llada"
    check_choice("sampler", sampler, SAMPLERS)
    what = f"a {family!r} checkpoint" if family else "this model"
    if sampler != "dream":
        for name, value in {"alg": alg, "alg_temp": alg_temp, "top_p": top_p, "top_k": top_k}.items():
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} is an option of Dream's sampler, but {what} uses sampler="
                    f"{sampler!r}; allowed: {name}=None, or pass sampler='dream'"
                )
        remasking = "low_confidence" if remasking is None else remasking
        check_choice("remasking", remasking, REMASKING)
    else:
        if remasking is not None:
            raise ValueError(
                f"remasking={remasking!r} is an option of LLaDA's sampler, but {what} uses sampler='dream', "
                "whose confidence is alg=; allowed: remasking=None (and alg= one of "
                f"{', '.join(DREAM_ALGS)}), or pass sampler='llada'"
            )
        alg = "entropy" if alg is None else alg
        check_choice("alg", alg, DREAM_ALGS)
        if alg_temp is not None:
            check_number("alg_temp", alg_temp, 0.0, math.inf, high_open=True)
        if top_p is not None:
            check_number("top_p", top_p, 0.0, 1.0, low_open=True)
        if top_k is not None:
            check_int("top_k", top_k, 1)
    check_number("temperature", temperature, 0.0, math.inf, high_open=True)
    if confidence_threshold is not None:
        check_number("confidence_threshold", confidence_threshold, 0.0, 1.0, low_open=True)
    return SamplerOptions(
        sampler=sampler,
        mask_token_id=pipe.mask_token_id,
        remasking=remasking or "low_confidence",
        temperature=float(temperature),
        confidence_threshold=confidence_threshold,
        alg=alg,
        alg_temp=alg_temp,
        top_p=top_p,
        top_k=top_k,
    )


def resolve_schedule(gen_length, steps, block_length, window, sampler) -> tuple[int, int, int]:
    """``(gen_length, steps, block_length)`` checked against each other and Window-Diffusion's rules."""
    check_int("gen_length", gen_length, 1)
    check_int("steps", steps, 1)
    if steps > gen_length:
        raise ValueError(
            f"steps={steps} is more than gen_length={gen_length}; every step commits at least one token, "
            f"so at most gen_length steps run; allowed: 1 <= steps <= {gen_length}"
        )
    if block_length is None:
        block_length = gen_length if (window is not None or sampler == "dream") else 32
    check_int("block_length", block_length, 1)
    if gen_length % block_length:
        raise ValueError(
            f"block_length={block_length} must divide gen_length={gen_length} (allowed: divisors of gen_length)"
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps={steps} must be a multiple of the number of blocks gen_length/block_length={num_blocks}"
        )
    if window is not None:
        check_window_schedule(window, gen_length, steps, block_length)
    return gen_length, steps, block_length


def resolve_call(pipe, rows, schedule, options, window, cfg_scale, logits_shift, eos_token_id) -> LMCall:
    """The checked plan of one call (prompt length against the model's positions, the logit shift)."""
    gen_length, steps, block_length = schedule
    prompt_length = max(len(r) for r in rows)
    total = prompt_length + gen_length
    limit = pipe.max_positions
    if limit is not None and total > limit:
        raise ValueError(
            f"gen_length={gen_length} plus the prompt ({prompt_length} tokens) = {total} exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    if logits_shift is None:
        logits_shift = model_family(pipe.model) == "dream"
    if logits_shift and prompt_length == 0:
        raise ValueError("logits_shift=True needs a prompt of at least one token")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return LMCall(
        rows=rows,
        prompt_length=prompt_length,
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        options=options,
        cfg_scale=float(cfg_scale),
        logits_shift=bool(logits_shift),
        eos_ids=eos_ids,
        window=window,
    )


__all__ = [
    "LMCall",
    "prompt_rows",
    "resolve_acceleration",
    "resolve_call",
    "resolve_sampler",
    "resolve_schedule",
]
