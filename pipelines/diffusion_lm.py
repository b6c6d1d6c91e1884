"""Masked-diffusion language-model generation (LLaDA style, with Dream's options).

Implements the sampler of LLaDA (Nie et al., 2025, "Large Language Diffusion Models"): the prompt is
followed by ``gen_length`` mask tokens split into semi-autoregressive blocks of ``block_length``; the
``steps`` are spread evenly over the blocks; each step predicts every mask, scores the predictions
(``remasking``) and commits the most confident ones inside the current block. Dream (Ye et al., 2025)
adds the right shift of logits and the entropy / margin confidences.

What this pipeline adds to the reference code:

- batches of prompts of different lengths (left padding, a padding-aware bidirectional 4D mask and
  position ids that start at 0 on each row's first real token);
- per-row randomness (row ``b`` uses seed ``seed + b``), so a row in a batch gives exactly the tokens it
  gives alone with that seed;
- classifier-free guidance as ONE batched forward per step (conditional rows, then unconditional rows);
- hooks for SparseD (``acceleration=[SparseDConfig()]``) and a step counter for the attention function.

The 4D mask handed to the model is additive float ``[B, 1, L, L]`` in the model dtype (0 = attend,
``finfo.min`` = padding key); it is an expanded view of ``[B, 1, 1, L]`` (stride 0 along queries), so it
costs O(B·L) memory. transformers passes a 4D mask through unchanged, so native ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` run bidirectionally with the eager and SDPA attention implementations.

Example:
    >>> from fastgen import SparseDConfig
    >>> from fastgen.pipelines import load_preset
    >>> pipe = load_preset("tiny-llada")
    >>> out = pipe(prompt="Hello", gen_length=64, steps=16, block_length=32,
    ...            acceleration=[SparseDConfig(block_size=32)])
    >>> out.texts[0]
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REMASKING = ("low_confidence", "random", "entropy", "margin")
"""Allowed ``remasking`` (confidence) strategies."""

KNOWN_MASK_TOKEN_IDS = {"llada": 126336, "dream": 151666}
"""Mask token id per model family (LLaDA-8B / LLaDA-1.5: 126336; Dream-v0-7B: 151666)."""


@dataclass
class DiffusionLMOutput:
    """Result of :class:`DiffusionLMPipeline`."""

    sequences: torch.LongTensor
    """``[B, P + gen_length]``: left-padded prompts followed by the generated tokens."""
    texts: list[str] | None
    """Decoded generated part per row (cut at the first EOS) when the pipeline has a tokenizer."""
    steps_run: int
    """Denoising steps actually run (fewer than ``steps`` after a threshold or EOS early stop)."""
    nfe: int
    """Network function evaluations per row (a CFG step counts 2: conditional + unconditional)."""
    prompt_length: int = 0
    """``P``: padded prompt length; the generated part is ``sequences[:, P:]``."""


def model_family(model) -> str | None:
    """``"llada"``, ``"dream"`` or ``None`` from the model config (``fastgen_family``, ``model_type``)."""
    config = getattr(model, "config", None)
    family = getattr(config, "fastgen_family", None)
    if family:
        return str(family).lower()
    model_type = str(getattr(config, "model_type", "") or "").lower()
    architectures = [a.lower() for a in (getattr(config, "architectures", None) or [])]
    if model_type == "llada" or any("llada" in a for a in architectures):
        return "llada"
    if model_type == "dream" or any("dream" in a for a in architectures):
        return "dream"
    return None


def resolve_mask_token_id(model, tokenizer=None) -> int:
    """The mask token id: ``config.fastgen_mask_token_id``, ``config.mask_token_id``, the family default,
    or the tokenizer's mask token; ``ValueError`` if none is known."""
    config = getattr(model, "config", None)
    for name in ("fastgen_mask_token_id", "mask_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    family = model_family(model)
    if family in KNOWN_MASK_TOKEN_IDS:
        return KNOWN_MASK_TOKEN_IDS[family]
    value = getattr(tokenizer, "mask_token_id", None)
    if isinstance(value, int):
        return value
    raise ValueError(
        f"mask_token_id=None and it cannot be inferred for model={type(model).__name__}; pass the id of the "
        f"mask token (known families: {KNOWN_MASK_TOKEN_IDS})"
    )


def num_transfer_tokens(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens committed at each of ``steps`` steps for ``mask_count`` masks per row: ``[B] -> [B, steps]``.

    As LLaDA's ``get_num_transfer_tokens``: ``mask_count // steps`` each step, the remainder spread one
    by one over the first steps.
    """
    base = mask_count // steps
    remainder = mask_count % steps
    step_index = torch.arange(steps, device=mask_count.device)
    return base[:, None] + (step_index[None, :] < remainder[:, None]).long()


def bidirectional_mask(key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive full mask ``[B, 1, L, L]`` (0 attend, ``finfo.min`` padding key) from ``key_valid [B, L]``.

    Returned as an expanded (stride-0 along queries) view, so it costs O(B·L) memory.
    """
    b, n = key_valid.shape
    row = torch.zeros(b, 1, 1, n, dtype=dtype, device=key_valid.device)
    row.masked_fill_(~key_valid[:, None, None, :], torch.finfo(dtype).min)
    return row.expand(b, 1, n, n)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _lm_processor_module(model):
    """``fastgen.processors.transformers_lm`` when ``model`` has fastgen attention applied and the module
    offers the generation hooks; else ``None``."""
    if getattr(model, "_fastgen_adapter", None) is None:
        return None
    try:
        module = importlib.import_module("fastgen.processors.transformers_lm")
    except ModuleNotFoundError:
        return None
    if not all(hasattr(module, f) for f in ("begin_generation", "set_step", "end_generation")):
        return None
    return module


class DiffusionLMPipeline:
    """Generate text with a masked-diffusion LM (LLaDA, Dream, or any transformers model returning logits).

    Args:
        model: a transformers model whose output has ``.logits`` ``[B, L, V]``. Models whose ``forward``
            takes ``position_ids`` (native ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, Dream) get the
            bidirectional 4D mask and left-padding-aware position ids; others get the 2D padding mask.
        tokenizer: optional; needed for ``prompt=`` strings and ``.texts``.
        mask_token_id: id of the mask token; inferred from the config / family / tokenizer when ``None``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, mask_token_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = (
            int(mask_token_id) if mask_token_id is not None else resolve_mask_token_id(model, tokenizer)
        )
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_logits_to_keep = "logits_to_keep" in params
        self._takes_use_cache = "use_cache" in params

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model parameters."""
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    @property
    def max_positions(self) -> int | None:
        """Longest sequence the model takes (``max_position_embeddings`` / ``max_sequence_length``)."""
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    # ---------------------------------------------------------------- inputs
    def _prompt_rows(self, prompt, input_ids, attention_mask) -> list[list[int]]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt= (strings) or input_ids= (token ids)")
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError(
                    "prompt= needs a tokenizer; pass tokenizer= to the pipeline or use input_ids="
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
            return [list(self.tokenizer(p)["input_ids"]) for p in prompts]
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(
                f"input_ids must be an integer tensor [L] or [B, L], got shape {tuple(ids.shape)}"
            )
        if attention_mask is None:
            keep = torch.ones_like(ids, dtype=torch.bool)
        else:
            keep = torch.as_tensor(attention_mask).reshape(ids.shape).bool()
        # padding may be on either side: keep the real tokens of each row, re-pad on the left below
        return [row[k].tolist() for row, k in zip(ids.cpu(), keep.cpu())]

    def _pad_id(self) -> int:
        for source in (self.tokenizer, getattr(self.model, "config", None)):
            value = getattr(source, "pad_token_id", None)
            if isinstance(value, int) and value != self.mask_token_id:
                return value
        return 0

    def _generators(self, generator, batch: int, device: torch.device) -> list[torch.Generator]:
        if generator is None:
            seeds = [int(torch.randint(0, 2**62, ()).item()) + b for b in range(batch)]
        elif isinstance(generator, torch.Generator):
            base = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device).item())
            seeds = [base + b for b in range(batch)]
        elif isinstance(generator, int) and not isinstance(generator, bool):
            seeds = [generator + b for b in range(batch)]
        elif isinstance(generator, Sequence) and len(generator) == batch:
            seeds = [int(s) for s in generator]
        else:
            raise ValueError(
                f"generator={generator!r} must be None, an int seed (row b uses seed + b), a torch.Generator "
                f"or a list of {batch} per-row seeds"
            )
        gens = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(s)
            gens.append(g)
        return gens

    # ---------------------------------------------------------------- model call
    def _logits(self, ids, attn_mask_4d, key_valid, position_ids, keep) -> torch.Tensor:
        """Logits ``[B, len(keep), V]`` of the positions ``keep`` for the sequences ``ids``."""
        kwargs = {}
        if self._takes_position_ids:
            kwargs["attention_mask"] = attn_mask_4d
            kwargs["position_ids"] = position_ids
        elif not bool(key_valid.all()):
            kwargs["attention_mask"] = key_valid.long()
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(input_ids=ids, **kwargs).logits
        if not self._takes_logits_to_keep or logits.shape[1] != keep.numel():
            logits = logits[:, keep]
        return logits.float()

    # ---------------------------------------------------------------- generation
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gen_length: int = 128,
        steps: int = 128,
        block_length: int = 32,
        remasking: str = "low_confidence",
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        confidence_threshold: float | None = None,
        logits_shift: bool | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        generator: int | torch.Generator | Sequence[int] | None = None,
        acceleration=None,
        progress: bool = True,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> DiffusionLMOutput:
        """Generate ``gen_length`` tokens after each prompt.

        Args:
            prompt: a string or list of strings (needs a tokenizer); or pass ``input_ids``.
            input_ids: ``[L]`` or ``[B, L]`` token ids; with ``attention_mask`` (1 = real token, padding
                on either side) for a padded batch.
            gen_length: tokens to generate (a multiple of ``block_length``).
            steps: denoising steps over the whole generation (a multiple of the number of blocks).
            block_length: semi-autoregressive block length; tokens are committed inside the current
                block only.
            remasking: confidence used to pick tokens to commit: ``"low_confidence"`` (probability of the
                chosen token), ``"random"``, ``"entropy"`` (minus the entropy) or ``"margin"`` (top-1 minus
                top-2 probability).
            temperature: 0 = greedy; > 0 samples with float64 Gumbel-max noise as LLaDA.
            cfg_scale: classifier-free guidance, ``un + (cfg_scale + 1)(cond - un)``; the unconditional
                branch has the prompt replaced by masks; both run in one batched forward.
            confidence_threshold: also commit every masked token of the block whose confidence exceeds
                this (at least the scheduled count, at least one); a block may end in fewer steps.
            logits_shift: shift logits right by one (Dream); ``None`` = on for the Dream family.
            eos_token_id: id(s) of EOS/EoT; once a block of a row is complete and the row holds one, the
                rest of that row is filled with it and the row stops; all rows stopped ends generation.
            generator: int seed (row ``b`` uses ``seed + b``), a list of per-row seeds, a
                ``torch.Generator`` (draws the base seed) or ``None`` (base seed from torch's global RNG).
            acceleration: a config or list of configs (e.g. ``SparseDConfig``) applied with
                ``fastgen.apply_sparse_attention`` for this call only (skipped if the model already has
                fastgen attention applied by the user).
            progress: show a tqdm bar over steps.
            callback: ``callback(step, sequences)`` after every step (``sequences`` is a copy).
        """
        _check_int("gen_length", gen_length)
        _check_int("steps", steps)
        _check_int("block_length", block_length)
        if gen_length % block_length:
            raise ValueError(
                f"block_length={block_length} must divide gen_length={gen_length} (allowed: divisors of gen_length)"
            )
        num_blocks = gen_length // block_length
        if steps % num_blocks:
            raise ValueError(
                f"steps={steps} must be a multiple of the number of blocks gen_length/block_length={num_blocks}"
            )
        if remasking not in REMASKING:
            raise ValueError(f"remasking={remasking!r} is unknown; allowed: {', '.join(REMASKING)}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
        if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg_scale={cfg_scale!r} must be a finite number >= 0")
        if confidence_threshold is not None and (
            not isinstance(confidence_threshold, (int, float)) or not math.isfinite(confidence_threshold)
        ):
            raise ValueError(f"confidence_threshold={confidence_threshold!r} must be None or a finite number")

        rows = self._prompt_rows(prompt, input_ids, attention_mask)
        prompt_length = max(len(r) for r in rows)
        total = prompt_length + gen_length
        limit = self.max_positions
        if limit is not None and total > limit:
            raise ValueError(
                f"gen_length={gen_length} plus the prompt ({prompt_length} tokens) = {total} exceeds the model's "
                f"max_position_embeddings={limit}"
            )
        if logits_shift is None:
            logits_shift = model_family(self.model) == "dream"
        if logits_shift and prompt_length == 0:
            raise ValueError("logits_shift=True needs a prompt of at least one token")
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])

        user_applied = getattr(self.model, "_fastgen_adapter", None) is not None
        configs = (
            []
            if acceleration is None
            else acceleration
            if isinstance(acceleration, (list, tuple))
            else [acceleration]
        )
        if configs and user_applied:
            logger.info("model already has fastgen attention applied; ignoring acceleration=%s", configs)
            configs = []
        import fastgen

        try:
            for config in configs:
                fastgen.apply_sparse_attention(self.model, config)
            with torch.no_grad():
                sequences, steps_run, nfe = self._generate(
                    rows,
                    prompt_length=prompt_length,
                    gen_length=gen_length,
                    steps=steps,
                    block_length=block_length,
                    remasking=remasking,
                    temperature=float(temperature),
                    cfg_scale=float(cfg_scale),
                    confidence_threshold=confidence_threshold,
                    logits_shift=bool(logits_shift),
                    eos_ids=eos_ids,
                    generator=generator,
                    progress=progress,
                    callback=callback,
                )
        finally:
            if configs:
                fastgen.remove_sparse_attention(self.model)

        texts = None
        if self.tokenizer is not None:
            stop = set(eos_ids)
            if not stop and isinstance(getattr(self.tokenizer, "eos_token_id", None), int):
                stop = {self.tokenizer.eos_token_id}
            texts = []
            for row in sequences[:, prompt_length:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return DiffusionLMOutput(
            sequences=sequences, texts=texts, steps_run=steps_run, nfe=nfe, prompt_length=prompt_length
        )

    def _generate(
        self,
        rows,
        *,
        prompt_length,
        gen_length,
        steps,
        block_length,
        remasking,
        temperature,
        cfg_scale,
        confidence_threshold,
        logits_shift,
        eos_ids,
        generator,
        progress,
        callback,
    ):
        from tqdm.auto import tqdm

        device, mask_id = self.device, self.mask_token_id
        batch, total = len(rows), prompt_length + gen_length
        x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
        key_valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        prompt_here = torch.zeros(batch, total, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            pad = prompt_length - len(row)
            x[b, :pad] = self._pad_id()
            x[b, pad:prompt_length] = torch.tensor(row, dtype=torch.long, device=device)
            key_valid[b, :pad] = False
            prompt_here[b, pad:prompt_length] = True
        # positions start at 0 on each row's first real token (as the prompt alone would have them)
        position_ids = (torch.cumsum(key_valid.long(), dim=1) - 1).clamp_min(0)
        gens = self._generators(generator, batch, device)

        use_cfg = cfg_scale > 0
        model_valid = torch.cat([key_valid, key_valid]) if use_cfg else key_valid
        model_positions = torch.cat([position_ids, position_ids]) if use_cfg else position_ids
        mask_4d = bidirectional_mask(model_valid, self.dtype) if self._takes_position_ids else None

        processor = _lm_processor_module(self.model)
        steps_per_block = steps // (gen_length // block_length)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        step = nfe = 0
        bar = tqdm(total=steps, disable=not progress, desc="diffusion-LM steps", leave=False)
        if processor is not None:
            processor.begin_generation(self.model, total_steps=steps, prompt_length=prompt_length)
        try:
            for block in range(gen_length // block_length):
                start = prompt_length + block * block_length
                end = start + block_length
                positions = torch.arange(start, end, device=device)
                keep = (positions - 1).clamp_min(0) if logits_shift else positions
                schedule = num_transfer_tokens((x[:, start:end] == mask_id).sum(1), steps_per_block)
                for i in range(steps_per_block):
                    in_block = x[:, start:end] == mask_id  # [B, bl]
                    active = in_block.any(1) & ~done
                    if not bool(active.any()):
                        break
                    if processor is not None:
                        processor.set_step(self.model, step)
                    if use_cfg:
                        unconditional = x.masked_fill(prompt_here, mask_id)
                        both = self._logits(
                            torch.cat([x, unconditional]), mask_4d, model_valid, model_positions, keep
                        )
                        cond, uncond = both[:batch], both[batch:]
                        logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
                        nfe += 2
                    else:
                        logits = self._logits(x, mask_4d, model_valid, model_positions, keep)
                        nfe += 1
                    if mask_id < logits.shape[-1]:
                        # never "commit" the mask token itself (an untrained model may predict it)
                        logits[..., mask_id] = -math.inf
                    chosen, confidence = self._predict(logits, remasking, temperature, gens, active)
                    confidence = confidence.masked_fill(~in_block, -math.inf)
                    count = torch.where(active, schedule[:, i], 0)
                    if confidence_threshold is not None:
                        above = ((confidence > confidence_threshold) & in_block).sum(1)
                        count = torch.where(
                            active, torch.maximum(torch.maximum(count, above), torch.ones_like(count)), 0
                        )
                    order = confidence.argsort(dim=1, descending=True, stable=True)
                    rank = torch.empty_like(order).scatter_(
                        1, order, torch.arange(block_length, device=device).expand_as(order)
                    )
                    commit = (rank < count[:, None]) & in_block
                    x[:, start:end] = torch.where(commit, chosen, x[:, start:end])
                    step += 1
                    bar.update(1)
                    if callback is not None:
                        callback(step - 1, x.clone())
                if eos_ids:
                    finished = (x[:, start:end] != mask_id).all(1)
                    has_eos = torch.isin(x[:, prompt_length:end], torch.tensor(eos_ids, device=device)).any(1)
                    stop = finished & has_eos & ~done
                    if bool(stop.any()):
                        rest = x[:, end:]
                        x[:, end:] = torch.where(stop[:, None] & (rest == mask_id), eos_ids[0], rest)
                        done |= stop
                    if bool(done.all()):
                        break
        finally:
            bar.close()
            if processor is not None:
                processor.end_generation(self.model)
        return x, step, nfe

    @staticmethod
    def _predict(logits, remasking, temperature, gens, active):
        """Chosen tokens ``[B, bl]`` and their confidences ``[B, bl]`` (float64) from ``logits [B, bl, V]``.

        Randomness is drawn per row from that row's generator, and only for active rows, so a row's stream
        does not depend on the other rows of the batch.
        """
        batch, length, vocab = logits.shape
        if temperature > 0:
            noisy = torch.empty(batch, length, vocab, dtype=torch.float64, device=logits.device)
            for b in range(batch):
                if bool(active[b]):
                    u = torch.rand(
                        length, vocab, generator=gens[b], dtype=torch.float64, device=logits.device
                    )
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
    "KNOWN_MASK_TOKEN_IDS",
    "REMASKING",
    "DiffusionLMOutput",
    "DiffusionLMPipeline",
    "bidirectional_mask",
    "model_family",
    "num_transfer_tokens",
    "resolve_mask_token_id",
]
