"""Engines that execute a :class:`~fastgen.attention.plan.SelectionPlan`, and the one table of what
each serves: Triton (CUDA), gather (the CPU fast path: a native kernel for fp32), FlexAttention,
plain PyTorch.

Every engine takes q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]`` and a plan, and returns ``(out, lse)``
with ``lse`` the natural-log log-sum-exp ``[B, H, Nq]`` fp32. Query rows with no key give zeros and
``lse = -inf``. Engines execute; they never select.

What each engine serves (device, dtype, head_dim, gradients, extra keys) is stated once, in its
:class:`BackendSpec`; :func:`resolve_backend` consults it. The backend is chosen per call: an
explicit ``backend=`` argument, else :func:`set_default_backend`, else the
``FASTGEN_ATTENTION_BACKEND`` environment variable, else automatically (Triton on CUDA, gather on
CPU). A call the chosen backend cannot serve falls back down the automatic order, logged once per
reason, never silent; the PyTorch reference serves everything.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastgen._validation import log_once as _log_once

from .blocks import block_mask_to_indices
from .plan import SelectionPlan

logger = logging.getLogger(__name__)

EngineFn = Callable[..., tuple]  # (q, k, v, plan, scale, need_lse=True) -> (out, lse)
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def log_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` once per process on this module's logger (fallbacks must be visible but not flood
    the log); the one implementation is :func:`fastgen._validation.log_once`."""
    _log_once(logger, message, level)


@dataclass(frozen=True)
class BackendSpec:
    """What one engine serves; :func:`resolve_backend` never hands it anything else."""

    name: str
    devices: tuple[str, ...]
    """Device types it runs on."""
    dtypes: tuple[torch.dtype, ...] = _ALL_DTYPES
    head_dims: tuple[int, ...] | None = None
    """Head dims it supports (None: any)."""
    grad_devices: tuple[str, ...] = ()
    """Device types on which it keeps gradients (elsewhere inputs that need grad go elsewhere)."""
    extra_keys: bool = False
    """Whether it serves plans with extra keys."""
    environment: Callable[[torch.device], str | None] = lambda device: None
    """Why it cannot run on this machine for ``device`` (None: it can)."""

    def unsupported(
        self,
        device: torch.device,
        dtype: torch.dtype | None = None,
        head_dim: int | None = None,
        requires_grad: bool = False,
        extra_keys: bool = False,
    ) -> str | None:
        """Why this engine cannot serve such a call, or None."""
        if device.type not in self.devices:
            return f"it runs on {'/'.join(self.devices)}, not {device.type}"
        why = self.environment(device)
        if why is not None:
            return why
        if dtype is not None and dtype not in self.dtypes:
            return f"dtype {dtype} is not one of {[str(t) for t in self.dtypes]}"
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return f"head_dim {head_dim} is not one of {list(self.head_dims)}"
        if requires_grad and device.type not in self.grad_devices:
            return "it is forward-only and the inputs require grad"
        if extra_keys and not self.extra_keys:
            return "it does not serve extra (pooled / isolated / text) keys"
        return None


_SPECS: dict[str, BackendSpec] = {}
_ENGINES: dict[str, EngineFn] = {}
_default_backend: str | None = None


def register_backend(spec: BackendSpec):
    """Register an engine function under ``spec.name`` with what it serves."""

    def wrap(fn: EngineFn) -> EngineFn:
        _SPECS[spec.name] = spec
        _ENGINES[spec.name] = fn
        return fn

    return wrap


