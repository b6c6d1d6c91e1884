"""Backends for block-sparse attention: Triton (CUDA), gather (the CPU fast path: a native kernel
for fp32), FlexAttention, plain PyTorch.

Every backend takes q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]`` and a bool ``block_mask``
``[B or 1, H, ceil(Nq/bs), ceil(Nk/bs)]`` and returns ``(out, lse)`` with ``lse`` the natural-log
log-sum-exp ``[B, H, Nq]`` fp32. Query rows with no selected key block give zeros and ``lse = -inf``.

The backend is chosen per call: an explicit ``backend=`` argument, else :func:`set_default_backend`,
else the ``FASTGEN_ATTENTION_BACKEND`` environment variable, else automatically (Triton on CUDA,
gather on CPU, the PyTorch reference otherwise). A fallback away from the requested or
automatic choice is logged once per reason, never silent.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable

import torch

from .blocks import block_mask_to_indices

logger = logging.getLogger(__name__)

BackendFn = Callable[..., tuple]  # (q, k, v, block_mask, block_size, scale, need_lse=True) -> (out, lse)

_BACKENDS: dict[str, BackendFn] = {}
_AVAILABLE: dict[str, Callable[[torch.device], str | None]] = {}
_default_backend: str | None = None
_logged: set[str] = set()


def log_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` once per process (fallbacks must be visible but not flood the log)."""
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def register_backend(name: str, unavailable_reason: Callable[[torch.device], str | None]):
    """Register a backend function; ``unavailable_reason(device)`` returns None when usable."""

    def wrap(fn: BackendFn) -> BackendFn:
        _BACKENDS[name] = fn
        _AVAILABLE[name] = unavailable_reason
        return fn

    return wrap


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    device = torch.device(device)
    return [name for name, why in _AVAILABLE.items() if why(device) is None]


def set_default_backend(name: str | None) -> None:
    """Force one backend for every later call (``None`` restores automatic choice)."""
    global _default_backend
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; allowed: {sorted(_BACKENDS)} or None")
    _default_backend = name


