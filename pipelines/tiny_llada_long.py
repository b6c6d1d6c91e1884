"""The ``tiny-llada-long`` preset: the trained tiny diffusion LM shipped in ``samples/tiny-llada-long``,
whose answers are long (256 tokens; 1024 positions with EOS padding in the long setting).

A LLaDA checkpoint in the official layout (``config.json`` + ``model.safetensors`` + tokenizer files),
trained on this machine by :mod:`fastgen.pipelines.training.long_lm` on the ledger task of
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

import torch

from .diffusion_lm import DiffusionLMPipeline
from .long_task import LedgerTask
from .trained_tiny_lm import TrainedTinyLM

MODEL = TrainedTinyLM(
    name="tiny-llada-long",
    checkpoint_env="FASTGEN_TINY_LLADA_LONG",
    task_class=LedgerTask,
    decoding={"gen_length": 256, "steps": 256, "block_length": 32, "temperature": 0.0},
    train_command="python -m fastgen.pipelines.training.long_lm --out DIR",
)
"""The shipped checkpoint's description (folder, task, decoding, how to retrain it)."""

CHECKPOINT_ENV, DECODING = MODEL.checkpoint_env, MODEL.decoding
"""The environment variable that overrides the checkpoint folder; the model card's decoding settings."""

checkpoint_folder = MODEL.checkpoint_folder
"""The shipped checkpoint: ``$FASTGEN_TINY_LLADA_LONG`` or ``samples/tiny-llada-long`` of this repository."""

task_of = MODEL.task_of
"""The :class:`LedgerTask` a checkpoint was trained on (``fastgen_task`` of its ``config.json``)."""


def build_tiny_llada_long(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> DiffusionLMPipeline:
    """Load the trained ``tiny-llada-long`` checkpoint as a :class:`DiffusionLMPipeline` (float32 on CPU)."""
    return MODEL.build(device=device, dtype=dtype)


__all__ = ["CHECKPOINT_ENV", "DECODING", "MODEL", "build_tiny_llada_long", "checkpoint_folder", "task_of"]
