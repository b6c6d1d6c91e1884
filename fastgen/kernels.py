"""Triton kernels of fastgen (``fastgen.kernels``; the modules are in the repository's ``kernels/``).

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

from fastgen._layout import subpackage_path

__path__ = subpackage_path("kernels", "block_sparse_attn.py")  # the modules live in the root's kernels/

from fastgen.kernels import cpu_attn as _cpu_attn  # noqa: E402, F401 - registers the CPU custom ops
from fastgen.kernels.block_sparse_attn import (  # noqa: E402
    HAS_TRITON,
    block_mask_to_indices,
    block_sparse_attention_triton,
)
from fastgen.kernels.rectified_attn import rectified_exact_attention_triton  # noqa: E402

__all__ = [
    "HAS_TRITON",
    "block_mask_to_indices",
    "block_sparse_attention_triton",
    "rectified_exact_attention_triton",
]
