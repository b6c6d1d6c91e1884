"""CPU fast path for block-sparse attention: every query block attends to its selected key blocks
only, with two engines behind one function, :func:`gather_block_sparse_attention`.

- **Native kernel** (fp32, the default on the CPU): :mod:`fastgen.kernels.cpu_attn`, a C++
  FlashAttention-2 style forward built on first use. A whole 128-row query block is one work item;
  its key blocks are found through an index table (nothing gathered up front), slots past
  a query block's count are skipped rather than masked, and peak memory is the output (no LSE
  unless asked). ``fastgen bench attention --target`` (12 x 14,080 x 128 fp32, 15% density,
  2 cores): 5.8-6.3x over SDPA, 0.89-0.98 of the ideal 1/density, peak memory at SDPA's.
- **Slabs** (other dtypes, or when the kernel cannot be built; logged once): per chunk of query
  blocks, ``index_select`` their selected K/V blocks into contiguous slabs ``[c, 1, L, D]`` and run
  PyTorch's fused ``_scaled_dot_product_flash_attention_for_cpu`` with the ``c`` query blocks as its
  batch; query blocks selecting fewer than ``max_k`` blocks and partial key blocks are masked with
  an additive ``-inf`` bias. The slab budget (``FASTGEN_GATHER_CHUNK_MB``, default 16 MiB) bounds
  memory above the output. This reached 0.66-0.70 of the ideal: PyTorch's kernel splits a 128-row
  query into 32-row pieces (its split depends on the query length: 107 GFLOP/s at 128 queries vs
  135 at 768), which is what the native kernel's whole-block work items avoid.

Nothing ``N x N`` is allocated by either. Rectified attention (exact form) adds its text, pooled
and isolated keys as ``extra_k`` with a per-query-block ``extra_bias``, so the whole
mixed-resolution softmax is one pass; :func:`extended_key_buffer` lets the caller place them
right after k/v (no copy), ``kv_length`` masks a tail the caller padded once, and ``scatter_out``
writes each query row straight to its final (un-permuted) place.
"""

from __future__ import annotations

import logging
import os

import torch

from fastgen._validation import log_once as _log_once

from .blocks import block_mask_to_indices, num_blocks, pad_to_blocks
from .workspace import Workspace

logger = logging.getLogger(__name__)