def backend_spec(name: str) -> BackendSpec:
    """The :class:`BackendSpec` of backend ``name``."""
    if name not in _SPECS:
        raise ValueError(f"backend={name!r} is unknown; allowed: {sorted(_SPECS)}")
    return _SPECS[name]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``.

    Example:
        >>> from fastgen.attention import available_backends
        >>> "torch" in available_backends("cpu")  # the plain PyTorch engine runs everywhere
        True
    """
    device = torch.device(device)
    return [name for name, spec in _SPECS.items() if spec.unsupported(device) is None]


def set_default_backend(name: str | None) -> None:
    """Force one backend for every later call (``None`` restores automatic choice).

    Example:
        >>> from fastgen.attention import set_default_backend
        >>> set_default_backend("torch")  # every later call runs the plain PyTorch engine
        >>> set_default_backend(None)  # automatic choice again
    """
    global _default_backend
    if name is not None and name not in _SPECS:
        raise ValueError(f"backend={name!r} is unknown; allowed: {sorted(_SPECS)} or None")
    _default_backend = name


def _auto_order(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["triton", "flex", "torch"]
    return ["gather", "flex", "torch"]


def resolve_backend(
    requested: str | None,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    requires_grad: bool = False,
    extra_keys: bool = False,
) -> str:
    """Name of the backend a call will use: the requested one if its :class:`BackendSpec` serves
    the call, else the first of the automatic order that does (logged once per reason)."""
    requested = requested or _default_backend or os.environ.get("FASTGEN_ATTENTION_BACKEND") or None
    needs = dict(dtype=dtype, head_dim=head_dim, requires_grad=requires_grad, extra_keys=extra_keys)
    order = _auto_order(device)
    if requested is not None and requested != "auto":
        if requested not in _SPECS:
            raise ValueError(f"backend={requested!r} is unknown; allowed: {sorted(_SPECS)} or 'auto'")
        first, why = requested, _SPECS[requested].unsupported(device, **needs)
        if why is None:
            return requested
    else:
        first, why = order[0], None
    for name in order:
        reason = _SPECS[name].unsupported(device, **needs)
        if reason is None:
            if name != first:
                why = why or _SPECS[first].unsupported(device, **needs)
                log_once(
                    f"fastgen: attention backend {first!r} cannot serve this call ({why}); using {name!r}"
                )
            return name
    return "torch"


def run_plan(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SelectionPlan,
    scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run engine ``name`` on a plan; returns ``(out, lse)`` (lse None when not needed)."""
    out, lse = _ENGINES[name](q, k, v, plan, scale, need_lse=need_lse)
    if isinstance(lse, _LazyLSE):
        lse = lse.materialise() if need_lse else None
    return out, lse


def default_scale(head_dim: int) -> float:
    """Softmax scale ``1/sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)


# --------------------------------------------------------------------------------------------
# PyTorch reference: one query block at a time, so memory is O(block_size * (Nk + P)), never N x N.
# --------------------------------------------------------------------------------------------


@register_backend(
    BackendSpec(
        "torch", ("cpu", "cuda", "mps", "xpu"), grad_devices=("cpu", "cuda", "mps", "xpu"), extra_keys=True
    )
)
def torch_plan_attention(q, k, v, plan: SelectionPlan, scale, need_lse=True):
    """Plain PyTorch (fp32 math) execution of a plan; keeps gradients."""
    b, h, nq, _ = q.shape
    bs, nk = plan.block_size, plan.kv_len
    kf, vf = k[:, :, :nk].float(), v[:, :, :nk].float()
    block_mask = plan.block_mask  # [B, H, nqb, nkb]
    bias = plan.extra_bias()  # [B, H, nqb, P] or None
    if bias is not None:
        p = bias.shape[-1]
        extra_k, extra_v = plan.extra_k[:, :, :p].float(), plan.extra_v[:, :, :p].float()
    outs, lses = [], []
    for qb in range(plan.num_query_blocks):
        rows = slice(qb * bs, min(nq, (qb + 1) * bs))
        key_mask = block_mask[:, :, qb].repeat_interleave(bs, dim=-1)[..., :nk]  # [B, H, Nk]
        scores = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~key_mask[:, :, None, :], float("-inf"))
        values = vf
        if bias is not None:
            extra = torch.matmul(q[:, :, rows].float(), extra_k.transpose(-1, -2)) * scale
            scores = torch.cat([scores, extra + bias[:, :, qb, None, :]], dim=-1)
            values = torch.cat([vf, extra_v], dim=2)
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
        outs.append(torch.matmul(probs, values).to(q.dtype))
        lses.append(row_lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# --------------------------------------------------------------------------------------------
# Triton (CUDA): walks the plan's index table; extra keys through the rectified kernel's pooled set.
# --------------------------------------------------------------------------------------------


def _triton_environment(device: torch.device) -> str | None:
    try:
        from fastgen.kernels import HAS_TRITON
    except ImportError as err:  # pragma: no cover - kernels package always ships
        return f"fastgen.kernels not importable: {err}"
    if not HAS_TRITON:
        return "triton is not installed"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"


@register_backend(
    BackendSpec(
        "triton",
        ("cuda", "cpu"),
        head_dims=(16, 32, 64, 128),
        extra_keys=True,
        environment=_triton_environment,
    )
)
def triton_plan_attention(q, k, v, plan: SelectionPlan, scale, need_lse=True):
    """Triton kernels: block-sparse over the index table; with extra keys, the rectified kernel
    walks them as its pooled keys (a second index table from the visible extra keys)."""
    from fastgen.kernels import block_sparse_attention_triton, rectified_exact_attention_triton

    nk = plan.kv_len
    k, v = k[:, :, :nk], v[:, :, :nk]
    if not plan.has_extra_keys:
        return block_sparse_attention_triton(
            q, k, v, plan.block_indices, plan.block_counts, block_size=plan.block_size, sm_scale=scale
        )
    p = plan.extra_log_weight.shape[-1]
    extra_indices, extra_counts = block_mask_to_indices(torch.isfinite(plan.extra_bias()))
    return rectified_exact_attention_triton(
        q,
        k,
        v,
        plan.block_indices,
        plan.block_counts,
        plan.extra_k[:, :, :p],
        plan.extra_v[:, :, :p],
        extra_indices,
        extra_counts,
        plan.extra_log_weight,
        plan.block_size,
        scale,
    )


# --------------------------------------------------------------------------------------------
# FlexAttention: BlockMask built from the index table directly (no element-wise mask_mod).
# --------------------------------------------------------------------------------------------


def _flex_environment(device: torch.device) -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as err:
        return f"torch.nn.attention.flex_attention unavailable: {err}"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(plan: SelectionPlan):
    """A FlexAttention ``BlockMask`` straight from the plan's index table (no mask_mod scan)."""
    from torch.nn.attention.flex_attention import BlockMask

    indices, counts, nkb = plan.block_indices, plan.block_counts, plan.num_key_blocks
    # from_kv_blocks wants the index table padded out to every key block
    if indices.shape[-1] < nkb:
        pad = torch.zeros(
            *indices.shape[:-1], nkb - indices.shape[-1], dtype=indices.dtype, device=indices.device
        )
        indices = torch.cat([indices, pad], dim=-1)
    return BlockMask.from_kv_blocks(
        counts, indices[..., :nkb], BLOCK_SIZE=plan.block_size, seq_lengths=(plan.q_len, plan.kv_len)
    )


