"""CPU fast path for block-sparse attention: gather each query block's selected K/V blocks into a
contiguous slab and run PyTorch's fused CPU flash-attention kernel on all the slabs of a chunk.

Per chunk of query blocks (rows of ``B*H*nqb``), with ``L = max_k * block_size`` gathered keys:
``K_g, V_g = index_select(K blocks)`` ``[c, 1, L, D]`` into slabs allocated once per call and reused,
then one ``_scaled_dot_product_flash_attention_for_cpu`` call with the ``c`` query blocks as its
batch. Work is proportional to the selected blocks only; memory is bounded by the slab budget
(``FASTGEN_GATHER_CHUNK_MB``, default 16 MiB, never more than the size of q), so nothing ``N x N``
is ever allocated. Query blocks selecting fewer than ``max_k`` blocks (and a partial last key
block) are masked with an additive ``-inf`` bias.

What was measured on a shared, heavily loaded 2-core CPU (``fastgen bench attention --target``,
12 x 14,080 x 128 fp32, 15% density): ~3.5x over SDPA (0.53 of the ideal 1/density), about the same
as compiled FlexAttention. The gather copies cost ~10% of the sparse time; the rest is the kernel.
Replacing the fused kernel by batched MKL products (``S = q Kᵀ``, in-place softmax, ``P V``) was
as fast on a quiet machine and much slower under load, because every small op is a fork/join of
the OpenMP team while one fused call per chunk is a single one; so each chunk is one kernel call.
Peak memory is the output plus the slab budget: above SDPA's (about the output alone) by that
budget; FlexAttention needs no slabs.
"""

from __future__ import annotations

import os

import torch

from .blocks import block_mask_to_indices, num_blocks


def _chunk_rows(max_k: int, block_size: int, head_dim: int, element_size: int, input_bytes: int) -> int:
    """Query blocks per chunk so the gathered K/V slabs fit the budget: ``FASTGEN_GATHER_CHUNK_MB``
    (default 16 MiB), never more than the size of q itself."""
    budget = min(float(os.environ.get("FASTGEN_GATHER_CHUNK_MB", "16")) * 2**20, max(input_bytes, 1 << 20))
    keys = max_k * block_size
    per_row = 2 * keys * head_dim * element_size
    return max(1, int(budget // per_row))


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
    keys = max_k * bs
    rows = b * h * nqb
    device = q.device

    def blocks_of(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        pad = n_blocks * bs - x.shape[2]
        if pad:  # only for lengths that are not a multiple of the block size
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(b * h * n_blocks, bs, d)

    q_blocks = blocks_of(q, nqb)  # [R, bs, D]
    k_blocks, v_blocks = blocks_of(k, nkb), blocks_of(v, nkb)  # [B*H*nkb, bs, D]
    flat_idx = indices.view(rows, max_k).long() + (torch.arange(rows, device=device) // nqb * nkb)[:, None]
    counts_flat = counts.view(rows)
    ragged = bool((counts_flat != max_k).any()) or nk % bs != 0
    if ragged:
        slot_ok = torch.arange(max_k, device=device)[None, :] < counts_flat[:, None]  # [R, K]
        tok = indices.view(rows, max_k).long()[..., None] * bs + torch.arange(bs, device=device)
        key_dropped = ~(slot_ok[..., None] & (tok < nk)).view(rows, 1, keys)  # [R, 1, L]

    out = torch.empty(rows, bs, d, dtype=q.dtype, device=device)
    lse = torch.empty(rows, bs, dtype=torch.float32, device=device)
    chunk = min(rows, _chunk_rows(max_k, bs, d, q.element_size(), q.numel() * q.element_size()))
    k_slab = torch.empty(chunk * max_k, bs, d, dtype=q.dtype, device=device)
    v_slab = torch.empty_like(k_slab)
    for start in range(0, rows, chunk):
        c = min(chunk, rows - start)
        sl = slice(start, start + c)
        idx = flat_idx[sl].reshape(-1)
        kg = torch.index_select(k_blocks, 0, idx, out=k_slab[: c * max_k]).view(c, 1, keys, d)
        vg = torch.index_select(v_blocks, 0, idx, out=v_slab[: c * max_k]).view(c, 1, keys, d)
        bias = None
        if ragged:
            bias = torch.zeros(c, 1, 1, keys, dtype=q.dtype, device=device)
            bias.masked_fill_(key_dropped[sl].view(c, 1, 1, keys), float("-inf"))
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_blocks[sl].view(c, 1, bs, d), kg, vg, 0.0, False, attn_mask=bias, scale=scale
        )
        out[sl] = o.view(c, bs, d)
        lse[sl] = l.view(c, bs)
    out = out.view(b, h, nqb * bs, d)[:, :, :nq]
    lse = lse.view(b, h, nqb * bs)[:, :, :nq]
    empty = (counts == 0).repeat_interleave(bs, dim=-1)[..., :nq]
    if bool(empty.any()):
        out = out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse
