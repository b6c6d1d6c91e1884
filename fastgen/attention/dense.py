"""Dense attention: the reference every sparse path in fastgen is checked against."""

from __future__ import annotations

import math

import torch

from ._checks import check_key_padding_mask, check_qkv


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    scale: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Full softmax attention in fp32, materialising the score matrix (reference only).

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, H, Nk, D]``.
        key_padding_mask: optional bool ``[B, Nk]``, True for real keys.
        return_lse: also return the natural-log log-sum-exp of the scaled scores, ``[B, H, Nq]`` fp32.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``out`` ``[B, H, Nq, D]`` in q's dtype (and ``lse`` when asked). Rows with no valid key are 0
        with ``lse = -inf``.

    Example:
        >>> import torch
        >>> from fastgen.attention import dense_attention
        >>> q, k, v = torch.randn(3, 1, 2, 100, 32).unbind(0)  # [B, H, N, D] each
        >>> out = dense_attention(q, k, v)
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)
        True
        >>> real_keys = torch.arange(100)[None] < 90  # the last 10 keys are padding
        >>> out, lse = dense_attention(q, k, v, key_padding_mask=real_keys, return_lse=True)
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 100, 32]), torch.Size([1, 2, 100]))
    """
    check_qkv(q, k, v)
    check_key_padding_mask(key_padding_mask, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return (out, lse) if return_lse else out