def _chunk_rows(max_k: int, block_size: int, head_dim: int, element_size: int, input_bytes: int) -> int:
    """Query blocks per chunk so the gathered K/V slabs fit the budget: ``FASTGEN_GATHER_CHUNK_MB``
    (default 16 MiB), never more than the size of q itself."""
    budget = min(float(os.environ.get("FASTGEN_GATHER_CHUNK_MB", "16")) * 2**20, max(input_bytes, 1 << 20))
    keys = max_k * block_size
    per_row = 2 * keys * head_dim * element_size
    return max(1, int(budget // per_row))


def _kernel_unavailable() -> str | None:
    from fastgen.kernels.cpu_attn import cpu_kernel_unavailable

    return cpu_kernel_unavailable()


@torch.compiler.assume_constant_result
def _kernel_unavailable_when_traced() -> str | None:
    """:func:`cpu_kernel_unavailable` as a constant of a ``torch.compile`` trace (the build, its lock
    files and ``FASTGEN_CPU_KERNEL`` are read once, when the graph is traced)."""
    return _kernel_unavailable()


def native_kernel_serves(*tensors: torch.Tensor) -> bool:
    """Whether the native CPU kernel (fp32, forward only) serves a call on these tensors; logs once
    when fp32 CPU tensors cannot use it."""
    if not all(x.device.type == "cpu" and x.dtype == torch.float32 for x in tensors):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False  # forward only: PyTorch's flash kernel keeps gradients
    why = _kernel_unavailable_when_traced() if torch.compiler.is_compiling() else _kernel_unavailable()
    if why is not None:
        _log_once(
            logger,
            f"fastgen: native CPU block-sparse kernel unavailable ({why}); using PyTorch's flash kernel on gathered blocks",
        )
        return False
    return True


def _block_lengths(n: int, n_blocks: int, bs: int) -> torch.Tensor:
    """Valid tokens of each of ``n_blocks`` blocks of ``bs`` over ``n`` tokens, int32 (0 past ``n``)."""
    return (n - torch.arange(n_blocks) * bs).clamp(0, bs).to(torch.int32)


def _flat_block_indices(indices: torch.Tensor, nqb: int, nkb: int) -> torch.Tensor:
    """``indices [B, H, nqb, K]`` (key blocks within a head) as int32 rows ``[B*H*nqb, K]`` of the
    ``[B*H*nkb]`` key blocks of all heads."""
    rows = indices.shape[0] * indices.shape[1] * nqb
    first = torch.arange(rows, dtype=torch.int32, device=indices.device) // nqb * nkb  # head's first
    return indices.view(rows, -1) + first[:, None]


def _native_attention(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    flat_idx: torch.Tensor,
    counts: torch.Tensor,
    extra_bias: torch.Tensor | None,
    nk: int,
    nkb: int,
    real_blocks: int,
    scale: float,
    scatter_out: tuple[torch.Tensor, torch.Tensor] | None,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The native kernel on the block-major tensors :func:`gather_block_sparse_attention` built:
    key blocks are found through the index table, slots past a query block's count are skipped (not masked), a
    partial or cut-off key block is shortened, extra-key slots take ``extra_bias``. Returns
    ``(out [R, bs, D], lse [R, bs] or None)``, or ``(dest, None)`` with ``scatter_out``."""
    from fastgen.kernels.cpu_attn import block_sparse_attention_cpu

    bs = q_blocks.shape[1]
    block_len = None
    if nk != nkb * bs:  # partial last key block, or keys cut at kv_length
        block_len = torch.full((k_blocks.shape[0],), bs, dtype=torch.int32)  # extra blocks: whole
        block_len[:real_blocks] = _block_lengths(nk, nkb, bs).repeat(real_blocks // nkb)
    dest, dest_rows = scatter_out if scatter_out is not None else (None, None)
    return block_sparse_attention_cpu(
        q_blocks,
        k_blocks,
        v_blocks,
        flat_idx,
        counts,
        scale,
        block_size=bs,
        block_len=block_len,
        bias=extra_bias,
        out=dest,
        out_rows=dest_rows,
        return_lse=return_lse and scatter_out is None,
    )


def _native_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    bs: int,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The native kernel on q/k/v as they are (``[B*H*N, D]`` rows, no padding to whole blocks):
    each query / key block is given by its first row and its length, so a partial last block is
    just a shorter one. ``indices``/``counts`` as from :func:`block_mask_to_indices`."""
    from fastgen.kernels.cpu_attn import block_sparse_attention_cpu

    b, h, nq, d = q.shape
    nk = k.shape[2]
    nqb, nkb = num_blocks(nq, bs), num_blocks(nk, bs)
    heads = torch.arange(b * h, dtype=torch.int64)[:, None]

    def starts_and_lengths(n: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = (heads * n + torch.arange(n_blocks, dtype=torch.int64) * bs).reshape(-1)
        return starts, _block_lengths(n, n_blocks, bs).repeat(b * h)

    q_start, q_len = starts_and_lengths(nq, nqb)
    k_start, k_len = starts_and_lengths(nk, nkb)
    out, lse = block_sparse_attention_cpu(
        q.reshape(b * h * nq, d),
        k.reshape(b * h * nk, d),
        v.reshape(b * h * nk, d),
        _flat_block_indices(indices, nqb, nkb),
        counts.view(-1),
        scale,
        block_size=bs,
        block_len=k_len,
        return_lse=return_lse,
        k_start=k_start,
        q_start=q_start,
        q_len=q_len,
    )
    return out.view(b, h, nq, d), None if lse is None else lse.view(b, h, nq)


def extended_key_buffer(
    b: int,
    h: int,
    n: int,
    n_extra: int,
    d: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    workspace: Workspace | None = None,
    name: str = "keys",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(keys [B, H, n, D], extra [B, H, ceil(n_extra/bs)*bs, D])`` views of one buffer,
    extra right after keys: given as ``k`` and ``extra_k`` to :func:`gather_block_sparse_attention`
    (``n`` a block multiple), the extra keys join the gather source without a copy. Every element of
    both views must be written by the caller (padding of ``extra`` included). The buffer is
    ``workspace``'s ``name`` when a workspace is given."""
    extra = num_blocks(n_extra, block_size) * block_size
    shape = (b * h * (n + extra), d)
    buffer = (
        workspace.empty(name, shape, dtype, device)
        if workspace is not None
        else torch.empty(shape, dtype=dtype, device=device)
    )
    return buffer[: b * h * n].view(b, h, n, d), buffer[b * h * n :].view(b, h, extra, d)


def _joined_blocks(blocks: torch.Tensor, extra: torch.Tensor, extra_blocks: int, bs: int) -> torch.Tensor:
    """``[B*H*nkb + B*H*extra_blocks, bs, D]``: ``blocks`` then the blocks of ``extra`` ``[B, H, P, D]``
    (zero-padded to whole blocks); a view when ``extra`` comes from :func:`extended_key_buffer`."""
    d = blocks.shape[-1]
    b, h = extra.shape[:2]
    size = extra_blocks * bs
    if (
        not torch.compiler.is_compiling()  # no data pointers in a trace: the compiler plans memory
        and extra.dtype == blocks.dtype
        and extra.shape[2] == size
        and extra.is_contiguous()
        and extra.data_ptr() == blocks.data_ptr() + blocks.numel() * blocks.element_size()
        and extra.untyped_storage().data_ptr() == blocks.untyped_storage().data_ptr()
    ):
        rows = blocks.shape[0] + b * h * extra_blocks
        return blocks.as_strided((rows, bs, d), (bs * d, d, 1))
    pad = size - extra.shape[2]
    extra = torch.nn.functional.pad(extra.to(blocks.dtype), (0, 0, 0, pad)) if pad else extra.to(blocks.dtype)
    return torch.cat([blocks, extra.reshape(b * h * extra_blocks, bs, d)])


def gather_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: int,
    scale: float,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`gather_attention` with the selection given as a bool ``block_mask`` ``[B or 1, H, nqb, nkb]``."""
    indices, counts = block_mask_to_indices(block_mask.expand(q.shape[0], -1, -1, -1))
    return gather_attention(q, k, v, indices, counts, block_size, scale, **options)


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    kv_length: int | None = None,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_bias: torch.Tensor | None = None,
    scatter_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention by gathering selected key blocks; returns ``(out, lse)``.

    q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]``; ``indices`` int32 ``[B, H, nqb, K]`` / ``counts``
    ``[B, H, nqb]`` the selected key blocks (as :func:`block_mask_to_indices` gives them).
    ``kv_length``: keys at and after this position are padding (a caller that padded k/v to a
    block multiple once). ``extra_k``/``extra_v`` ``[B, H, P', D]`` with ``extra_bias`` fp32
    ``[B, H, nqb, P]`` (``P <= P'``, the rows after ``P`` ignored): extra keys in the same softmax,
    with logit ``q·k·scale + bias`` for each query block (``-inf`` hides one) — the packed form of
    a plan's extra keys (:meth:`SelectionPlan.extra_bias`).
    ``scatter_out = (dest [M, D], rows [B*H*nqb*bs] long)``: query row ``i`` (queries padded to whole
    blocks) is written to ``dest[rows[i]]`` straight from the kernel (an un-permute for free); then
    ``(dest, None)`` is returned and no LSE is kept. ``return_lse=False`` may skip the LSE (None).

    fp32 on the CPU runs the native kernel (:mod:`fastgen.kernels.cpu_attn`) on the block views
    built here, without gathering; other dtypes (or no compiler) use PyTorch's flash kernel on
    gathered slabs.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2] if kv_length is None else int(kv_length)
    bs = block_size
    nqb, nkb = num_blocks(nq, bs), num_blocks(k.shape[2], bs)
    if extra_k is None and scatter_out is None and kv_length is None and native_kernel_serves(q, k, v):
        return _native_rows(q, k, v, indices, counts, bs, scale, return_lse)
    rows = b * h * nqb

    def blocks_of(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        return pad_to_blocks(x, bs).reshape(b * h * n_blocks, bs, d)

    q_blocks = blocks_of(q, nqb)  # [R, bs, D]
    k_blocks, v_blocks = blocks_of(k, nkb), blocks_of(v, nkb)  # [B*H*nkb, bs, D]
    flat_idx = _flat_block_indices(indices, nqb, nkb)  # int32 rows of k_blocks
    counts_flat = counts.view(rows)
    extra_blocks = 0
    if extra_k is not None:  # extra keys become whole blocks after k's, padded with -inf bias
        extra_blocks = num_blocks(extra_k.shape[2], bs)
        k_blocks = _joined_blocks(k_blocks, extra_k, extra_blocks, bs)
        v_blocks = _joined_blocks(v_blocks, extra_v, extra_blocks, bs)
        flat_idx, extra_bias = _extra_slots(flat_idx, extra_bias, (b, h, nqb, nkb), extra_blocks, bs)
    if native_kernel_serves(q, k, v):
        extra = extra_bias if extra_blocks else None
        blocks = (q_blocks, k_blocks, v_blocks)
        real_blocks = b * h * nkb
        out, lse = _native_attention(
            *blocks, flat_idx, counts_flat, extra, nk, nkb, real_blocks, scale, scatter_out, return_lse
        )
    else:
        key_bias = _slot_bias(indices, counts_flat, extra_bias if extra_blocks else None, nk, k.shape[2], bs)
        empty = counts == 0  # query blocks that attend to nothing: output 0 (and lse -inf)
        if extra_blocks:
            empty = empty & torch.isinf(extra_bias).all(-1).view(b, h, nqb)
        input_bytes = q.numel() * q.element_size()
        blocks = (q_blocks, k_blocks, v_blocks)
        out, lse = _flash_rows(*blocks, flat_idx, key_bias, empty.view(rows), scale, scatter_out, input_bytes)
    if scatter_out is not None:
        return out, None
    out = out.view(b, h, nqb * bs, d)[:, :, :nq]
    return out, None if lse is None else lse.view(b, h, nqb * bs)[:, :, :nq]


def _extra_slots(flat_idx, extra_bias, shape, extra_blocks: int, bs: int):
    """The index rows and bias of the extra-key blocks joined after the ``B*H*nkb`` key blocks
    (``shape = (B, H, nqb, nkb)``): each query block's row gains its head's ``extra_blocks`` blocks,
    and ``extra_bias`` ``[B, H, nqb, P]`` becomes fp32 ``[R, extra_blocks * bs]`` padded with -inf."""
    b, h, nqb, nkb = shape
    rows = b * h * nqb
    device = flat_idx.device
    n_extra = extra_bias.shape[-1]  # extra_k may hold more (padding) rows, hidden by the bias
    first = b * h * nkb + torch.arange(rows, dtype=torch.int32, device=device) // nqb * extra_blocks
    extra_idx = first[:, None] + torch.arange(extra_blocks, dtype=torch.int32, device=device)
    flat_idx = torch.cat([flat_idx, extra_idx], dim=1)
    extra_bias = extra_bias.float().expand(b, h, nqb, n_extra).reshape(rows, n_extra)
    extra_bias = torch.nn.functional.pad(extra_bias, (0, extra_blocks * bs - n_extra), value=float("-inf"))
    return flat_idx, extra_bias


def _slot_bias(indices, counts_flat, extra_bias, nk: int, n_keys: int, bs: int) -> torch.Tensor | None:
    """fp32 ``[R, slots * bs]`` logit bias of the gathered keys: -inf on slots past a row's count and
    on keys at or after ``nk`` (only where the selection is ragged), then ``extra_bias`` for the extra
    slots; None when nothing needs masking (``n_keys``: keys in k, padding included)."""
    rows, max_k = counts_flat.shape[0], indices.shape[-1]
    device = indices.device
    # no host reads in a trace: there every row is masked
    ragged = (
        torch.compiler.is_compiling() or nk % bs != 0 or nk != n_keys or bool((counts_flat != max_k).any())
    )
    if not ragged and extra_bias is None:
        return None
    key_bias = torch.zeros(rows, max_k * bs, dtype=torch.float32, device=device)
    if ragged:
        slot_ok = torch.arange(max_k, device=device)[None, :] < counts_flat[:, None]  # [R, K]
        tok = indices.view(rows, max_k).long()[..., None] * bs + torch.arange(bs, device=device)
        key_bias.masked_fill_(~(slot_ok[..., None] & (tok < nk)).view(rows, -1), float("-inf"))
    if extra_bias is not None:
        key_bias = torch.cat([key_bias, extra_bias], dim=1)  # [R, L]
    return key_bias


def _flash_rows(
    q_blocks, k_blocks, v_blocks, flat_idx, key_bias, empty_rows, scale, scatter_out, input_bytes
):
    """PyTorch's CPU flash kernel over the key blocks each query block selected (``flat_idx``
    ``[R, slots]``), gathered into slabs a chunk of rows at a time; rows in ``empty_rows`` give 0 (lse
    -inf); ``input_bytes`` (the size of q) bounds a chunk's slabs. Returns ``(out [R, bs, D], lse
    [R, bs])``, or ``(dest, None)`` with ``scatter_out``."""
    rows, bs, d = q_blocks.shape
    slots = flat_idx.shape[1]
    keys = slots * bs
    dtype, device = q_blocks.dtype, q_blocks.device
    if scatter_out is None:
        out = torch.empty(rows, bs, d, dtype=dtype, device=device)
        lse = torch.empty(rows, bs, dtype=torch.float32, device=device)
    else:
        dest, dest_rows = scatter_out
    chunk = min(rows, _chunk_rows(slots, bs, d, q_blocks.element_size(), input_bytes))
    k_slab = torch.empty(chunk * slots, bs, d, dtype=dtype, device=device)
    v_slab = torch.empty_like(k_slab)
    for start in range(0, rows, chunk):
        c = min(chunk, rows - start)
        sl = slice(start, start + c)
        idx = flat_idx[sl].reshape(-1)
        kg = torch.index_select(k_blocks, 0, idx, out=k_slab[: c * slots]).view(c, 1, keys, d)
        vg = torch.index_select(v_blocks, 0, idx, out=v_slab[: c * slots]).view(c, 1, keys, d)
        bias = None if key_bias is None else key_bias[sl].view(c, 1, 1, keys)  # fp32 for any q dtype
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_blocks[sl].view(c, 1, bs, d), kg, vg, 0.0, False, attn_mask=bias, scale=scale
        )
        o = o.view(c, bs, d).masked_fill_(empty_rows[sl, None, None], 0.0)  # no host read
        if scatter_out is None:
            out[sl] = o
            lse[sl] = l.view(c, bs).masked_fill_(empty_rows[sl, None], float("-inf"))
        else:
            dest.index_copy_(0, dest_rows[start * bs : (start + c) * bs], o.view(c * bs, d))
    return (dest, None) if scatter_out is not None else (out, lse)
