"""Plain-PyTorch ground truths (fla's ``naive.py``): every fast engine and every method is tested
against these. They build the full ``[Nq, Nk]`` score matrix, so they are for tests and small
shapes only, and they share no code with the engines they check.
"""

from __future__ import annotations

import torch

from .plan import SelectionPlan


def naive_plan_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SelectionPlan, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax a :class:`SelectionPlan` defines, written out densely in fp64:
    ``(out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32)``; rows without keys give 0 / ``-inf``."""
    b, h, nq, d = q.shape
    scale = d**-0.5 if scale is None else scale
    bs, nk = plan.block_size, plan.kv_len
    qd, kd, vd = q.double(), k[:, :, :nk].double(), v[:, :, :nk].double()
    # token mask from the index table, one (batch, head, query block) at a time
    allowed = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(plan.num_query_blocks):
                for slot in range(int(plan.block_counts[bi, hi, qb])):
                    kb = int(plan.block_indices[bi, hi, qb, slot])
                    allowed[bi, hi, qb * bs : (qb + 1) * bs, kb * bs : (kb + 1) * bs] = True
    if plan.key_valid is not None:
        allowed &= plan.key_valid[:, None, None, :nk]
    scores = (qd @ kd.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    values = vd.expand(b, h, nk, d)
    if plan.has_extra_keys:
        p = plan.extra_log_weight.shape[-1]
        ek, ev = plan.extra_k[:, :, :p].double(), plan.extra_v[:, :, :p].double()
        extra = (qd @ ek.transpose(-1, -2)) * scale + plan.extra_log_weight.double()[:, :, None, :]
        if plan.extra_visible is not None:
            seen = plan.extra_visible.repeat_interleave(bs, dim=2)[:, :, :nq]
            extra = extra.masked_fill(~seen, float("-inf"))
        scores = torch.cat([scores, extra], dim=-1)
        values = torch.cat([values, ev], dim=2)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (weights @ values).to(q.dtype), lse.float()
