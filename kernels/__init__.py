"""Triton kernels of fastgen (installed as ``fastgen.kernels``).

Importing this package never imports Triton and never fails: ``HAS_TRITON`` says whether
Triton is installed, ``block_mask_to_indices`` is plain torch, and
``block_sparse_attention_triton`` / ``rectified_exact_attention_triton`` (Rectified SpaAttn's
exact form in one pass) import Triton on their first call (raising a ``RuntimeError`` that
names the fallback when Triton is missing). Every kernel entry point is a ``torch.library`` custom op
in the ``fastgen`` namespace with a fake (meta) implementation, so ``torch.compile`` traces through
it: ``torch.ops.fastgen.block_sparse_attention_triton``, ``rectified_exact_attention_triton``,
``block_sparse_cpu`` and ``block_mass_cpu`` (the native CPU kernel, :mod:`.cpu_attn`). The torch /
FlexAttention fallbacks live in ``fastgen/attention/backends.py``.
"""

from . import cpu_attn as _cpu_attn  # noqa: F401 - registers the torch.ops.fastgen CPU custom ops
from .block_sparse_attn import HAS_TRITON, block_mask_to_indices, block_sparse_attention_triton
from .rectified_attn import rectified_exact_attention_triton

__all__ = [
    "HAS_TRITON",
    "block_mask_to_indices",
    "block_sparse_attention_triton",
    "rectified_exact_attention_triton",
]
