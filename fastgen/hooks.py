"""Deprecated import path, kept for one release: step tracking lives in :mod:`fastgen.tracking`, and
applying a method to a whole pipeline (``apply_to_pipeline`` / ``remove_from_pipeline``) in
:mod:`fastgen.api`. Importing this module logs one deprecation line."""

from fastgen._validation import log_moved
from fastgen.api import (
    SCHEDULER_HOOK_ATTR,
    _hook_scheduler,
    _unhook_scheduler,
    apply_to_pipeline,
    is_pipeline,
    pipeline_transformers,
    remove_from_pipeline,
)
from fastgen.tracking import (
    HOOK_NAME,
    StepTracker,
    active_tracker,
    get_step_tracker,
    register_step_tracker,
    remove_step_tracker,
    reset_step_tracking,
    video_grid,
)

log_moved("fastgen.hooks", "fastgen.tracking (step tracking) and fastgen.api (pipelines)")

__all__ = [
    "HOOK_NAME",
    "SCHEDULER_HOOK_ATTR",
    "StepTracker",
    "_hook_scheduler",
    "_unhook_scheduler",
    "active_tracker",
    "apply_to_pipeline",
    "get_step_tracker",
    "is_pipeline",
    "pipeline_transformers",
    "register_step_tracker",
    "remove_from_pipeline",
    "remove_step_tracker",
    "reset_step_tracking",
    "video_grid",
]
