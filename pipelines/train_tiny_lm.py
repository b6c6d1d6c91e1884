"""Deprecated path, kept for one release: the trainer of ``samples/tiny-llada-kv`` is
:mod:`fastgen.pipelines.training.tiny_lm` (``python -m fastgen.pipelines.training.tiny_lm --out DIR``), its
shared parts (loss, loop, LLaDA checkpoint writers) :mod:`fastgen.pipelines.training.common`.
Importing or running this module logs one deprecation line; ``llada_config`` now takes the task's
description as ``task_info=`` and the mask id as ``mask_token_id=``."""

from fastgen._validation import log_moved

from .training.common import llada_config, llada_state_dict
from .training.tiny_lm import (
    _batch,
    _scale_for_step,
    diffusion_loss,
    main,
    one_pass_accuracy,
    save_checkpoint,
)

log_moved("fastgen.pipelines.train_tiny_lm", "fastgen.pipelines.training.tiny_lm")

__all__ = [
    "_batch",
    "_scale_for_step",
    "diffusion_loss",
    "llada_config",
    "llada_state_dict",
    "main",
    "one_pass_accuracy",
    "save_checkpoint",
]

if __name__ == "__main__":
    raise SystemExit(main())
