"""Model-agnostic attention ops on SDPA-layout tensors ``[batch, heads, tokens, head_dim]``."""

from .backends import available_backends, set_default_backend
from .block_sparse import block_sparse_attention
from .blocks import (
    block_mask_to_indices,
    block_token_counts,
    default_tile,
    inverse_permutation,
    keep_count,
    pool_blocks,
    select_cumulative_mass,
    select_topk_blocks,
    tile_permutation,
)
from .dense import dense_attention
from .execute import execute_plan
from .plan import SelectionPlan
from .workspace import Workspace


def __getattr__(name):
    # the method modules are imported lazily so the core stays importable on its own
    if name == "rectified_sparse_attention":
        from .rectified import rectified_sparse_attention

        return rectified_sparse_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SelectionPlan",
    "Workspace",
    "available_backends",
    "block_mask_to_indices",
    "block_sparse_attention",
    "block_token_counts",
    "default_tile",
    "dense_attention",
    "execute_plan",
    "inverse_permutation",
    "keep_count",
    "pool_blocks",
    "rectified_sparse_attention",
    "select_cumulative_mass",
    "select_topk_blocks",
    "set_default_backend",
    "tile_permutation",
]
