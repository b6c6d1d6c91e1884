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

Layout: the sampler (which tokens a step commits) is :mod:`fastgen.pipelines.lm_sampler`; the
Window-Diffusion loop is :mod:`fastgen.pipelines.lm_windowed`, its set rules
:mod:`fastgen.attention.window_rules`. This module holds the pipeline: input checks, the dense loop and
the ``acceleration=`` handling.

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

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from fastgen.pipelines.fast_dllm import fast_dllm_schedule, generate_fast_dllm, split_fast_dllm
from fastgen.pipelines.lm_call import (
    LMCall,
    prompt_rows,
    resolve_acceleration,
    resolve_call,
    resolve_sampler,
    resolve_schedule,
)
from fastgen.pipelines.lm_family import (
    KNOWN_MASK_TOKEN_IDS,
    detect_family,
    model_family,
    resolve_mask_token_id,
    vocabulary_size,
)
from fastgen.pipelines.lm_sampler import (
    DREAM_ALGS,
    DREAM_EPS,
    REMASKING,
    SAMPLERS,
    cfg_combine,
    decide,
    dream_p_transfer,
    dream_transfer_count,
    num_transfer_tokens,
)
from fastgen.pipelines.lm_windowed import GenerationRun, WindowedRun, bidirectional_mask

from fastgen import api
from fastgen._validation import check_number
from fastgen.processors import transformers_lm as lm_adapter

logger = logging.getLogger(__name__)


@dataclass
class DiffusionLMOutput:
    """Result of :class:`DiffusionLMPipeline`.

    Example:
        >>> out = pipe(prompt="Explain sparse attention.", gen_length=64, steps=64)
        >>> out.texts[0]  # the generated text (with a tokenizer)
        >>> generated_ids = out.sequences[:, out.prompt_length :]
    """

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
    window_trace: list[dict] | None = None
    """Window-Diffusion only: one dict per step (``step``, ``refresh``, ``queries`` and ``keys`` = rows run
    and keys attended per row (max over rows), ``active`` / ``window`` = batch row 0's positions, CPU)."""


@dataclass
class _Loop:
    """The mutable state of one denoising loop."""

    run: GenerationRun
    call: LMCall
    processor: object
    windowed: WindowedRun | None
    steps_per_block: int
    done: torch.Tensor
    step: int = 0
    nfe: int = 0
    bar: object = None
    callback: Callable | None = field(default=None)


