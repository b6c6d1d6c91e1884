"""Deprecated import path, kept for one release: the Rectified SpaAttn processor base is
:mod:`fastgen.processors.rectified_base`, the install helpers :mod:`fastgen.processors._install`.
Importing this module logs one deprecation line."""

from fastgen._validation import log_moved

from .rectified_base import (
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    RectifiedProcessorBase,
    check_config,
    collect_stats,
    grid_from_rope_table,
    head_dim_supported,
    install_processors,
    key_padding_from_attention_mask,
    restore_processors,
)

log_moved("fastgen.processors.common", "fastgen.processors.rectified_base")

__all__ = [
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "RectifiedProcessorBase",
    "check_config",
    "collect_stats",
    "grid_from_rope_table",
    "head_dim_supported",
    "install_processors",
    "key_padding_from_attention_mask",
    "restore_processors",
]
