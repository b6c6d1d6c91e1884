"""The ``tiny-llada-kv`` preset: the trained tiny diffusion LM shipped in ``samples/tiny-llada-kv``.

A LLaDA checkpoint in the official layout (``config.json`` + ``model.safetensors`` + tokenizer files),
trained on this machine by :mod:`fastgen.pipelines.training.tiny_lm` on the key-value retrieval task of
:mod:`fastgen.pipelines.kv_task`; it is loaded with :func:`~fastgen.pipelines.lm_loaders.load_diffusion_lm` exactly
like a real LLaDA. Its answers can be checked, so text fidelity is measured as task accuracy.

The pipeline carries ``fastgen_defaults`` (the decoding settings of the model card: 4 answer tokens,
4 steps, one block) and ``fastgen_task`` (the :class:`~fastgen.pipelines.kv_task.KVTask`, whose
``answer_of(prompt)`` tells the right answer of a prompt in the task's format).

Example:
    >>> from fastgen.pipelines import load_preset
    >>> pipe = load_preset("tiny-llada-kv")
    >>> example = pipe.fastgen_task.example(seed=7)
    >>> pipe(prompt=example.prompt, **pipe.fastgen_defaults).texts[0] == example.answer
"""

from __future__ import annotations

import torch

from .diffusion_lm import DiffusionLMPipeline
from .kv_task import KVTask
from .trained_tiny_lm import TrainedTinyLM

MODEL = TrainedTinyLM(
    name="tiny-llada-kv",
    checkpoint_env="FASTGEN_TINY_LLADA_KV",
    task_class=KVTask,
    decoding={"gen_length": 4, "steps": 4, "block_length": 4, "temperature": 0.0},
    train_command="python -m fastgen.pipelines.training.tiny_lm --out DIR",
)
"""The shipped checkpoint's description (folder, task, decoding, how to retrain it)."""

CHECKPOINT_ENV, DECODING = MODEL.checkpoint_env, MODEL.decoding
"""The environment variable that overrides the checkpoint folder; the model card's decoding settings."""

checkpoint_folder = MODEL.checkpoint_folder
"""The shipped checkpoint: ``$FASTGEN_TINY_LLADA_KV`` or ``samples/tiny-llada-kv`` of this repository."""

task_of = MODEL.task_of
"""The :class:`KVTask` a checkpoint was trained on (``fastgen_task`` of its ``config.json``)."""


def build_tiny_llada_kv(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> DiffusionLMPipeline:
    """Load the trained ``tiny-llada-kv`` checkpoint as a :class:`DiffusionLMPipeline` (float32 on CPU)."""
    return MODEL.build(device=device, dtype=dtype)


__all__ = ["CHECKPOINT_ENV", "DECODING", "MODEL", "build_tiny_llada_kv", "checkpoint_folder", "task_of"]