class DiffusionLMPipeline:
    """Generate text with a masked-diffusion LM (LLaDA, Dream, or any transformers model returning logits).

    Args:
        model: a transformers model whose output has ``.logits`` ``[B, L, V]``. Models whose ``forward``
            takes ``position_ids`` (native ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, Dream) get the
            bidirectional 4D mask and left-padding-aware position ids; others get the 2D padding mask.
        tokenizer: optional; needed for ``prompt=`` strings and ``.texts``.
        mask_token_id: id of the mask token; inferred from the config / family / tokenizer when ``None``.

    Example:
        >>> import torch
        >>> from fastgen import SparseDConfig, WindowDiffusionConfig
        >>> from fastgen.pipelines import DiffusionLMPipeline
        >>> from fastgen.pipelines.lm_loaders import load_diffusion_lm
        >>> model, tokenizer, mask_id = load_diffusion_lm(
        ...     "GSAI-ML/LLaDA-8B-Instruct", device="cuda", dtype=torch.bfloat16
        ... )
        >>> pipe = DiffusionLMPipeline(model, tokenizer, mask_token_id=mask_id)
        >>> out = pipe(
        ...     prompt="Explain sparse attention in one paragraph.",
        ...     gen_length=256,
        ...     steps=256,
        ...     acceleration=[WindowDiffusionConfig(), SparseDConfig()],
        ... )
        >>> print(out.texts[0])
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, mask_token_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = (
            int(mask_token_id) if mask_token_id is not None else resolve_mask_token_id(model, tokenizer)
        )
        vocab = vocabulary_size(model)
        if vocab is not None and not 0 <= self.mask_token_id < vocab:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} is outside the model's vocabulary of {vocab} tokens; "
                f"allowed: 0 <= mask_token_id < {vocab}"
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
        block_length: int | None = None,
        remasking: str | None = None,
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        confidence_threshold: float | None = None,
        logits_shift: bool | None = None,
        sampler: str | None = None,
        alg: str | None = None,
        alg_temp: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
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
            steps: denoising steps over the whole generation (a multiple of the number of blocks, at
                most ``gen_length``: a step commits at least one token).
            block_length: semi-autoregressive block length; tokens are committed inside the current
                block only. ``None``: ``gen_length`` (one block) with Window-Diffusion or Dream's sampler
                (neither has blocks in its reference), else 32. With Window-Diffusion and
                ``block_length < gen_length`` the active and window sets stay inside the current block
                (later blocks are far field) and every block starts with a refresh step.
            remasking: LLaDA sampler's confidence used to pick tokens to commit: ``"low_confidence"``
                (probability of the chosen token; the default, ``None``), ``"random"``, ``"entropy"``
                (minus the entropy) or ``"margin"`` (top-1 minus top-2 probability). Dream's sampler
                has ``alg`` instead: ``remasking`` with ``sampler="dream"`` is an error.
            temperature: 0 = greedy; > 0 samples with float64 Gumbel-max noise as LLaDA.
            cfg_scale: classifier-free guidance, ``un + (cfg_scale + 1)(cond - un)``; the unconditional
                branch has the prompt replaced by masks; both run in one batched forward.
            confidence_threshold: also commit every masked token of the block whose confidence exceeds
                this, in (0, 1] (at least the scheduled count, at least one); a block may end in fewer
                steps.
            logits_shift: shift logits right by one (Dream); ``None`` = on for the Dream family.
            sampler: ``"llada"`` (linear schedule, ``remasking``, Gumbel-max sampling) or ``"dream"`` (Dream's
                ``diffusion_generate``: ``int(n_masked * (1 - s / t))`` tokens per step on the timesteps
                ``linspace(1, 1e-3, steps + 1)`` of each block, ``alg`` confidences); ``None`` = Dream's for
                the Dream family, LLaDA's otherwise.
            alg: Dream's confidence: ``"origin"`` (each mask commits with probability ``1 - s / t``),
                ``"maskgit_plus"`` (probability), ``"topk_margin"`` (top-1 minus top-2) or ``"entropy"``
                (minus the entropy; the default, as Dream's published settings).
            alg_temp: Dream: > 0 draws the committed positions from ``softmax(confidence / alg_temp)``
                instead of taking the most confident.
            top_p: Dream: nucleus filtering of the logits before sampling, in (0, 1].
            top_k: Dream: keep the ``top_k`` largest logits before sampling.
            eos_token_id: id(s) of EOS/EoT; once a block of a row is complete and the row holds one, the
                rest of that row is filled with it and the row stops; all rows stopped ends generation.
            generator: int seed (row ``b`` uses ``seed + b``), a list of per-row seeds, a
                ``torch.Generator`` (draws the base seed) or ``None`` (base seed from torch's global RNG).
            acceleration: a config or list of configs (e.g. ``SparseDConfig``) applied with
                ``fastgen.apply_sparse_attention`` for this call only (skipped if the model already has
                fastgen attention applied by the user). At most one config per method. A
                ``WindowDiffusionConfig`` in the list runs Window-Diffusion; ``[WindowDiffusionConfig(), SparseDConfig()]`` composes the
                two (SparseD's patterns on the refresh steps). ``None`` fields of the config take the
                model family's defaults.
            progress: show a tqdm bar over steps.
            callback: ``callback(step, sequences)`` after every step (``sequences`` is a copy).
        """
        # every check runs here, before any model call
        configs, window = resolve_acceleration(self, acceleration)
        fast_dllm, configs = split_fast_dllm(configs, window)
        if fast_dllm is not None:  # Fast-dLLM decides its own schedule and commit rule
            steps, block_length = fast_dllm_schedule(
                fast_dllm,
                gen_length=gen_length,
                block_length=block_length,
                confidence_threshold=confidence_threshold,
                cfg_scale=cfg_scale,
                remasking=remasking,
                dream_options={"alg": alg, "alg_temp": alg_temp, "top_p": top_p, "top_k": top_k},
            )
        options = resolve_sampler(
            self, sampler, remasking, temperature, confidence_threshold, alg, alg_temp, top_p, top_k
        )
        schedule = resolve_schedule(gen_length, steps, block_length, window, options.sampler)
        check_number("cfg_scale", cfg_scale, 0.0, math.inf, high_open=True)
        rows = prompt_rows(self, prompt, input_ids, attention_mask)
        call = resolve_call(self, rows, schedule, options, window, cfg_scale, logits_shift, eos_token_id)
        if fast_dllm is not None:
            return self._run_fast_dllm(call, fast_dllm, generator, callback)
        return self._run_dense_loop(call, configs, generator, progress, callback)

    def _run_fast_dllm(self, call, fast_dllm, generator, callback) -> DiffusionLMOutput:
        """Generate with Fast-dLLM (:func:`~fastgen.pipelines.fast_dllm.generate_fast_dllm`)."""
        with torch.no_grad():
            sequences, steps_run, nfe = generate_fast_dllm(
                self,
                call.rows,
                fast_dllm,
                prompt_length=call.prompt_length,
                gen_length=call.gen_length,
                temperature=float(call.options.temperature),
                logits_shift=call.logits_shift,
                eos_ids=call.eos_ids,
                generator=generator,
                callback=callback,
                family=model_family(self.model),
            )
        return self._output(call, sequences, steps_run, nfe)

    def _run_dense_loop(self, call, configs, generator, progress, callback) -> DiffusionLMOutput:
        """Generate with the pipeline's own loop (:meth:`_generate`), the ``acceleration=`` configs
        applied for this call only, unless the user applied fastgen attention already."""
        if configs and getattr(self.model, api.STATE_ATTR, None) is not None:
            logger.info("model already has fastgen attention applied; ignoring acceleration=%s", configs)
            configs = []
        try:
            for config in configs:
                api.apply_sparse_attention(self.model, config)
            with torch.no_grad():
                sequences, steps_run, nfe, trace = self._generate(call, generator, progress, callback)
        finally:
            if configs:
                api.remove_sparse_attention(self.model)
        return self._output(call, sequences, steps_run, nfe, trace)

    def _output(self, call, sequences, steps_run, nfe, trace=None) -> DiffusionLMOutput:
        return DiffusionLMOutput(
            sequences=sequences,
            texts=self._texts(sequences, call),
            steps_run=steps_run,
            nfe=nfe,
            prompt_length=call.prompt_length,
            window_trace=trace,
        )

    def _texts(self, sequences: torch.Tensor, call: LMCall) -> list[str] | None:
        """Decoded generated part per row, cut at the first EOS (None without a tokenizer)."""
        if self.tokenizer is None:
            return None
        stop = set(call.eos_ids)
        if not stop and isinstance(getattr(self.tokenizer, "eos_token_id", None), int):
            stop = {self.tokenizer.eos_token_id}
        texts = []
        for row in sequences[:, call.prompt_length :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return texts

    def _prepare(
        self, rows, prompt_length: int, gen_length: int, cfg_scale: float, generator
    ) -> GenerationRun:
        """The initial sequences, masks and position ids of one generation."""
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
        use_cfg = cfg_scale > 0
        model_valid = torch.cat([key_valid, key_valid]) if use_cfg else key_valid
        model_positions = torch.cat([position_ids, position_ids]) if use_cfg else position_ids
        return GenerationRun(
            x=x,
            key_valid=key_valid,
            prompt_here=prompt_here,
            position_ids=position_ids,
            gens=self._generators(generator, batch, device),
            cfg_scale=cfg_scale,
            model_valid=model_valid,
            model_positions=model_positions,
            mask_4d=bidirectional_mask(model_valid, self.dtype) if self._takes_position_ids else None,
        )

    def _full_logits(self, run: GenerationRun, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits ``[B, len(keep), V]`` of a forward over the whole sequence (CFG combined) and its NFE."""
        x = run.x
        if run.cfg_scale > 0:
            unconditional = x.masked_fill(run.prompt_here, self.mask_token_id)
            both = self._logits(
                torch.cat([x, unconditional]), run.mask_4d, run.model_valid, run.model_positions, keep
            )
            batch = x.shape[0]
            return cfg_combine(both[:batch], both[batch:], run.cfg_scale), 2
        return self._logits(x, run.mask_4d, run.model_valid, run.model_positions, keep), 1

    def _generate(self, call: LMCall, generator, progress: bool, callback):
        """The denoising loop over blocks and steps; returns ``(sequences, steps run, NFE, trace)``."""
        from tqdm.auto import tqdm

        run = self._prepare(call.rows, call.prompt_length, call.gen_length, call.cfg_scale, generator)
        batch = run.x.shape[0]
        applied = getattr(self.model, api.STATE_ATTR, None) == lm_adapter.__name__
        processor = lm_adapter if applied else None
        num_blocks = call.gen_length // call.block_length
        steps_per_block = call.steps // num_blocks
        windowed = None
        if call.window is not None:
            windowed = WindowedRun(
                self, run, call.window, num_blocks, steps_per_block, call.logits_shift, call.options
            )
        loop = _Loop(
            run,
            call,
            processor,
            windowed,
            steps_per_block,
            torch.zeros(batch, dtype=torch.bool, device=run.x.device),
        )
        loop.bar = tqdm(total=call.steps, disable=not progress, desc="diffusion-LM steps", leave=False)
        loop.callback = callback
        if processor is not None:
            total_steps = windowed.planned_refreshes if windowed is not None else call.steps
            # the model gets the pipeline's own padding mask (run.mask_4d): declare it, so the
            # processor never reads the mask's values (no host read; traceable by torch.compile)
            declared = run.model_valid if run.mask_4d is not None else None
            processor.begin_generation(
                self.model, total_steps=total_steps, prompt_length=call.prompt_length, key_valid=declared
            )
        try:
            if windowed is not None:
                windowed.begin(processor)
            for block in range(num_blocks):
                start = call.prompt_length + block * call.block_length
                self._run_block(loop, start, start + call.block_length)
                if call.eos_ids and self._stop_at_eos(loop, start + call.block_length):
                    break
        finally:
            loop.bar.close()
            if windowed is not None:
                windowed.end()
            if processor is not None:
                processor.end_generation(self.model)
        return run.x, loop.step, loop.nfe, (windowed.trace if windowed is not None else None)

    def _run_block(self, loop: _Loop, start: int, end: int) -> None:
        """The steps of one semi-autoregressive block ``[start, end)``."""
        run, call, mask_id = loop.run, loop.call, self.mask_token_id
        x = run.x
        positions = torch.arange(start, end, device=x.device)
        keep = (positions - 1).clamp_min(0) if call.logits_shift else positions
        schedule = num_transfer_tokens((x[:, start:end] == mask_id).sum(1), loop.steps_per_block)
        if loop.windowed is not None:
            loop.windowed.begin_block(start, end)
        for i in range(loop.steps_per_block):
            in_block = x[:, start:end] == mask_id  # [B, bl]
            active = in_block.any(1) & ~loop.done
            if not bool(active.any()):
                break
            if call.options.sampler == "dream":
                count = dream_transfer_count(in_block.sum(1), i, loop.steps_per_block)
                p_transfer = dream_p_transfer(i, loop.steps_per_block)
            else:
                count, p_transfer = schedule[:, i], 1.0
            if loop.windowed is not None:
                last = i == loop.steps_per_block - 1
                loop.nfe += loop.windowed.step(loop.step, active, count, p_transfer, keep, last=last)
            else:
                if loop.processor is not None:
                    loop.processor.set_step(self.model, loop.step)
                logits, calls = self._full_logits(run, keep)
                loop.nfe += calls
                chosen, commit = decide(
                    logits, in_block, count, active, call.options, run.gens, p_transfer=p_transfer
                )
                x[:, start:end] = torch.where(commit, chosen, x[:, start:end])
            loop.step += 1
            loop.bar.update(1)
            if loop.callback is not None:
                loop.callback(loop.step - 1, x.clone())

    def _stop_at_eos(self, loop: _Loop, end: int) -> bool:
        """After a block: rows whose blocks are complete and hold an EOS stop (their rest filled with
        EOS); True when every row has stopped."""
        x, mask_id, eos_ids = loop.run.x, self.mask_token_id, loop.call.eos_ids
        start = end - loop.call.block_length
        finished = (x[:, start:end] != mask_id).all(1)
        has_eos = torch.isin(x[:, loop.call.prompt_length : end], torch.tensor(eos_ids, device=x.device)).any(
            1
        )
        stop = finished & has_eos & ~loop.done
        if bool(stop.any()):
            rest = x[:, end:]
            x[:, end:] = torch.where(stop[:, None] & (rest == mask_id), eos_ids[0], rest)
            loop.done |= stop
        return bool(loop.done.all())


__all__ = [
    "DREAM_ALGS",
    "DREAM_EPS",
    "KNOWN_MASK_TOKEN_IDS",
    "REMASKING",
    "SAMPLERS",
    "DiffusionLMOutput",
    "DiffusionLMPipeline",
    "bidirectional_mask",
    "detect_family",
    "dream_transfer_count",
    "model_family",
    "num_transfer_tokens",
    "resolve_mask_token_id",
    "vocabulary_size",
]
