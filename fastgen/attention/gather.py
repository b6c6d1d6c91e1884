"""CPU fast path for block-sparse attention: gather each query block's selected K/V blocks into a
contiguous slab and run PyTorch's fused CPU attention kernel on it.

Work is proportional to the selected blocks only; memory is bounded by processing query blocks in
chunks (``FASTGEN_GATHER_CHUNK_MB``, default 64 MiB of gathered K/V at a time), so nothing of size
N x N is ever allocated.
"""

from __future__ import annotations

import os

import torch

from .blocks import block_mask_to_indices, num_blocks


def _fused_attention(q, k, v, attn_mask, scale):
    """Fused attention returning (out, lse); lse is natural-log, fp32."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
    )
    return out, lse.float()


def gather_block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, block_size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention by gathering selected key blocks; returns ``(out, lse)``.

    q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]``, block_mask bool ``[B or 1, H, nqb, nkb]``.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    bs = block_size
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    indices, counts = block_mask_to_indices(block_mask.expand(b, -1, -1, -1))
    max_k = indices.shape[-1]
    rows = b * h * nqb

    def blocks_of(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        pad = n_blocks * bs - x.shape[2]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(b * h * n_blocks, bs * d)

    q_blocks = blocks_of(q, nqb).view(rows, 1, bs, d)
    k_blocks, v_blocks = blocks_of(k, nkb), blocks_of(v, nkb)
    flat_idx = indices.view(rows, max_k).long() + (torch.arange(rows, device=q.device) // nqb * nkb)[:, None]
    counts_flat = counts.view(rows)
    ragged = bool((counts_flat != max_k).any()) or nk % bs != 0
    if ragged:
        slot_ok = torch.arange(max_k, device=q.device)[None, :] < counts_flat[:, None]  # [R, K]
        tok = indices.view(rows, max_k).long()[..., None] * bs + torch.arange(bs, device=q.device)
        key_ok = (slot_ok[..., None] & (tok < nk)).view(rows, 1, 1, max_k * bs)

    out = torch.empty(rows, 1, bs, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(rows, 1, bs, dtype=torch.float32, device=q.device)
    budget = int(os.environ.get("FASTGEN_GATHER_CHUNK_MB", "64")) << 20
    per_row = 2 * max_k * bs * d * q.element_size()
    chunk = max(1, budget // per_row)
    for start in range(0, rows, chunk):
        sl = slice(start, min(rows, start + chunk))
        idx = flat_idx[sl].reshape(-1)
        kg = k_blocks.index_select(0, idx).view(-1, 1, max_k * bs, d)
        vg = v_blocks.index_select(0, idx).view(-1, 1, max_k * bs, d)
        mask = None
        if ragged:
            mask = torch.zeros(key_ok[sl].shape, dtype=q.dtype, device=q.device)
            mask.masked_fill_(~key_ok[sl], float("-inf"))
        o, l = _fused_attention(q_blocks[sl], kg, vg, mask, scale)
        out[sl], lse[sl] = o, l
    out = out.view(b, h, nqb * bs, d)[:, :, :nq]
    lse = lse.view(b, h, nqb * bs)[:, :, :nq]
    empty = (counts == 0).repeat_interleave(bs, dim=-1)[..., :nq]
    if bool(empty.any()):
        out = out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse
