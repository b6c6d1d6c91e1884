"""Plain-PyTorch ground truth of SparseD (fla's ``naive.py``): the pattern (mean attention
probability per tile from the full fp64 attention map, top ``ceil(select x blocks)`` per query
block with separate prompt / generated budgets) and the attention under it, written out one
(batch, head) at a time with explicit loops. For tests at small shapes only; it shares no code with
:mod:`fastgen.attention.sparsed`.
"""

from __future__ import annotations

import math

import torch


def sparsed_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    select: float,
    block_size: int,
    key_padding_mask: torch.Tensor | None = None,
    prompt_end: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseD on self-attention ``[B, H, N, D]``: ``(out in q's dtype, block_mask [B, H, nb, nb])``."""
    b, h, n, d = q.shape
    bs = block_size
    nb = -(-n // bs)
    scale = 1.0 / math.sqrt(d)
    valid = torch.ones(b, n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.cpu()
    mask = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for bi in range(b):
        block_ok = [bool(valid[bi, j * bs : (j + 1) * bs].any()) for j in range(nb)]
        prompt = [j * bs < prompt_end if prompt_end is not None else True for j in range(nb)]
        regions = [[j for j in range(nb) if block_ok[j] and prompt[j]]]
        if prompt_end is not None:
            regions.append([j for j in range(nb) if block_ok[j] and not prompt[j]])
        for hi in range(h):
            Q, K, V = q[bi, hi].double(), k[bi, hi].double(), v[bi, hi].double()
            scores = (Q @ K.T * scale).masked_fill(~valid[bi][None, :], float("-inf"))
            probs = torch.softmax(scores, -1).nan_to_num(0.0)
            for i in range(nb):
                rows = [r for r in range(i * bs, min(n, (i + 1) * bs)) if valid[bi, r]]
                importance = [
                    float(probs[rows, j * bs : (j + 1) * bs].sum()) / (max(1, len(rows)) * bs)
                    for j in range(nb)
                ]
                for region in regions:
                    if not region:
                        continue
                    budget = max(1, math.ceil(len(region) * select - 1e-6))
                    ranked = sorted(region, key=lambda j: -importance[j])  # stable: ties by index
                    for j in ranked[:budget]:
                        mask[bi, hi, i, j] = True
            # attention under the pattern, padded keys excluded
            for i in range(nb):
                allowed = torch.zeros(n, dtype=torch.bool)
                for j in range(nb):
                    if mask[bi, hi, i, j]:
                        allowed[j * bs : (j + 1) * bs] = True
                allowed &= valid[bi]
                block_rows = slice(i * bs, min(n, (i + 1) * bs))
                if allowed.any():
                    s = Q[block_rows] @ K[allowed].T * scale
                    out[bi, hi, block_rows] = torch.softmax(s, -1) @ V[allowed]
    return out.to(q.dtype), mask
