"""The ``tiny-llada-kv`` preset: the trained tiny diffusion LM shipped in ``samples/tiny-llada-kv``.

A LLaDA checkpoint in the official layout (``config.json`` + ``model.safetensors`` + tokenizer files),
trained on this machine by :mod:`fastgen.pipelines.train_tiny_lm` on the key-value retrieval task of
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

import json
import os
from pathlib import Path

import torch

from .diffusion_lm import DiffusionLMPipeline
from .kv_task import KVTask

CHECKPOINT_ENV = "FASTGEN_TINY_LLADA_KV"
"""Environment variable that overrides the checkpoint folder."""

DECODING = {"gen_length": 4, "steps": 4, "block_length": 4, "temperature": 0.0}
"""Decoding settings of the model card (greedy, low-confidence remasking, one token per step)."""


def checkpoint_folder() -> str:
    """The shipped checkpoint: ``$FASTGEN_TINY_LLADA_KV`` or ``samples/tiny-llada-kv`` of this repository."""
    override = os.environ.get(CHECKPOINT_ENV)
    if override:
        return override
    return str(Path(__file__).resolve().parent.parent / "samples" / "tiny-llada-kv")


def task_of(folder: str) -> KVTask:
    """The :class:`KVTask` a checkpoint was trained on (``fastgen_task`` of its ``config.json``)."""
    with open(os.path.join(folder, "config.json")) as f:
        fields = dict(json.load(f).get("fastgen_task") or {})
    fields.pop("name", None)
    return KVTask(**fields)


def build_tiny_llada_kv(
    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> DiffusionLMPipeline:
    """Load the trained ``tiny-llada-kv`` checkpoint as a :class:`DiffusionLMPipeline` (float32 on CPU)."""
    from .lm_loaders import load_diffusion_lm

    folder = checkpoint_folder()
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ValueError(
            f"the tiny-llada-kv checkpoint is missing at {folder!r}; set {CHECKPOINT_ENV} or train one with "
            "`python -m fastgen.pipelines.train_tiny_lm --out DIR`"
        )
    model, tokenizer, mask_token_id = load_diffusion_lm(folder, device=device, dtype=dtype)
    pipe = DiffusionLMPipeline(model, tokenizer=tokenizer, mask_token_id=mask_token_id)
    pipe.fastgen_defaults = dict(DECODING)
    pipe.fastgen_task = task_of(folder)
    return pipe


__all__ = ["CHECKPOINT_ENV", "DECODING", "build_tiny_llada_kv", "checkpoint_folder", "task_of"]
