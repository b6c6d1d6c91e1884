"""Rectified SpaAttn's exact form in one Triton pass (FlashAttention-2 style forward).

Rectified SpaAttn (``fastgen/attention/rectified.py``) gives each video query one softmax over a
mixed-resolution key set: (a) the tokens of its query block's selected key blocks, (b) the text
keys (padded ones excluded) and (c) one pooled key ``k̄_J`` per compensated dropped block ``J``,
with logit ``sm_scale·q·k̄_J + log n_J`` and value ``v̄_J``. The torch path computes the three
parts separately and merges them through their log-sum-exps; this kernel walks all three with a
single fp32 online softmax per query tile, so nothing but ``out`` and ``lse`` is written.

Layout (the derivation is in ``kernels/README.md``):

- ``_rectified_exact_attn_fwd_kernel``: the Triton kernel (wrapped with ``triton.jit`` on first
  use). One program per (query tile, batch * head). It loads its query tile once, walks the
  selected key blocks of its query block (index table, as the block-sparse kernel), then the
  text keys in tiles, then the compensated pooled keys (a second index table) in tiles.
- ``_online_softmax_update`` and ``_normalize``: the base-2 online-softmax step and its end, shared with
  the block-sparse kernel (defined and jitted in ``block_sparse_attn.py``).
- ``_rectified_exact_attn_fwd``: host launcher. Validates, casts, picks tiles, launches.
- ``rectified_exact_attention_triton``: the thin public function.

Triton is imported on the first call (see ``block_sparse_attn.py``): importing this module never
imports Triton, so ``TRITON_INTERPRET=1`` can be set any time before the first kernel call.
"""

from __future__ import annotations

import math

import torch

from . import block_sparse_attn as _bsa
from .block_sparse_attn import _op_defined

triton = None  # the ``triton`` module once loaded
tl = None  # ``triton.language`` once loaded; the kernel bodies resolve it here
_online_softmax_update = None  # the block-sparse module's jitted ``_online_softmax_update_fn`` once loaded
_normalize = None  # the block-sparse module's jitted ``_normalize_fn`` once loaded
_jitted_kernel = None

__all__ = ["rectified_exact_attention_triton"]

_LOG2_E = 1.4426950408889634


