"""Running a :class:`~fastgen.attention.plan.SelectionPlan`: one softmax per query over exactly the keys
the plan lists, on an engine that :func:`~fastgen.attention.backends.resolve_backend` picks (``torch``
reference, ``gather`` = CPU native kernel, ``triton``, ``flex``). The plan itself is data only
(``plan.py``); this module is the one entry point from a plan to its engines."""

from __future__ import annotations

from dataclasses import replace

import torch

from ._checks import check_qkv
from .backends import default_scale, resolve_backend, run_plan
from .plan import SelectionPlan, check_plan

_PAD_LOGIT = -3.0e4  # logit bias of a padded key (finite in every supported dtype; weight exactly 0)


def _fold_key_valid(q, k, v, plan: SelectionPlan):
    """Padded keys as one more head dimension: q gets a 1, k the bias 0 (real) or -3e4 (padded),
    v a 0, extra keys a 0 (their weights stay in ``extra_log_weight``). Exact: a padded key's weight
    underflows to 0. Returns the widened tensors and the plan without ``key_valid``."""
    bias = torch.where(plan.key_valid, 0.0, _PAD_LOGIT).to(k.dtype)[:, None, :, None]
    q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)
    k = torch.cat([k, bias.expand(*k.shape[:3], 1)], dim=-1)
    v = torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)
    extra = {}
    if plan.has_extra_keys:
        extra = {
            name: torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)
            for name, x in (("extra_k", plan.extra_k), ("extra_v", plan.extra_v))
        }
    return q, k, v, replace(plan, key_valid=None, **extra)


def execute_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: SelectionPlan,
    *,
    backend: str | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run ``plan`` on q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]``: one softmax per query over its
    selected key blocks and visible extra keys (see the module docstring).

    Args:
        backend: ``"triton"``, ``"gather"``, ``"flex"``, ``"torch"`` or None/``"auto"``; a backend
            that cannot serve the call (device, dtype, head_dim, gradients, extra keys) falls back
            with one log line (:func:`~fastgen.attention.backends.resolve_backend`).
        scale: softmax scale (default ``1/sqrt(D)``).
        return_lse: also return the natural-log log-sum-exp ``[B, H, Nq]`` fp32.

    Returns:
        ``out`` ``[B, H, Nq, D]`` in q's dtype (and ``lse``).

    Example:
        >>> import torch
        >>> from fastgen.attention import SelectionPlan, dense_attention, execute_plan
        >>> q, k, v = torch.randn(3, 1, 2, 32, 16).unbind(0)
        >>> diagonal = torch.eye(2, dtype=torch.bool).expand(1, 2, 2, 2)  # each block sees itself only
        >>> plan = SelectionPlan.from_block_mask(diagonal, block_size=16, q_len=32, kv_len=32)
        >>> out = execute_plan(q, k, v, plan, backend="torch")
        >>> second = slice(16, 32)
        >>> torch.allclose(out[:, :, second], dense_attention(q[:, :, second], k[:, :, second], v[:, :, second]), atol=1e-5)
        True
    """
    check_qkv(q, k, v)
    check_plan(q, k, v, plan)
    d = q.shape[-1]
    scale = default_scale(d) if scale is None else float(scale)
    if plan.key_valid is not None:
        q, k, v, plan = _fold_key_valid(q, k, v, plan)
    requires_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    name = resolve_backend(
        backend,
        q.device,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        requires_grad=requires_grad,
        extra_keys=plan.has_extra_keys,
    )
    out, lse = run_plan(name, q, k, v, plan, scale, need_lse=return_lse)
    out = out[..., :d]
    return (out, lse) if return_lse else out


__all__ = ["execute_plan"]
