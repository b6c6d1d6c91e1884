"""Triton kernels of fastgen (installed as ``fastgen.kernels``).

Importing this package never imports Triton and never fails: ``HAS_TRITON`` says whether
Triton is installed, ``block_mask_to_indices`` is plain torch, and
``block_sparse_attention_triton`` / ``rectified_exact_attention_triton`` (Rectified SpaAttn's
exact form in one pass) import Triton on their first call (raising a ``RuntimeError`` that
names the fallback when Triton is missing). The torch /
FlexAttention fallbacks live in ``fastgen/attention/backends.py``.
"""

from .block_sparse_attn import HAS_TRITON, block_mask_to_indices, block_sparse_attention_triton
from .rectified_attn import rectified_exact_attention_triton

__all__ = [
    "HAS_TRITON",
    "block_mask_to_indices",
    "block_sparse_attention_triton",
    "rectified_exact_attention_triton",
]