def _rectified_exact_attn_fwd_kernel(
    Q,
    K,
    V,
    TEXT_K,
    TEXT_V,
    TEXT_BIAS,
    POOLED_K,
    POOLED_V,
    POOLED_LOG_COUNTS,
    Out,
    LSE,
    KV_BLOCK_INDICES,
    KV_BLOCK_COUNTS,
    POOLED_BLOCK_INDICES,
    POOLED_BLOCK_COUNTS,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_tkb,
    stride_tkh,
    stride_tkn,
    stride_tkd,
    stride_tvb,
    stride_tvh,
    stride_tvn,
    stride_tvd,
    stride_tbb,
    stride_tbn,
    stride_pkb,
    stride_pkh,
    stride_pkn,
    stride_pkd,
    stride_pvb,
    stride_pvh,
    stride_pvn,
    stride_pvd,
    stride_lcb,
    stride_lch,
    stride_lcn,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_lb,
    stride_lh,
    stride_ln,
    stride_ib,
    stride_ih,
    stride_iq,
    stride_ik,
    stride_cb,
    stride_ch,
    stride_cq,
    stride_pib,
    stride_pih,
    stride_piq,
    stride_pik,
    stride_pcb,
    stride_pch,
    stride_pcq,
    num_heads,
    q_len,
    kv_len,
    text_len,
    qk_scale_log2,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Forward tile: Out[b, h, tile] and LSE[b, h, tile] for one query tile over the three key sets.

    ``BLOCK_M`` and ``BLOCK_N`` divide ``BLOCK_SIZE``; text keys are walked in ``BLOCK_N`` tiles and
    pooled keys in ``BLOCK_P`` tiles of the compensated-block list. ``qk_scale_log2`` is
    ``sm_scale * log2(e)``; ``POOLED_LOG_COUNTS`` and ``TEXT_BIAS`` hold natural-log biases
    (``-inf`` = no key). ``DOT_IN_FP32`` as in the block-sparse kernel.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    query_block = (pid_m * BLOCK_M) // BLOCK_SIZE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    offs_p = tl.arange(0, BLOCK_P)  # [BP]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_valid = offs_m < q_len  # [BM]

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=q_valid[:, None], other=0.0)  # [BM, D]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BM] running max (log2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM] running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # [BM, D]

    # (a) selected full key blocks
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    num_selected = tl.load(KV_BLOCK_COUNTS + b * stride_cb + h * stride_ch + query_block * stride_cq)
    index_base = KV_BLOCK_INDICES + b * stride_ib + h * stride_ih + query_block * stride_iq
    for i in range(0, num_selected):
        key_block = tl.load(index_base + i * stride_ik)
        for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
            offs_kv = key_block * BLOCK_SIZE + sub * BLOCK_N + offs_n  # [BN]
            kv_valid = offs_kv < kv_len  # [BN]
            k = tl.load(
                k_base + offs_kv[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=kv_valid[None, :],
                other=0.0,
            )  # [D, BN]
            if DOT_IN_FP32:
                k = k.to(tl.float32)
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2  # [BM, BN]
            scores = tl.where(kv_valid[None, :], scores, float("-inf"))
            v = tl.load(
                v_base + offs_kv[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_valid[:, None],
                other=0.0,
            )  # [BN, D]
            m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc, DOT_PRECISION, DOT_IN_FP32)

    # (b) text keys, dense; TEXT_BIAS is 0 for real and -inf for padded keys
    tk_base = TEXT_K + b * stride_tkb + h * stride_tkh
    tv_base = TEXT_V + b * stride_tvb + h * stride_tvh
    for start in range(0, text_len, BLOCK_N):
        offs_t = start + offs_n  # [BN]
        t_valid = offs_t < text_len  # [BN]
        text_bias = tl.load(
            TEXT_BIAS + b * stride_tbb + offs_t * stride_tbn, mask=t_valid, other=float("-inf")
        )
        k = tl.load(
            tk_base + offs_t[None, :] * stride_tkn + offs_d[:, None] * stride_tkd,
            mask=t_valid[None, :],
            other=0.0,
        )  # [D, BN]
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2  # [BM, BN]
        scores = tl.where(text_bias[None, :] == 0.0, scores, float("-inf"))
        v = tl.load(
            tv_base + offs_t[:, None] * stride_tvn + offs_d[None, :] * stride_tvd,
            mask=t_valid[:, None],
            other=0.0,
        )  # [BN, D]
        m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc, DOT_PRECISION, DOT_IN_FP32)

    # (c) one pooled key per compensated block: logit sm_scale·q·k̄_J + log n_J, value v̄_J
    pk_base = POOLED_K + b * stride_pkb + h * stride_pkh
    pv_base = POOLED_V + b * stride_pvb + h * stride_pvh
    lc_base = POOLED_LOG_COUNTS + b * stride_lcb + h * stride_lch
    num_pooled = tl.load(POOLED_BLOCK_COUNTS + b * stride_pcb + h * stride_pch + query_block * stride_pcq)
    pooled_index_base = POOLED_BLOCK_INDICES + b * stride_pib + h * stride_pih + query_block * stride_piq
    for start in range(0, num_pooled, BLOCK_P):
        entry_valid = start + offs_p < num_pooled  # [BP]
        pooled_block = tl.load(pooled_index_base + (start + offs_p) * stride_pik, mask=entry_valid, other=0)
        log_count = tl.load(
            lc_base + pooled_block * stride_lcn, mask=entry_valid, other=float("-inf")
        )  # [BP]
        k = tl.load(
            pk_base + pooled_block[None, :] * stride_pkn + offs_d[:, None] * stride_pkd,
            mask=entry_valid[None, :],
            other=0.0,
        )  # [D, BP]
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2  # [BM, BP]
        scores = scores + log_count[None, :] * 1.4426950408889634  # log n_J in base 2
        scores = tl.where(log_count[None, :] > float("-inf"), scores, float("-inf"))
        v = tl.load(
            pv_base + pooled_block[:, None] * stride_pvn + offs_d[None, :] * stride_pvd,
            mask=entry_valid[:, None],
            other=0.0,
        )  # [BP, D]
        m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc, DOT_PRECISION, DOT_IN_FP32)

    out, lse = _normalize(m_i, l_i, acc)

    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_valid[:, None])
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_ln, lse, mask=q_valid)


