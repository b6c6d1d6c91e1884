"""Block-sparse attention forward pass in Triton (FlashAttention-2 style).

This is the kernel behind every sparse method of fastgen (Rectified SpaAttn, Light
Forcing, SparseD): tokens are grouped in blocks of ``block_size`` and each query block
attends only to a list of selected key blocks.

Layout (see ``kernels/README.md`` for the derivation):

- ``_block_sparse_attn_fwd_kernel``: the Triton kernel (wrapped with ``triton.jit`` on
  first use, see below). One program per (query tile, batch * head). It loads its query
  tile once, then walks the list of selected key blocks of its query block (never
  scanning the others) with an fp32 online softmax in base 2, and writes the output and
  the natural-log LSE.
- ``_online_softmax_update`` and ``_normalize``: the base-2 online-softmax step and its end
  (``triton.jit`` too), shared with the Rectified kernel.
- ``_block_sparse_attn_fwd``: host launcher. Validates, picks tile sizes and warps,
  allocates outputs, launches.
- ``block_sparse_attention_triton``: the thin public function.
- ``block_mask_to_indices``: turns a bool block mask into the (indices, counts) lists
  the kernel walks; plain torch, usable without Triton.

Triton is imported on the first kernel call, never at import: importing this module
works without Triton (``HAS_TRITON`` is then ``False`` and the public function raises a
clear ``RuntimeError``) and never imports it. On CPU tensors the kernel runs only under
the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before ``triton`` is first
imported in the process (Triton reads it when its own functions are decorated).
"""

from __future__ import annotations

import importlib.util
import math

import torch

# Triton is imported on the first kernel call (``_load_kernel``), not here: importing
# fastgen never imports Triton, so ``TRITON_INTERPRET`` (read by Triton when it and the
# kernel are decorated) can still be set at any time before the first call.
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
triton = None  # the ``triton`` module once loaded
tl = None  # the ``triton.language`` module once loaded; the kernel body resolves it here
_online_softmax_update = None  # the jitted ``_online_softmax_update_fn`` once loaded (Rectified uses it too)
_normalize = None  # the jitted ``_normalize_fn`` once loaded (Rectified uses it too)
_jitted_kernel = None

__all__ = ["HAS_TRITON", "block_mask_to_indices", "block_sparse_attention_triton"]

