"""fastgen: sparse attention that makes video diffusion transformers and diffusion LMs generate faster.

>>> from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention
>>> apply_sparse_attention(pipe.transformer, RectifiedSpaAttnConfig(sparsity=0.8))
"""

from .api import apply_sparse_attention, remove_sparse_attention, sparse_attention
from .attention_stats import attention_stats, record_attention_stats, recording_attention_stats
from .configs import (
    FastDLLMConfig,
    LightForcingConfig,
    RectifiedSpaAttnConfig,
    SparseDConfig,
    WindowDiffusionConfig,
)

__version__ = "0.1.0"

__all__ = [
    "FastDLLMConfig",
    "LightForcingConfig",
    "RectifiedSpaAttnConfig",
    "SparseDConfig",
    "WindowDiffusionConfig",
    "apply_sparse_attention",
    "attention_stats",
    "record_attention_stats",
    "recording_attention_stats",
    "remove_sparse_attention",
    "sparse_attention",
]