def _load_kernel():
    """Import Triton (through the block-sparse module, which jits the shared helpers) and jit the kernel (once)."""
    global triton, tl, _online_softmax_update, _normalize, _jitted_kernel
    if _jitted_kernel is None:
        _bsa._load_kernel()  # imports Triton, or raises the RuntimeError that names the fallback
        triton, tl = _bsa.triton, _bsa.tl
        _online_softmax_update, _normalize = _bsa._online_softmax_update, _bsa._normalize
        _jitted_kernel = triton.jit(_rectified_exact_attn_fwd_kernel)
    return _jitted_kernel


def _per_head(x: torch.Tensor, batch: int, heads: int, name: str) -> torch.Tensor:
    """``[B, NKB]`` or ``[B, H, NKB]`` -> a ``[B, H, NKB]`` (possibly stride-0) view."""
    if x.dim() == 2:
        x = x[:, None]
    if not (x.dim() == 3 and x.shape[0] == batch and x.shape[1] in (1, heads)):
        raise ValueError(f"{name} must be [B, NKB] or [B, H, NKB], got {tuple(x.shape)}")
    return x.expand(batch, heads, x.shape[2])


def _rectified_exact_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    pooled_k: torch.Tensor,
    pooled_v: torch.Tensor,
    pooled_block_indices: torch.Tensor,
    pooled_block_counts: torch.Tensor,
    pooled_log_counts: torch.Tensor,
    block_size: int,
    sm_scale: float,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_valid: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_p: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host launcher: validate, cast the pooled/text operands, allocate ``out``/``lse``, launch."""
    kernel = _load_kernel()
    if not (block_size >= 16 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if not (q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        raise ValueError("q, k, v must be [B, H, N, D]")
    batch, heads, q_len, head_dim = q.shape
    if not (k.shape[:2] == (batch, heads) and k.shape[3] == head_dim and v.shape == k.shape):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if head_dim not in _bsa._SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_bsa._SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if q.dtype not in _bsa._SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {_bsa._SUPPORTED_DTYPES}, got {q.dtype}")
    if not (k.dtype == q.dtype and v.dtype == q.dtype):
        raise ValueError("q, k, v must share one dtype")
    if q.device.type != "cuda" and not _bsa._is_interpreted():
        raise RuntimeError(
            f"rectified_exact_attention_triton got {q.device.type} tensors: the Triton kernel needs CUDA, "
            "or TRITON_INTERPRET=1 set before triton is first imported."
        )
    device, dtype = q.device, q.dtype
    num_q_blocks = triton.cdiv(q_len, block_size)

    for name, table, counts in (
        ("kv_block", kv_block_indices, kv_block_counts),
        ("pooled_block", pooled_block_indices, pooled_block_counts),
    ):
        if not (table.dim() == 4 and tuple(table.shape[:3]) == (batch, heads, num_q_blocks)):
            raise ValueError(
                f"{name}_indices must be [B, H, NQB, MAX] = [{batch}, {heads}, {num_q_blocks}, MAX], "
                f"got {tuple(table.shape)}"
            )
        if not (tuple(counts.shape) == (batch, heads, num_q_blocks)):
            raise ValueError(
                f"{name}_counts must be [B, H, NQB] = [{batch}, {heads}, {num_q_blocks}], got {tuple(counts.shape)}"
            )
    kv_block_indices = kv_block_indices.to(device=device, dtype=torch.int32)
    kv_block_counts = kv_block_counts.to(device=device, dtype=torch.int32)
    pooled_block_indices = pooled_block_indices.to(device=device, dtype=torch.int32)
    pooled_block_counts = pooled_block_counts.to(device=device, dtype=torch.int32)

    # pooled keys/values enter the dots in the input dtype, like the full keys; biases stay fp32
    num_pooled = pooled_k.shape[2] if pooled_k.dim() == 4 else -1
    if not (pooled_k.dim() == 4 and pooled_k.shape[:2] == (batch, heads) and pooled_k.shape[3] == head_dim):
        raise ValueError(
            f"pooled_k must be [B, H, NKB, D] = [{batch}, {heads}, NKB, {head_dim}], got {tuple(pooled_k.shape)}"
        )
    pooled_k = pooled_k.to(device=device, dtype=dtype)
    if not (pooled_v.shape == pooled_k.shape):
        raise ValueError(
            f"pooled_v must be [B, H, NKB, D] = {tuple(pooled_k.shape)}, got {tuple(pooled_v.shape)}"
        )
    pooled_v = pooled_v.to(device=device, dtype=dtype)
    pooled_log_counts = _per_head(pooled_log_counts, batch, heads, "pooled_log_counts")
    if not (pooled_log_counts.shape[2] == num_pooled):
        raise ValueError(
            f"pooled_log_counts has {pooled_log_counts.shape[2]} blocks, pooled_k has {num_pooled}"
        )
    pooled_log_counts = pooled_log_counts.to(device=device, dtype=torch.float32)

    if text_k is None or text_k.shape[2] == 0:
        if not (text_v is None or text_v.shape[2] == 0):
            raise ValueError("text_v given without text_k")
        text_len = 0
        text_k = text_v = k[:, :, :1]  # never read
        text_bias = torch.zeros(batch, 1, device=device, dtype=torch.float32)
    else:
        text_len = text_k.shape[2]
        if not (text_v is not None and text_k.shape == text_v.shape == (batch, heads, text_len, head_dim)):
            raise ValueError(
                f"text_k / text_v must both be [B, H, T, D], got {tuple(text_k.shape)} / "
                f"{None if text_v is None else tuple(text_v.shape)}"
            )
        text_k, text_v = text_k.to(device=device, dtype=dtype), text_v.to(device=device, dtype=dtype)
        if text_valid is None:
            text_bias = torch.zeros(batch, text_len, device=device, dtype=torch.float32)
        else:
            if not (tuple(text_valid.shape) == (batch, text_len)):
                raise ValueError(
                    f"text_valid must be [B, T] = [{batch}, {text_len}], got {tuple(text_valid.shape)}"
                )
            zero = torch.zeros((), device=device, dtype=torch.float32)
            text_bias = torch.where(text_valid.to(device=device, dtype=torch.bool), zero, float("-inf"))

    default_m, default_n, num_warps, num_stages = _bsa._launch_config(head_dim, block_size, dtype)
    block_m = block_m or default_m
    block_n = block_n or default_n
    block_p = block_p or block_n
    if not (block_size % block_m == 0 and block_size % block_n == 0):
        raise ValueError(f"tile sizes ({block_m}, {block_n}) must divide block_size {block_size}")
    if not (min(block_m, block_n, block_p) >= 16):
        raise ValueError("tile sizes must be >= 16 (tl.dot minimum)")
    if not (block_p & (block_p - 1) == 0):
        raise ValueError(f"block_p must be a power of two, got {block_p}")

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, q_len), device=device, dtype=torch.float32)
    if q_len == 0 or batch * heads == 0:
        return out, lse

    dot_in_fp32 = dtype == torch.bfloat16 and _bsa._is_interpreted()
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    kernel[grid](
        q,
        k,
        v,
        text_k,
        text_v,
        text_bias,
        pooled_k,
        pooled_v,
        pooled_log_counts,
        out,
        lse,
        kv_block_indices,
        kv_block_counts,
        pooled_block_indices,
        pooled_block_counts,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *text_k.stride(),
        *text_v.stride(),
        *text_bias.stride(),
        *pooled_k.stride(),
        *pooled_v.stride(),
        *pooled_log_counts.stride(),
        *out.stride(),
        *lse.stride(),
        *kv_block_indices.stride(),
        *kv_block_counts.stride(),
        *pooled_block_indices.stride(),
        *pooled_block_counts.stride(),
        heads,
        q_len,
        k.shape[2],
        text_len,
        sm_scale * _LOG2_E,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_P=block_p,
        HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if (dtype == torch.float32 or dot_in_fp32) else "tf32",
        DOT_IN_FP32=dot_in_fp32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse


def rectified_exact_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    pooled_k: torch.Tensor,
    pooled_v: torch.Tensor,
    pooled_block_indices: torch.Tensor,
    pooled_block_counts: torch.Tensor,
    pooled_log_counts: torch.Tensor,
    block_size: int = 128,
    sm_scale: float | None = None,
    *,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified SpaAttn's exact form (selected blocks + text keys + pooled keys) in one Triton pass.

    Each query ``i`` of query block ``I`` gets one softmax over (a) the keys of the key blocks
    listed for ``I``, (b) the text keys (optional; padded ones excluded) and (c) one pooled key per
    compensated block ``J`` listed for ``I``, with logit ``sm_scale·q_i·k̄_J + log n_J`` and value ``v̄_J``.
    (The plan engines pass every extra key, pooled or isolated, as a "pooled" key with its log-weight.)

    Args:
        q: queries ``[B, H, Nq, D]``, fp16 / bf16 / fp32, ``D`` in {16, 32, 64, 128}.
        k, v: full keys / values ``[B, H, Nk, D]``, same dtype as ``q``.
        kv_block_indices: int32 ``[B, H, NQB, MAXK]``, ``NQB = ceil(Nq / block_size)``: the
            selected key blocks of each query block; the first ``kv_block_counts`` entries are read.
        kv_block_counts: int32 ``[B, H, NQB]``.
        pooled_k: pooled keys ``[B, H, NKB, D]`` (any float dtype, cast to ``q.dtype``).
        pooled_v: pooled values ``[B, H, NKB, D]``.
        pooled_block_indices: int32 ``[B, H, NQB, MAXP]``: the compensated blocks (indices into
            ``pooled_k``) of each query block; the first ``pooled_block_counts`` entries are read.
            Must be disjoint from the selected blocks of the same query block.
        pooled_block_counts: int32 ``[B, H, NQB]``.
        pooled_log_counts: fp32 ``[B, NKB]`` or ``[B, H, NKB]``: ``log n_J`` (``-inf`` = no key).
        block_size: tokens per query / key block, a power of two >= 16; last blocks may be partial.
        sm_scale: softmax scale, ``1 / sqrt(D)`` when ``None``.
        text_k, text_v: optional text keys / values ``[B, H, T, D]`` seen by every query.
        text_valid: optional bool ``[B, T]`` (True = real text key).

    Returns:
        ``(out, lse)``: ``out [B, H, Nq, D]`` in ``q.dtype`` and ``lse [B, H, Nq]`` fp32, the natural
        log of the softmax normaliser over all three key sets. Rows with no key get zeros and
        ``lse = -inf``.
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if not torch.compiler.is_compiling():
        _load_kernel()  # Triton missing: its RuntimeError, before the op
    return torch.ops.fastgen.rectified_exact_attention_triton(
        q,
        k,
        v,
        kv_block_indices,
        kv_block_counts,
        pooled_k,
        pooled_v,
        pooled_block_indices,
        pooled_block_counts,
        pooled_log_counts,
        int(block_size),
        float(sm_scale),
        text_k,
        text_v,
        text_valid,
    )


# The launcher as a ``torch.library`` custom op (``torch.ops.fastgen.rectified_exact_attention_triton``):
# ``torch.compile`` traces through it with the fake implementation below (no Triton at trace time).
if not _op_defined(
    "fastgen::rectified_exact_attention_triton"
):  # a second copy of this module keeps the first registration

    @torch.library.custom_op("fastgen::rectified_exact_attention_triton", mutates_args=())
    def _rectified_exact_attention_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_block_indices: torch.Tensor,
        kv_block_counts: torch.Tensor,
        pooled_k: torch.Tensor,
        pooled_v: torch.Tensor,
        pooled_block_indices: torch.Tensor,
        pooled_block_counts: torch.Tensor,
        pooled_log_counts: torch.Tensor,
        block_size: int,
        sm_scale: float,
        text_k: torch.Tensor | None,
        text_v: torch.Tensor | None,
        text_valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of :func:`_rectified_exact_attn_fwd` with the default tiles."""
        return _rectified_exact_attn_fwd(
            q,
            k,
            v,
            kv_block_indices,
            kv_block_counts,
            pooled_k,
            pooled_v,
            pooled_block_indices,
            pooled_block_counts,
            pooled_log_counts,
            block_size,
            sm_scale,
            text_k=text_k,
            text_v=text_v,
            text_valid=text_valid,
        )

    @_rectified_exact_attention_op.register_fake
    def _(q, k, v, *args):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out, q.new_empty(q.shape[:3], dtype=torch.float32)