_LOG2_E = 1.4426950408889634
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _op_defined(qualname: str) -> bool:
    """Whether the custom op ``namespace::name`` is registered in this process already."""
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def _online_softmax_update_fn(
    scores, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr
):
    """One FlashAttention-2 step: fold a key tile (base-2 ``scores [BM, BN]``, ``v [BN, D]``) into
    the running max ``m_i [BM]``, sum ``l_i [BM]`` and ``acc [BM, D]``; ``-inf`` scores are absent keys.
    Shared by this kernel and the Rectified one (``triton.jit`` on first use, as ``_online_softmax_update``).
    """
    m_new = tl.maximum(m_i, tl.max(scores, 1))  # [BM]
    # a tile with no valid key leaves m_new at -inf: shift by 0 instead of NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BM]
    alpha = tl.math.exp2(m_i - m_shift)  # [BM]
    p = tl.math.exp2(scores - m_shift[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p_cast = p.to(v.dtype)  # [BM, BN] in the input dtype, as FA2
    if DOT_IN_FP32:
        v = v.to(tl.float32)
        p_cast = p_cast.to(tl.float32)
    acc = tl.dot(p_cast, v, acc, input_precision=DOT_PRECISION)  # [BM, D]
    return m_new, l_i, acc


def _normalize_fn(m_i, l_i, acc):
    """The end of the online softmax: ``(out [BM, D], lse [BM])`` (natural log) from the running max, sum and
    accumulator; rows without keys get zeros and ``-inf`` (``triton.jit`` on first use, as ``_normalize``)."""
    has_keys = l_i > 0.0  # [BM]
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]  # [BM, D]; zeros for rows without keys
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    return out, lse


def _block_sparse_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    KV_BLOCK_INDICES,
    KV_BLOCK_COUNTS,
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
    num_heads,
    q_len,
    kv_len,
    qk_scale_log2,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Forward tile: Out[b, h, tile] and LSE[b, h, tile] for one query tile.

    ``BLOCK_M`` and ``BLOCK_N`` divide ``BLOCK_SIZE``: a query block may be split in
    several programs and a key block is walked in ``BLOCK_SIZE // BLOCK_N`` tiles.
    ``qk_scale_log2`` is ``sm_scale * log2(e)`` so scores live in base 2.
    ``DOT_IN_FP32`` feeds ``tl.dot`` fp32 copies of the tiles (``p`` still rounded to
    the input dtype); the launcher sets it only for bf16 under the Triton interpreter,
    whose ``tl.dot`` multiplies the raw bits of bf16 tiles (Triton 3.9).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    query_block = (pid_m * BLOCK_M) // BLOCK_SIZE

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_valid = offs_m < q_len  # [BM]

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=q_valid[:, None], other=0.0)  # [BM, D]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BM] running max (log2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM] running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # [BM, D]

    count_ptr = KV_BLOCK_COUNTS + b * stride_cb + h * stride_ch + query_block * stride_cq
    num_selected = tl.load(count_ptr)
    index_base = KV_BLOCK_INDICES + b * stride_ib + h * stride_ih + query_block * stride_iq

    for i in range(0, num_selected):
        key_block = tl.load(index_base + i * stride_ik)
        for sub in tl.static_range(BLOCK_SIZE // BLOCK_N):
            offs_kv = key_block * BLOCK_SIZE + sub * BLOCK_N + offs_n  # [BN]
            kv_valid = offs_kv < kv_len  # [BN]

            k_ptrs = k_base + offs_kv[None, :] * stride_kn + offs_d[:, None] * stride_kd
            k = tl.load(k_ptrs, mask=kv_valid[None, :], other=0.0)  # [D, BN]
            if DOT_IN_FP32:
                k = k.to(tl.float32)
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2  # [BM, BN]
            scores = tl.where(kv_valid[None, :], scores, float("-inf"))
            v_ptrs = v_base + offs_kv[:, None] * stride_vn + offs_d[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=kv_valid[:, None], other=0.0)  # [BN, D]
            m_i, l_i, acc = _online_softmax_update(scores, v, m_i, l_i, acc, DOT_PRECISION, DOT_IN_FP32)

    out, lse = _normalize(m_i, l_i, acc)

    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_valid[:, None])
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + offs_m * stride_ln
    tl.store(lse_ptrs, lse, mask=q_valid)


