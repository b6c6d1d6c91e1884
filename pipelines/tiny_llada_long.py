"""The ``tiny-llada-long`` preset: the trained tiny diffusion LM shipped in ``samples/tiny-llada-long``,
whose answers are long (256 tokens; 1024 positions with EOS padding in the long setting).

A LLaDA checkpoint in the official layout (``config.json`` + ``model.safetensors`` + tokenizer files),
trained on this machine by ``scripts/train_long_lm.py`` on the ledger task of
:mod:`fastgen.pipelines.long_task`; loaded with :func:`~fastgen.pipelines.lm_loaders.load_diffusion_lm`
exactly like a real LLaDA. Answers can be checked exactly (``pipe.fastgen_task.answer_of(prompt)``).

The pipeline carries ``fastgen_defaults`` (the model card's decoding: 256 answer tokens, one token per
step, blocks of 32, greedy) and ``fastgen_task`` (the :class:`~fastgen.pipelines.long_task.LedgerTask`).

Example:
    >>> from fastgen.pipelines import load_preset
    >>> pipe = load_preset("tiny-llada-long")
    >>> ex = pipe.fastgen_task.example(seed=7)
    >>> pipe(prompt=ex.prompt, **pipe.fastgen_defaults).texts[0] == ex.answer
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .diffusion_lm import DiffusionLMPipeline
from .long_task import LedgerTask

CHECKPOINT_ENV = "FASTGEN_TINY_LLADA_LONG"
"""Environment variable that overrides the checkpoint folder."""

DECODING = {"gen_length": 256, "steps": 256, "block_length": 32, "temperature": 0.0}
"""Decoding settings of the model card (greedy, low-confidence remasking, one token per step)."""


def checkpoint_folder() -> str:
    """The shipped checkpoint: ``$FASTGEN_TINY_LLADA_LONG`` or ``samples/tiny-llada-long`` of this repository."""
    override = os.environ.get(CHECKPOINT_ENV)
    if override:
        return override
    return str(Path(__file__).resolve().parent.parent / "samples" / "tiny-llada-long")


def task_of(folder: str) -> LedgerTask:
    """The :class:`LedgerTask` a checkpoint was trained on (``fastgen_task`` of its ``config.json``)."""
    with open(os.path.join(folder, "config.json")) as f:
        fields = dict(json.load(f).get("fastgen_task") or {})
    fields.pop("name", None)
    return LedgerTask(**fields)


def build_tiny_llada_long(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> DiffusionLMPipeline:
    """Load the trained ``tiny-llada-long`` checkpoint as a :class:`DiffusionLMPipeline` (float32 on CPU)."""
    from .lm_loaders import load_diffusion_lm

    folder = checkpoint_folder()
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ValueError(
            f"the tiny-llada-long checkpoint is missing at {folder!r}; set {CHECKPOINT_ENV} or train one with "
            "`python scripts/train_long_lm.py --out DIR`"
        )
    model, tokenizer, mask_token_id = load_diffusion_lm(folder, device=device, dtype=dtype)
    pipe = DiffusionLMPipeline(model, tokenizer=tokenizer, mask_token_id=mask_token_id)
    pipe.fastgen_defaults = dict(DECODING)
    pipe.fastgen_task = task_of(folder)
    return pipe


__all__ = ["CHECKPOINT_ENV", "DECODING", "build_tiny_llada_long", "checkpoint_folder", "task_of"]
