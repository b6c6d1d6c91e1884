"""Plain-PyTorch ground truth of Light Forcing's attention (tests only: it builds ``Nq x Nk`` logits).

Given a block mask (from :func:`fastgen.attention.light_forcing.hsa_block_mask`) and, with
rectification, the compensated blocks, every query attends in one softmax to the tokens of its
query block's selected key blocks and to one pooled key per compensated key block (mean key
``k̄_J`` with logit ``q . k̄_J * scale + log n_J``, value ``v̄_J``).
"""

from __future__ import annotations

import math

import torch


def naive_light_forcing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    compensated: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference output ``[B, H, Nq, D]`` (q's dtype, fp32 math) of block-sparse attention with
    optional pooled-key compensation, written as one dense masked softmax."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    token_mask = block_mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[:, :, :nq, :nk]
    logits = (qf @ kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~token_mask, float("-inf"))
    values = vf.expand(b, h, nk, d)
    if compensated is not None:
        nkb = block_mask.shape[-1]
        pooled_k = torch.stack(
            [kf[:, :, j * block_size : (j + 1) * block_size].mean(2) for j in range(nkb)], 2
        )
        pooled_v = torch.stack(
            [vf[:, :, j * block_size : (j + 1) * block_size].mean(2) for j in range(nkb)], 2
        )
        counts = torch.tensor([min(block_size, nk - j * block_size) for j in range(nkb)], dtype=torch.float32)
        pooled_logits = (qf @ pooled_k.transpose(-1, -2)) * scale + counts.log()
        pooled_mask = compensated.repeat_interleave(block_size, 2)[:, :, :nq]
        pooled_logits = pooled_logits.masked_fill(~pooled_mask, float("-inf"))
        logits = torch.cat([logits, pooled_logits], -1)
        values = torch.cat([values, pooled_v], 2)
    probs = torch.softmax(logits, -1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query that sees nothing gives 0
    return (probs @ values).to(q.dtype)
