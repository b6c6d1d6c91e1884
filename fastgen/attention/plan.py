"""The selection plan: what a sparse-attention method decided, in one form every engine executes.

A method (Rectified SpaAttn, SparseD, Light Forcing, ...) looks at q/k and decides, per (batch,
head, query block), which key blocks to attend to and which extra keys (pooled block means,
isolated outlier keys, text keys) to add with which log-weight. It writes that into a
:class:`SelectionPlan`. :func:`~fastgen.attention.execute.execute_plan` then runs one softmax per query over exactly those
keys on an engine (``torch`` reference, ``gather`` = CPU native kernel, ``triton``, ``flex``);
engines never decide anything.

The softmax a plan defines, for query row ``i`` in query block ``I``::

    keys:   every key j < kv_len of each key block listed for I (and key_valid[b, j] when given)
            every extra key p with extra_log_weight[b, h, p] > -inf and extra_visible[b, h, I, p]
    logits: scale * q_i . k_j                               (selected keys)
            scale * q_i . extra_k[p] + extra_log_weight[p]  (extra keys; log n_J for a pooled key
                                                             standing for n_J keys)

Rows that see no key give zeros and ``lse = -inf``. The query length may differ from the key
length (Light Forcing: queries = the current chunk, keys = KV cache + chunk); query blocks and key
blocks are both ``block_size`` tokens, the last ones may be partial.

Interface note: the fields and :func:`~fastgen.attention.execute.execute_plan`'s signature are the stable contract other
methods build on; add fields only with defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .blocks import block_mask_to_indices, num_blocks, tables_to_mask


@dataclass(frozen=True, eq=False)
class SelectionPlan:
    """Per (batch, head, query block): selected key blocks and optional extra keys with log-weights.

    Build one with :meth:`from_block_mask` (or directly from an index table); run it with
    :func:`~fastgen.attention.execute.execute_plan`.

    Example:
        >>> import torch
        >>> from fastgen.attention import SelectionPlan, dense_attention, execute_plan
        >>> q, k, v = torch.randn(3, 1, 2, 40, 16).unbind(0)  # 3 blocks of 16, the last one partial
        >>> plan = SelectionPlan.from_block_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool), 16, 40, 40)
        >>> plan.block_counts.tolist()  # every query block keeps all 3 key blocks
        [[[3, 3, 3], [3, 3, 3]]]
        >>> torch.allclose(execute_plan(q, k, v, plan), dense_attention(q, k, v), atol=1e-5)
        True
    """

    block_size: int
    """Tokens per query block and per key block (a power of two >= 16)."""
    q_len: int
    """Query tokens ``Nq`` the plan covers (``ceil(Nq / block_size)`` query blocks)."""
    kv_len: int
    """Key tokens ``Nk``: keys at positions ``>= kv_len`` are never attended (a padded tail)."""
    block_indices: torch.Tensor
    """int32 ``[B, H, nqb, K]``: selected key blocks of each query block; the first
    ``block_counts`` entries are read, the rest are ignored."""
    block_counts: torch.Tensor
    """int32 ``[B, H, nqb]``: number of selected key blocks of each query block."""
    extra_k: torch.Tensor | None = None
    """``[B, H, P', D]`` extra keys (pooled / isolated / text); rows ``>= P`` (P =
    ``extra_log_weight.shape[-1]``) are padding and never read. Any float dtype."""
    extra_v: torch.Tensor | None = None
    """``[B, H, P', D]`` values of the extra keys."""
    extra_log_weight: torch.Tensor | None = None
    """fp32 ``[B, H, P]``: added to the logit of each extra key (``log n_J`` for a pooled key that
    stands for ``n_J`` keys, 0 for a single key, ``-inf`` for an absent one)."""
    extra_visible: torch.Tensor | None = None
    """bool ``[B, H, nqb, P]``: which query blocks see which extra key (None: all see all)."""
    key_valid: torch.Tensor | None = None
    """bool ``[B, Nk]`` (or None): False marks padded keys inside the selected blocks. Set it only
    when some key is padded (engines serve it through one extra head dimension)."""
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Optional statistics the method recorded (device tensors, never read by an engine)."""

    def __post_init__(self):
        # engines read int32 contiguous tables
        for name in ("block_indices", "block_counts"):
            table = getattr(self, name)
            if table.dtype != torch.int32 or not table.is_contiguous():
                object.__setattr__(self, name, table.to(torch.int32).contiguous())

    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        block_size: int,
        q_len: int,
        kv_len: int,
        *,
        batch: int | None = None,
        max_count: int | None = None,
        **extras,
    ) -> SelectionPlan:
        """A plan from a bool block mask ``[B or 1, H, nqb, nkb]`` (``batch`` expands a broadcast
        batch of 1); ``max_count``: an upper bound of the selected blocks per row when the method
        knows one (top-k), which spares a host synchronisation; ``extras`` are the optional fields."""
        if batch is not None:
            block_mask = block_mask.expand(batch, -1, -1, -1)
        indices, counts = block_mask_to_indices(block_mask, max_count)
        return cls(block_size, int(q_len), int(kv_len), indices, counts, **extras)

    @property
    def num_query_blocks(self) -> int:
        """``ceil(q_len / block_size)``."""
        return num_blocks(self.q_len, self.block_size)

    @property
    def num_key_blocks(self) -> int:
        """``ceil(kv_len / block_size)``."""
        return num_blocks(self.kv_len, self.block_size)

    @property
    def has_extra_keys(self) -> bool:
        """Whether the plan adds extra keys to the selected blocks."""
        return self.extra_log_weight is not None and self.extra_log_weight.shape[-1] > 0

    @property
    def block_mask(self) -> torch.Tensor:
        """The selected key blocks as a bool mask ``[B, H, nqb, nkb]``."""
        return tables_to_mask(self.block_indices, self.block_counts, self.num_key_blocks)

    def extra_bias(self) -> torch.Tensor | None:
        """The CPU gather kernel's packed form of the extra keys: the additive fp32 logit bias
        ``[B, H, nqb, P]`` of every extra key for every query block (``-inf``: not seen)."""
        if not self.has_extra_keys:
            return None
        b, h, p = self.extra_log_weight.shape
        bias = self.extra_log_weight.float()[:, :, None, :].expand(b, h, self.num_query_blocks, p)
        if self.extra_visible is not None:
            bias = bias.masked_fill(~self.extra_visible, float("-inf"))
        return bias

    def density(self) -> torch.Tensor:
        """Selected fraction of the (query block, key block) tiles, a 0-dim fp32 device tensor."""
        tiles = self.block_counts.numel() * max(1, self.num_key_blocks)
        return self.block_counts.sum(dtype=torch.float32) / tiles

    def keys_per_query(self) -> torch.Tensor:
        """Mean keys each query row attends to, counting the extra keys: 0-dim fp32 device tensor.
        Key blocks count their valid tokens (a partial last block counts less)."""
        bs, nkb = self.block_size, self.num_key_blocks
        lengths = (self.kv_len - torch.arange(nkb, device=self.block_counts.device) * bs).clamp(0, bs)
        width = self.block_indices.shape[-1]
        used = torch.arange(width, device=lengths.device) < self.block_counts[..., None]
        idx = self.block_indices.long().clamp(0, max(0, nkb - 1))
        per_block = (lengths[idx] * used).sum(-1, dtype=torch.float32)  # [B, H, nqb]
        if self.has_extra_keys:
            bias = self.extra_bias()
            per_block = per_block + torch.isfinite(bias).sum(-1, dtype=torch.float32)
        return per_block.mean()


def check_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SelectionPlan) -> None:
    """ValueError unless ``plan`` fits q ``[B, H, Nq, D]`` and k/v ``[B, H, Nk', D]``."""
    if not isinstance(plan, SelectionPlan):
        raise ValueError(f"plan must be a SelectionPlan, got {type(plan).__name__}")
    b, h, nq, d = q.shape
    if plan.q_len != nq:
        raise ValueError(f"plan.q_len={plan.q_len} but q has {nq} tokens; they must match")
    if not 0 < plan.kv_len <= k.shape[2]:
        raise ValueError(f"plan.kv_len={plan.kv_len} is out of range; allowed: 1..{k.shape[2]} (k's tokens)")
    nqb = plan.num_query_blocks
    if plan.block_indices.dim() != 4 or tuple(plan.block_indices.shape[:3]) != (b, h, nqb):
        raise ValueError(
            f"plan.block_indices has shape {tuple(plan.block_indices.shape)}; expected [{b}, {h}, {nqb}, K]"
        )
    if tuple(plan.block_counts.shape) != (b, h, nqb):
        raise ValueError(
            f"plan.block_counts has shape {tuple(plan.block_counts.shape)}; expected {(b, h, nqb)}"
        )
    if plan.has_extra_keys:
        p = plan.extra_log_weight.shape[-1]
        if plan.extra_k is None or plan.extra_v is None:
            raise ValueError("plan.extra_log_weight is set but plan.extra_k / plan.extra_v are missing")
        for name, x in (("extra_k", plan.extra_k), ("extra_v", plan.extra_v)):
            if x.dim() != 4 or x.shape[:2] != (b, h) or x.shape[3] != d or x.shape[2] < p:
                raise ValueError(f"plan.{name} has shape {tuple(x.shape)}; expected [{b}, {h}, >= {p}, {d}]")
        if tuple(plan.extra_log_weight.shape) != (b, h, p):
            raise ValueError(
                f"plan.extra_log_weight has shape {tuple(plan.extra_log_weight.shape)}; expected {(b, h, p)}"
            )
        if plan.extra_visible is not None and tuple(plan.extra_visible.shape) != (b, h, nqb, p):
            raise ValueError(
                f"plan.extra_visible has shape {tuple(plan.extra_visible.shape)}; expected {(b, h, nqb, p)}"
            )
    if plan.key_valid is not None and (
        plan.key_valid.dtype != torch.bool or tuple(plan.key_valid.shape) != (b, k.shape[2])
    ):
        raise ValueError(
            f"plan.key_valid must be bool [{b}, {k.shape[2]}], got {plan.key_valid.dtype} "
            f"{tuple(plan.key_valid.shape)}"
        )


def __getattr__(name):
    # execute_plan moved to fastgen.attention.execute (the plan is data only); old path kept one release
    if name == "execute_plan":
        from fastgen._validation import log_moved

        from . import execute

        log_moved("fastgen.attention.plan.execute_plan", "fastgen.attention.execute.execute_plan")
        return execute.execute_plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