def _auto_order(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["triton", "flex", "torch"]
    return ["gather", "flex", "torch"]


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Name of the backend a call will use; logs once when it falls back."""
    requested = requested or _default_backend or os.environ.get("FASTGEN_ATTENTION_BACKEND") or None
    if requested is not None and requested != "auto":
        if requested not in _BACKENDS:
            raise ValueError(f"backend={requested!r} is unknown; allowed: {sorted(_BACKENDS)} or 'auto'")
        why = _AVAILABLE[requested](device)
        if why is None:
            return requested
        log_once(
            f"fastgen: block-sparse backend {requested!r} unavailable on {device.type} ({why}); falling back"
        )
    order = _auto_order(device)
    for name in order:
        if name not in _BACKENDS:
            continue
        why = _AVAILABLE[name](device)
        if why is None:
            if name != order[0] and requested in (None, "auto"):
                log_once(f"fastgen: preferred block-sparse backend {order[0]!r} unavailable; using {name!r}")
            return name
    return "torch"


def run_backend(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call backend ``name``; returns ``(out, lse)``."""
    out, lse = _BACKENDS[name](q, k, v, block_mask, block_size, scale, need_lse=need_lse)
    if isinstance(lse, _LazyLSE):
        lse = lse.materialise() if need_lse else None
    return out, lse


# --------------------------------------------------------------------------------------------
# PyTorch reference: one query block at a time, so memory is O(block_size * Nk), never N x N.
# --------------------------------------------------------------------------------------------


@register_backend("torch", lambda device: None)
def torch_block_sparse(q, k, v, block_mask, block_size, scale, need_lse=True):
    """Plain PyTorch reference (fp32 math)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    kf, vf = k.float(), v.float()
    out = torch.empty_like(q)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    mask = block_mask.expand(b, -1, -1, -1)
    for qb in range(mask.shape[2]):
        rows = slice(qb * block_size, min(nq, (qb + 1) * block_size))
        key_mask = mask[:, :, qb].repeat_interleave(block_size, dim=-1)[..., :nk]  # [B, H, Nk]
        scores = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~key_mask[:, :, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
        out[:, :, rows] = torch.matmul(probs, vf).to(q.dtype)
        lse[:, :, rows] = row_lse
    return out, lse


# --------------------------------------------------------------------------------------------
# Triton (CUDA): walks a per-(batch, head, query-block) list of selected key blocks.
# --------------------------------------------------------------------------------------------


def _triton_unavailable(device: torch.device) -> str | None:
    try:
        from fastgen.kernels import HAS_TRITON
    except ImportError as err:  # pragma: no cover - kernels package always ships
        return f"fastgen.kernels not importable: {err}"
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"


@register_backend("triton", _triton_unavailable)
def triton_block_sparse(q, k, v, block_mask, block_size, scale, need_lse=True):
    """Triton kernel over an index table of selected key blocks."""
    from fastgen.kernels import block_sparse_attention_triton

    indices, counts = block_mask_to_indices(block_mask.expand(q.shape[0], -1, -1, -1))
    return block_sparse_attention_triton(q, k, v, indices, counts, block_size=block_size, sm_scale=scale)


# --------------------------------------------------------------------------------------------
# FlexAttention: BlockMask built from block indices directly (no element-wise mask_mod).
# --------------------------------------------------------------------------------------------


def _flex_unavailable(device: torch.device) -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as err:
        return f"torch.nn.attention.flex_attention unavailable: {err}"
    if device.type not in ("cpu", "cuda"):
        return f"FlexAttention does not run on {device.type}"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(block_mask: torch.Tensor, block_size: int, q_len: int, kv_len: int):
    """A FlexAttention ``BlockMask`` straight from the selected key-block indices (no mask_mod scan)."""
    from torch.nn.attention.flex_attention import BlockMask

    indices, counts = block_mask_to_indices(block_mask)
    nkb = block_mask.shape[-1]
    # from_kv_blocks wants the index table padded out to every key block
    if indices.shape[-1] < nkb:
        pad = torch.zeros(
            *indices.shape[:-1], nkb - indices.shape[-1], dtype=indices.dtype, device=indices.device
        )
        indices = torch.cat([indices, pad], dim=-1)
    return BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=block_size, seq_lengths=(q_len, kv_len))


@register_backend("flex", _flex_unavailable)
def flex_block_sparse(q, k, v, block_mask, block_size, scale, need_lse=True):
    """Compiled FlexAttention with a BlockMask built from the block indices.

    Inductor's CPU FlexAttention is inference-only and cannot return the LSE; the LSE is then
    recomputed block-sparsely by the gather path (the output stays FlexAttention's).
    """
    bm = flex_block_mask(block_mask.expand(q.shape[0], -1, -1, -1), block_size, q.shape[2], k.shape[2])
    if q.device.type == "cpu":
        with torch.no_grad():
            out = _compiled_flex()(q, k, v, block_mask=bm, scale=scale)
        return out, _LazyLSE(q, k, v, block_mask, block_size, scale)
    out, lse = _compiled_flex()(q, k, v, block_mask=bm, scale=scale, return_lse=True)
    return out, lse.float()


class _LazyLSE:
    """Placeholder for an LSE that is computed only when the caller asks for it."""

    def __init__(self, *args):
        self.args = args

    def materialise(self) -> torch.Tensor:
        from .gather import gather_block_sparse_attention

        return gather_block_sparse_attention(*self.args)[1]


# --------------------------------------------------------------------------------------------
# Gather (CPU fast path): the native kernel on the selected key blocks (fp32), else PyTorch's
# flash kernel on gathered slabs (fastgen/attention/gather.py).
# --------------------------------------------------------------------------------------------


@register_backend("gather", lambda device: None if device.type == "cpu" else "the gather path is CPU-only")
def gather_block_sparse(q, k, v, block_mask, block_size, scale, need_lse=True):
    """Selected key blocks per query block only: native CPU kernel for fp32, else fused SDPA on slabs.
    Forward only: inputs that need gradients go to the PyTorch reference (logged once)."""
    from .gather import gather_block_sparse_attention

    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        log_once("fastgen: the gather backend is forward-only and the inputs require grad; using 'torch'")
        return torch_block_sparse(q, k, v, block_mask, block_size, scale)

    return gather_block_sparse_attention(q, k, v, block_mask, block_size, scale, return_lse=need_lse)


def default_scale(head_dim: int) -> float:
    """Softmax scale ``1/sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)