def _launch_config(head_dim: int, block_size: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Pick (BLOCK_M, BLOCK_N, num_warps, num_stages) for a head_dim, block size and dtype."""
    # Tiles divide the block size (powers of two). fp16/bf16: 128 x 64 tiles, two stages
    # (49 KiB of shared memory at head_dim 128 on sm_90). fp32 (exact "ieee" dots, a
    # correctness path): 64 x 32 tiles and one stage; two stages multi-buffer every
    # unrolled key sub-tile and pass the 227 KiB limit at block 256, head_dim 128.
    num_warps = 4 if head_dim <= 64 else 8
    if dtype == torch.float32:
        return min(block_size, 64), min(block_size, 32), num_warps, 1
    return min(block_size, 128), min(block_size, 64), num_warps, 2


def _load_kernel():
    """Import Triton and wrap ``_block_sparse_attn_fwd_kernel`` and its helpers with ``triton.jit`` (once)."""
    global triton, tl, _online_softmax_update, _normalize, _jitted_kernel
    if _jitted_kernel is None:
        if not HAS_TRITON:
            raise RuntimeError(
                "Triton is not installed; use fastgen.attention.block_sparse_attention (torch/flex backends) instead."
            )
        try:
            import triton as triton_module
            import triton.language as language_module
        except Exception as exc:  # a broken or partial install
            raise RuntimeError(f"Triton is installed but does not import: {exc!r}") from exc
        triton, tl = triton_module, language_module
        _online_softmax_update = triton.jit(_online_softmax_update_fn)
        _normalize = triton.jit(_normalize_fn)
        _jitted_kernel = triton.jit(_block_sparse_attn_fwd_kernel)
    return _jitted_kernel


def _is_interpreted() -> bool:
    """True when the kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors).

    Raises ``RuntimeError`` when Triton itself was imported in the other mode (the
    variable was set or cleared after ``import triton``): such a kernel cannot run.
    """
    kernel = _load_kernel()
    kernel_interpreted = type(kernel).__name__ == "InterpretedFunction"
    stdlib_kind = type(tl.zeros).__name__  # a jit function of triton.language, decorated at `import triton`
    stdlib_interpreted = stdlib_kind == "InterpretedFunction"
    if stdlib_kind in ("JITFunction", "InterpretedFunction") and kernel_interpreted != stdlib_interpreted:
        raise RuntimeError(
            "TRITON_INTERPRET changed after triton was imported; set it before the first `import triton` "
            "(for tests: at the top of tests/conftest.py)."
        )
    return kernel_interpreted


def _block_sparse_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_size: int,
    sm_scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host launcher: validate, allocate ``out``/``lse``, pick tiles, launch the kernel."""
    kernel = _load_kernel()
    if not (block_size >= 16 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if not (q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        raise ValueError("q, k, v must be [B, H, N, D]")
    batch, heads, q_len, head_dim = q.shape
    if not (k.shape[:2] == (batch, heads) and k.shape[3] == head_dim):
        raise ValueError(f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if not (v.shape == k.shape):
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    kv_len = k.shape[2]
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {_SUPPORTED_DTYPES}, got {q.dtype}")
    if not (k.dtype == q.dtype and v.dtype == q.dtype):
        raise ValueError("q, k, v must share one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.device.type != "cuda" and not _is_interpreted():
        raise RuntimeError(
            f"block_sparse_attention_triton got {q.device.type} tensors: the Triton kernel needs CUDA, "
            "or TRITON_INTERPRET=1 set before triton is first imported."
        )

    num_q_blocks = triton.cdiv(q_len, block_size)
    if not (
        kv_block_indices.dim() == 4
        and tuple(kv_block_indices.shape[:3])
        == (
            batch,
            heads,
            num_q_blocks,
        )
    ):
        raise ValueError(
            f"kv_block_indices must be [B, H, NQB, MAXK] = [{batch}, {heads}, {num_q_blocks}, MAXK], "
            f"got {tuple(kv_block_indices.shape)}"
        )
    if not (tuple(kv_block_counts.shape) == (batch, heads, num_q_blocks)):
        raise ValueError(
            f"kv_block_counts must be [B, H, NQB] = [{batch}, {heads}, {num_q_blocks}], got {tuple(kv_block_counts.shape)}"
        )
    # int32 lists on the device of q; broadcast (stride-0) views are fine, strides are passed.
    kv_block_indices = kv_block_indices.to(device=q.device, dtype=torch.int32)
    kv_block_counts = kv_block_counts.to(device=q.device, dtype=torch.int32)

    default_m, default_n, num_warps, num_stages = _launch_config(head_dim, block_size, q.dtype)
    block_m = block_m or default_m
    block_n = block_n or default_n
    if not (block_size % block_m == 0 and block_size % block_n == 0):
        raise ValueError(f"tile sizes ({block_m}, {block_n}) must divide block_size {block_size}")
    if not (block_m >= 16 and block_n >= 16):
        raise ValueError("tile sizes must be >= 16 (tl.dot minimum)")

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, q_len), device=q.device, dtype=torch.float32)
    if q_len == 0 or batch * heads == 0:
        return out, lse

    # the interpreter's tl.dot is wrong on bf16 tiles: compute those dots in fp32 there
    dot_in_fp32 = q.dtype == torch.bfloat16 and _is_interpreted()
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        kv_block_indices,
        kv_block_counts,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *lse.stride(),
        *kv_block_indices.stride(),
        *kv_block_counts.stride(),
        heads,
        q_len,
        kv_len,
        sm_scale * _LOG2_E,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if (q.dtype == torch.float32 or dot_in_fp32) else "tf32",
        DOT_IN_FP32=dot_in_fp32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    block_size: int = 128,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward with the Triton kernel.

    Args:
        q: queries ``[B, H, Nq, D]``, fp16 / bf16 / fp32, ``D`` in {16, 32, 64, 128}.
        k: keys ``[B, H, Nk, D]`` (``Nk`` may differ from ``Nq``), same dtype as ``q``.
        v: values ``[B, H, Nk, D]``.
        kv_block_indices: int32 ``[B, H, NQB, MAXK]`` with ``NQB = ceil(Nq / block_size)``:
            for each query block, the key blocks (of ``k``) it attends to; only the first
            ``kv_block_counts[b, h, qb]`` entries are read; a key block past the end of
            ``k`` contributes nothing.
        kv_block_counts: int32 ``[B, H, NQB]``, number of valid entries per query block.
        block_size: tokens per query block and per key block, a power of two >= 16; the
            last block of ``q`` and of ``k`` may be partial.
        sm_scale: softmax scale, ``1 / sqrt(D)`` when ``None``.

    Returns:
        ``(out, lse)``: ``out [B, H, Nq, D]`` in ``q.dtype`` and ``lse [B, H, Nq]`` fp32,
        the natural-log sum of ``exp(sm_scale * q·k)`` over the selected keys. A query
        block with no selected key block gets zeros and ``lse = -inf``.
    """
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if not torch.compiler.is_compiling():
        _load_kernel()  # Triton missing: this module's RuntimeError, before the op
    return torch.ops.fastgen.block_sparse_attention_triton(
        q, k, v, kv_block_indices, kv_block_counts, int(block_size), float(sm_scale)
    )


# The launcher as a ``torch.library`` custom op (``torch.ops.fastgen.block_sparse_attention_triton``):
# ``torch.compile`` traces through it with the fake implementation below (no Triton at trace time).
if not _op_defined(
    "fastgen::block_sparse_attention_triton"
):  # a second copy of this module keeps the first registration

    @torch.library.custom_op("fastgen::block_sparse_attention_triton", mutates_args=())
    def _block_sparse_attention_op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_block_indices: torch.Tensor,
        kv_block_counts: torch.Tensor,
        block_size: int,
        sm_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of :func:`_block_sparse_attn_fwd` with the default tiles."""
        return _block_sparse_attn_fwd(q, k, v, kv_block_indices, kv_block_counts, block_size, sm_scale)

    @_block_sparse_attention_op.register_fake
    def _(q, k, v, kv_block_indices, kv_block_counts, block_size, sm_scale):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        return out, q.new_empty(q.shape[:3], dtype=torch.float32)


def block_mask_to_indices(
    block_mask: torch.Tensor, max_count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a bool block mask into the per-query-block key-block lists the kernel walks.

    Args:
        block_mask: bool ``[B, H, NQB, NKB]``; ``block_mask[b, h, i, j]`` means query
            block ``i`` attends to key block ``j``.
        max_count: the table width when the caller knows an upper bound of the counts (a top-k
            selection): then no host synchronisation reads the counts back.

    Returns:
        ``(indices, counts)``: ``indices`` int32 ``[B, H, NQB, MAXK]`` with the selected
        key blocks first, in ascending key-block order (a stable descending sort of the
        mask), ``MAXK = max(counts)`` but at least 1; entries past ``counts`` are
        unselected key blocks and must not be read. ``counts`` int32 ``[B, H, NQB]``.
        Same layout as FlexAttention's ``BlockMask.from_kv_blocks(counts, indices)``.

    Example:
        >>> import torch
        >>> from fastgen.attention import block_mask_to_indices
        >>> mask = torch.tensor([[[[True, False, True], [False, True, False]]]])  # [1, 1, 2, 3]
        >>> indices, counts = block_mask_to_indices(mask)
        >>> counts.tolist()
        [[[2, 1]]]
        >>> indices[0, 0, 0, :2].tolist(), indices[0, 0, 1, :1].tolist()
        ([0, 2], [1])
    """
    if block_mask.dim() != 4:
        raise ValueError(f"block_mask must be [B, H, NQB, NKB], got shape {tuple(block_mask.shape)}")
    selected = block_mask.to(torch.bool)
    counts = selected.sum(dim=-1, dtype=torch.int32)
    if max_count is None:
        max_count = int(counts.max()) if counts.numel() else 0
    max_count = max(int(max_count), 1)
    nkb = selected.shape[-1]
    rows = selected.reshape(-1, nkb)
    indices = torch.zeros(rows.shape[0], max_count, dtype=torch.int32, device=block_mask.device)
    take = min(max_count, nkb)
    step = rows.shape[0]  # one sort on the GPU; on the CPU in pieces, so the int64 sort indices
    if not block_mask.is_cuda:  # stay ~64 KiB (the CPU path's peak memory must stay at SDPA's)
        step = max(1, 8192 // max(nkb, 1))
    for start in range(0, rows.shape[0], step):
        piece = rows[start : start + step].to(torch.uint8)
        order = torch.sort(piece, dim=-1, descending=True, stable=True).indices
        indices[start : start + step, :take] = order[:, :take]
    return indices.view(*selected.shape[:-1], max_count), counts