@register_backend(BackendSpec("flex", ("cpu", "cuda"), grad_devices=("cuda",), environment=_flex_environment))
def flex_plan_attention(q, k, v, plan: SelectionPlan, scale, need_lse=True):
    """Compiled FlexAttention with a BlockMask built from the index table.

    Inductor's CPU FlexAttention is inference-only and cannot return the LSE; the LSE is then
    recomputed by the gather engine when asked (the output stays FlexAttention's).
    """
    bm = flex_block_mask(plan)
    kc, vc = k[:, :, : plan.kv_len], v[:, :, : plan.kv_len]
    if q.device.type == "cpu":
        with torch.no_grad():
            out = _compiled_flex()(q, kc, vc, block_mask=bm, scale=scale)
        return out, _LazyLSE(q, k, v, plan, scale)
    out, lse = _compiled_flex()(q, kc, vc, block_mask=bm, scale=scale, return_lse=True)
    return out, lse.float()


class _LazyLSE:
    """Placeholder for an LSE that is computed only when the caller asks for it."""

    def __init__(self, *args):
        self.args = args

    def materialise(self) -> torch.Tensor:
        return gather_plan_engine(*self.args)[1]


# --------------------------------------------------------------------------------------------
# Gather (CPU fast path): the native kernel on the selected key blocks (fp32), else PyTorch's
# flash kernel on gathered slabs (fastgen/attention/gather.py).
# --------------------------------------------------------------------------------------------


@register_backend(BackendSpec("gather", ("cpu",), extra_keys=True))
def gather_plan_engine(q, k, v, plan: SelectionPlan, scale, need_lse=True):
    """Selected key blocks per query block only, extra keys in the same pass: native CPU kernel for
    fp32, else fused SDPA on slabs. Forward only."""
    from .gather import gather_attention

    return gather_attention(
        q,
        k,
        v,
        plan.block_indices,
        plan.block_counts,
        plan.block_size,
        scale,
        kv_length=None if plan.kv_len == k.shape[2] else plan.kv_len,
        extra_k=plan.extra_k if plan.has_extra_keys else None,
        extra_v=plan.extra_v if plan.has_extra_keys else None,
        extra_bias=plan.extra_bias(),
        return_lse=need_lse,
    )
