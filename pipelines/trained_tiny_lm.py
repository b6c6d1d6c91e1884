"""Trained tiny diffusion LMs shipped in ``samples/``: one description per checkpoint (where it is, the
task it was trained on, its decoding settings) and the loader they share.

A checkpoint is a LLaDA checkpoint in the official layout (``config.json`` + ``model.safetensors`` +
tokenizer files) whose ``config.json`` also records the task (``fastgen_task``); it is loaded with
:func:`~fastgen.pipelines.lm_loaders.load_diffusion_lm` exactly like a real LLaDA.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .diffusion_lm import DiffusionLMPipeline


@dataclass(frozen=True)
class TrainedTinyLM:
    """A trained tiny LM of ``samples/<name>``: its task class, decoding settings and how to retrain it."""

    name: str
    """Preset name, also the folder under ``samples/``."""
    checkpoint_env: str
    """Environment variable that overrides the checkpoint folder."""
    task_class: type
    """The task dataclass (``fastgen_task`` of ``config.json`` holds its fields)."""
    decoding: dict
    """Decoding settings of the model card (the pipeline's ``fastgen_defaults``)."""
    train_command: str
    """The command that trains a checkpoint (said when the shipped one is missing)."""

    def checkpoint_folder(self) -> str:
        """``$<checkpoint_env>`` or ``samples/<name>`` of this repository."""
        override = os.environ.get(self.checkpoint_env)
        if override:
            return override
        return str(Path(__file__).resolve().parent.parent / "samples" / self.name)

    def task_of(self, folder: str):
        """The task a checkpoint was trained on (``fastgen_task`` of its ``config.json``)."""
        with open(os.path.join(folder, "config.json")) as f:
            fields = dict(json.load(f).get("fastgen_task") or {})
        fields.pop("name", None)
        return self.task_class(**fields)

    def build(
        self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
    ) -> DiffusionLMPipeline:
        """Load the checkpoint as a :class:`DiffusionLMPipeline` (float32 on CPU) with ``fastgen_defaults``
        (:attr:`decoding`) and ``fastgen_task`` (whose ``answer_of(prompt)`` tells the right answer)."""
        from .lm_loaders import load_diffusion_lm

        folder = self.checkpoint_folder()
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(
                f"the {self.name} checkpoint is missing at {folder!r}; set {self.checkpoint_env} or train one "
                f"with `{self.train_command}`"
            )
        model, tokenizer, mask_token_id = load_diffusion_lm(folder, device=device, dtype=dtype)
        pipe = DiffusionLMPipeline(model, tokenizer=tokenizer, mask_token_id=mask_token_id)
        pipe.fastgen_defaults = dict(self.decoding)
        pipe.fastgen_task = self.task_of(folder)
        return pipe


__all__ = ["TrainedTinyLM"]
