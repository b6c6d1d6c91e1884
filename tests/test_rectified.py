"""Rectified SpaAttn (fastgen.attention.rectified) against dense attention and its own invariants."""

from __future__ import annotations

import pytest
import torch

from fastgen.attention import (
    default_tile,
    dense_attention,
    inverse_permutation,
    rectified_sparse_attention,
    tile_permutation,
)
from tests.helpers import rel_rmse

FORMS = ["exact", "paper", "none"]
RECTIFIED = ["exact", "paper"]


def qkv(b, h, n, d, dtype=torch.float32):
    return tuple(torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))


def text_mask(b, n, padded_rows):
    """Key padding mask with the last ``p`` tokens of batch row ``i`` padded, ``p = padded_rows[i]``."""
    mask = torch.ones(b, n, dtype=torch.bool)
    for row, p in enumerate(padded_rows):
        if p:
            mask[row, n - p :] = False
    return mask


def block_constant(b, h, n_blocks, block, d, scale=1.0):
    """``[B, H, n_blocks*block, D]`` with one random vector repeated inside each block."""
    x = torch.randn(b, h, n_blocks, 1, d) * scale
    return x.expand(b, h, n_blocks, block, d).reshape(b, h, n_blocks * block, d)


# ---------------------------------------------------------------- sparsity 0 == dense


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("grid", [None, (3, 5, 7)])
def test_sparsity_zero_equals_dense_with_text_and_padding(form, grid):
    b, h, d, text = 2, 2, 32, 11
    n = 3 * 5 * 7 + text  # video part not a multiple of the block
    q, k, v = qkv(b, h, n, d)
    mask = text_mask(b, n, [0, 4])
    out = rectified_sparse_attention(
        q,
        k,
        v,
        sparsity=0.0,
        block_size=16,
        num_text_tokens=text,
        key_padding_mask=mask,
        grid=grid,
        form=form,
    )
    assert out.shape == q.shape
    assert rel_rmse(out, dense_attention(q, k, v, key_padding_mask=mask)) < 1e-5


def test_sparsity_zero_no_text_equals_dense():
    q, k, v = qkv(1, 3, 100, 16)
    out = rectified_sparse_attention(q, k, v, sparsity=0.0, block_size=32)
    assert rel_rmse(out, dense_attention(q, k, v)) < 1e-5


# ---------------------------------------------------------------- block-constant oracle


@pytest.mark.parametrize("form", RECTIFIED)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_block_constant_qk_is_exact_for_any_sparsity(form, sparsity):
    b, h, nb, bs, d = 2, 2, 8, 16, 32
    q = block_constant(b, h, nb, bs, d)
    k = block_constant(b, h, nb, bs, d)
    v = torch.randn(b, h, nb * bs, d)
    out, stats = rectified_sparse_attention(
        q, k, v, sparsity=sparsity, block_size=bs, form=form, return_stats=True
    )
    assert stats["density"] < 1.0
    assert stats["compensated_fraction"] == 1.0
    assert rel_rmse(out, dense_attention(q, k, v)) < 1e-5
    # the baseline does lose something on the same inputs
    plain = rectified_sparse_attention(q, k, v, sparsity=sparsity, block_size=bs, form="none")
    assert rel_rmse(plain, dense_attention(q, k, v)) > 1e-3


@pytest.mark.parametrize("form", RECTIFIED)
def test_block_constant_with_text_and_padding_is_exact(form):
    b, h, nb, bs, d, text = 2, 2, 6, 16, 16, 9
    q = torch.cat([block_constant(b, h, nb, bs, d), torch.randn(b, h, text, d)], dim=2)
    k = torch.cat([block_constant(b, h, nb, bs, d), torch.randn(b, h, text, d)], dim=2)
    v = torch.randn(b, h, nb * bs + text, d)
    mask = text_mask(b, nb * bs + text, [3, 0])
    out = rectified_sparse_attention(
        q, k, v, sparsity=0.7, block_size=bs, num_text_tokens=text, key_padding_mask=mask, form=form
    )
    assert rel_rmse(out, dense_attention(q, k, v, key_padding_mask=mask)) < 1e-5


def test_exact_form_needs_only_constant_keys():
    # the exact form uses each query's own logit with the pooled key: constant keys per block suffice
    b, h, nb, bs, d = 1, 2, 6, 16, 16
    q = torch.randn(b, h, nb * bs, d)
    k = block_constant(b, h, nb, bs, d)
    v = torch.randn(b, h, nb * bs, d)
    out, stats = rectified_sparse_attention(
        q, k, v, sparsity=0.6, block_size=bs, form="exact", return_stats=True
    )
    # GAPR rejects some blocks (query deviation), the rest is exact: error far below plain top-k
    plain = rectified_sparse_attention(q, k, v, sparsity=0.6, block_size=bs, form="none")
    ref = dense_attention(q, k, v)
    assert rel_rmse(out, ref) <= rel_rmse(plain, ref)


# ---------------------------------------------------------------- paper form: mass conservation


def test_paper_form_conserves_mass_constant_values():
    b, h, n, d, text = 2, 2, 150, 16, 10
    q, k, _ = qkv(b, h, n, d)
    q, k = q * 2, k * 2  # peaky attention, far from uniform
    v = torch.full((b, h, n, d), 0.7)
    mask = text_mask(b, n, [0, 5])
    for sparsity in (0.5, 0.9):
        out = rectified_sparse_attention(
            q,
            k,
            v,
            sparsity=sparsity,
            block_size=16,
            num_text_tokens=text,
            key_padding_mask=mask,
            form="paper",
        )
        assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-5)


# ---------------------------------------------------------------- reordering


@pytest.mark.parametrize("form", FORMS)
def test_reordering_is_a_permutation(form):
    b, h, d, grid, text = 1, 2, 16, (4, 6, 8), 5
    n = 4 * 6 * 8 + text
    q, k, v = qkv(b, h, n, d)
    kwargs = dict(block_size=16, num_text_tokens=text, form=form)
    tiled = rectified_sparse_attention(q, k, v, sparsity=0.0, grid=grid, **kwargs)
    raster = rectified_sparse_attention(q, k, v, sparsity=0.0, grid=grid, reorder=False, **kwargs)
    assert rel_rmse(tiled, raster) < 1e-5
    # at sparsity > 0 the output stays in the caller's token order: permuting the video tokens of
    # the input by the tile order and running without reordering gives the same (permuted) output
    perm = tile_permutation(grid, default_tile(16))
    full = torch.cat([perm, torch.arange(n - text, n)])
    sparse = rectified_sparse_attention(q, k, v, sparsity=0.5, grid=grid, **kwargs)
    pre = rectified_sparse_attention(q[:, :, full], k[:, :, full], v[:, :, full], sparsity=0.5, **kwargs)
    inv = torch.cat([inverse_permutation(perm), torch.arange(n - text, n)])
    assert rel_rmse(sparse, pre[:, :, inv]) < 1e-5


# ---------------------------------------------------------------- text tokens and padding


@pytest.mark.parametrize("form", FORMS)
def test_text_queries_are_dense(form):
    b, h, n, d, text = 2, 2, 130, 16, 14
    q, k, v = qkv(b, h, n, d)
    mask = text_mask(b, n, [2, 6])
    out = rectified_sparse_attention(
        q, k, v, sparsity=0.9, block_size=16, num_text_tokens=text, key_padding_mask=mask, form=form
    )
    ref = dense_attention(q, k, v, key_padding_mask=mask)
    assert rel_rmse(out[:, :, -text:], ref[:, :, -text:]) < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_padded_text_keys_are_ignored(form):
    b, h, n, d, text = 2, 2, 140, 16, 12
    q, k, v = qkv(b, h, n, d)
    mask = text_mask(b, n, [5, 0])
    kwargs = dict(sparsity=0.75, block_size=16, num_text_tokens=text, key_padding_mask=mask, form=form)
    out = rectified_sparse_attention(q, k, v, **kwargs)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, -5:] = 50.0  # garbage that would dominate every softmax if it leaked
    v2[0, :, -5:] = 1e3
    out2 = rectified_sparse_attention(q, k2, v2, **kwargs)
    assert torch.allclose(out[:, :, :-5], out2[:, :, :-5], atol=1e-5)


@pytest.mark.parametrize("form", RECTIFIED)
def test_padded_video_keys_are_ignored(form):
    b, h, n, d = 2, 2, 100, 16
    q, k, v = qkv(b, h, n, d)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 20:27] = False  # partial block
    mask[1, 32:48] = False  # a whole block
    out = rectified_sparse_attention(q, k, v, sparsity=0.0, block_size=16, key_padding_mask=mask, form=form)
    assert rel_rmse(out, dense_attention(q, k, v, key_padding_mask=mask)) < 1e-5
    k2 = k.clone()
    k2[1, :, 20:27] = 40.0
    out2 = rectified_sparse_attention(q, k2, v, sparsity=0.5, block_size=16, key_padding_mask=mask, form=form)
    out1 = rectified_sparse_attention(q, k, v, sparsity=0.5, block_size=16, key_padding_mask=mask, form=form)
    assert torch.isfinite(out2).all()
    assert rel_rmse(out2[1], out1[1]) < 1e-5


# ---------------------------------------------------------------- dtypes, shapes, corrections


@pytest.mark.parametrize("form", FORMS)
def test_bf16_batch2_ragged(form):
    b, h, n, d, text = 2, 2, 203, 32, 7
    q, k, v = qkv(b, h, n, d, torch.bfloat16)
    out = rectified_sparse_attention(q, k, v, sparsity=0.0, block_size=32, num_text_tokens=text, form=form)
    assert out.dtype == torch.bfloat16
    assert rel_rmse(out, dense_attention(q.float(), k.float(), v.float())) < 2e-2
    sparse = rectified_sparse_attention(q, k, v, sparsity=0.6, block_size=32, num_text_tokens=text, form=form)
    fp32 = rectified_sparse_attention(
        q.float(), k.float(), v.float(), sparsity=0.6, block_size=32, num_text_tokens=text, form=form
    )
    assert rel_rmse(sparse, fp32) < 3e-2


def test_mass_threshold_only_adds_blocks():
    q, k, v = qkv(1, 2, 128, 16)
    _, base = rectified_sparse_attention(q, k, v, sparsity=0.8, block_size=16, return_stats=True)
    _, more = rectified_sparse_attention(
        q, k, v, sparsity=0.8, block_size=16, mass_threshold=0.9, return_stats=True
    )
    assert bool((base["block_mask"] <= more["block_mask"]).all())
    assert more["density"] >= base["density"]


# ---------------------------------------------------------------- stats


def test_stats_fields():
    b, h, d, text = 2, 3, 16, 6
    n = 100 + text
    q, k, v = qkv(b, h, n, d)
    out, stats = rectified_sparse_attention(
        q, k, v, sparsity=0.75, block_size=16, num_text_tokens=text, return_stats=True
    )
    nb = 7  # ceil(100 / 16)
    assert stats["block_mask"].shape == (b, h, nb, nb) and stats["block_mask"].dtype == torch.bool
    assert stats["head_density"].shape == (h,)
    assert 0.0 < stats["density"] < 1.0
    assert 0.0 <= stats["compensated_fraction"] <= 1.0
    assert torch.allclose(stats["head_density"].mean(), stats["density"], atol=1e-6)
    per_row = stats["block_mask"].sum(-1)
    assert torch.all(per_row == 2)  # keep_count(0.75, 7) = ceil(1.75) = 2
    _, dense_stats = rectified_sparse_attention(q, k, v, sparsity=0.0, block_size=16, return_stats=True)
    assert dense_stats["density"] == 1.0 and dense_stats["compensated_fraction"] == 0.0
    _, none_stats = rectified_sparse_attention(
        q, k, v, sparsity=0.75, block_size=16, form="none", return_stats=True
    )
    assert none_stats["compensated_fraction"] == 0.0


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=0.5, block_size=48), "block_size"),
        (dict(sparsity=0.5, block_size=8), "block_size"),
        (dict(sparsity=0.5, num_text_tokens=64), "num_text_tokens"),
        (dict(sparsity=0.5, num_text_tokens=-1), "num_text_tokens"),
        (dict(sparsity=0.5, grid=(2, 4, 4)), "grid"),
        (dict(sparsity=0.5, grid=(2, 4)), "grid"),
        (dict(sparsity=0.5, form="fast"), "form"),
        (dict(sparsity=0.5, mass_threshold=0.0), "mass_threshold"),
        (dict(sparsity=0.5, key_padding_mask=torch.ones(1, 63, dtype=torch.bool)), "key_padding_mask"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    q, k, v = qkv(1, 1, 64, 16)
    with pytest.raises(ValueError, match=name):
        rectified_sparse_attention(q, k, v, **{"block_size": 16, **kwargs})


# ---------------------------------------------------------------- multi-resolution options


def test_isolated_keys_make_outlier_blocks_exact():
    # keys constant inside each block except a few outliers (sinks): isolating them leaves pooled
    # keys that are exact, so the output is dense; without isolation the outliers are lost
    b, h, nb, bs, d = 1, 2, 8, 16, 16
    q = block_constant(b, h, nb, bs, d)
    k = block_constant(b, h, nb, bs, d)
    v = torch.randn(b, h, nb * bs, d)
    k[:, :, [5, 40, 77, 100]] += 6.0 * torch.randn(1, h, 4, d)
    ref = dense_attention(q, k, v)
    kwargs = dict(sparsity=0.75, block_size=bs, gapr=False, selection="pooled")
    out = rectified_sparse_attention(q, k, v, isolated_keys=0.5, **kwargs)  # 4 isolated keys
    plain = rectified_sparse_attention(q, k, v, isolated_keys=0.0, **kwargs)
    assert rel_rmse(out, ref) < 1e-5
    assert rel_rmse(plain, ref) > 1e-3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(selection="max"), "selection"),
        (dict(pool_splits=3), "pool_splits"),
        (dict(pool_splits=32), "pool_splits"),
        (dict(isolated_keys=1.0, form="paper"), "isolated_keys"),
        (dict(pool_splits=8, selection="pooled"), "pool_splits"),
        (dict(gapr=False, form="none"), "gapr"),
        (dict(variance_correction=True), "variance_correction"),
        (dict(isolated_keys=-1.0), "isolated_keys"),
    ],
)
def test_bad_resolution_arguments_raise(kwargs, name):
    q, k, v = qkv(1, 1, 64, 16)
    with pytest.raises(ValueError, match=name):
        rectified_sparse_attention(q, k, v, sparsity=0.5, block_size=16, **kwargs)


# ---------------------------------------------------------------- CPU one-pass path vs the general path


def test_gradients_flow_through_the_general_path():
    """The CPU one-pass kernel is forward-only; with inputs that need gradients the op takes the
    general (differentiable) path, and its output equals the one-pass result."""
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    expected = rectified_sparse_attention(q, k, v, sparsity=0.5, block_size=32)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = rectified_sparse_attention(qg, kg, vg, sparsity=0.5, block_size=32)
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (qg, kg, vg))
    assert torch.allclose(out.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("b", [1, 2])
def test_one_pass_keeps_tokens_major_layout_and_reuses_its_workspace(cpu_engine, b):
    """Attention processors pass q/k/v as ``[B, N, H, D]`` buffers seen as ``[B, H, N, D]``: the one-pass
    output comes back in that layout (so the processor's transpose is free) with the general path's
    values, and a workspace keeps the internal copies of q/k/v from call to call without any
    returned tensor living in it."""
    from fastgen.attention import Workspace

    grid, h, d = (3, 7, 9), 3, 32
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv(b, h, n, d, torch.float32))
    args = dict(sparsity=0.6, block_size=16, grid=grid, backend="gather")
    ws = Workspace()
    out = rectified_sparse_attention(q, k, v, workspace=ws, **args)
    ref = rectified_sparse_attention(q, k, v, **{**args, "backend": "torch"})
    assert out.shape == q.shape and out.stride() == q.stride()
    assert rel_rmse(out, ref) < 1e-5
    held = {name: buf.data_ptr() for name, buf in ws._buffers.items()}
    assert set(held) == {"q", "k", "v"} and ws.nbytes > 3 * q.numel() * 4
    again = rectified_sparse_attention(q, k, v, workspace=ws, **args)
    assert torch.equal(again, out)  # the buffers' old contents do not leak into the result
    assert {name: buf.data_ptr() for name, buf in ws._buffers.items()} == held
    storage = out.untyped_storage().data_ptr()
    assert storage not in {buf.untyped_storage().data_ptr() for buf in ws._buffers.values()}
    contiguous = rectified_sparse_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), workspace=ws, **args
    )
    assert contiguous.is_contiguous() and torch.allclose(contiguous, out, atol=1e-6)
    smaller = rectified_sparse_attention(q[:, :2], k[:, :2], v[:, :2], workspace=ws, **args)
    assert torch.allclose(smaller, out[:, :2], atol=1e-6)  # another shape: the buffers are replaced
    ws.clear()
    assert ws.nbytes == 0


def test_workspace_reuses_a_buffer_only_for_the_same_size_and_dtype():
    from fastgen.attention import Workspace

    ws = Workspace()
    cpu = torch.device("cpu")
    a = ws.empty("x", (4, 6), torch.float32, cpu)
    assert ws.empty("x", (6, 4), torch.float32, cpu).data_ptr() == a.data_ptr()  # same size, new view
    assert ws.empty("x", (6, 4), torch.float32, cpu).shape == (6, 4)
    assert ws.empty("x", (6, 4), torch.float64, cpu).dtype == torch.float64
    assert ws.empty("x", (5, 5), torch.float64, cpu).numel() == 25
    assert ws.nbytes == 25 * 8 and "1 buffers" in repr(ws)


# ---------------------------------------------------------------- every engine against the naive reference

NAIVE_CASES = [
    dict(),  # the default: exact form, sub-block selection, isolated keys
    dict(selection="pooled", isolated_keys=0),  # pooled compensation alone
    dict(form="none", isolated_keys=1.0),  # isolated keys alone
    dict(form="paper", selection="pooled"),  # the paper's output combination
    dict(form="paper", selection="paper"),  # ... with the authors' selection
    dict(form="exact", selection="paper", gapr=False, mass_threshold=0.5, isolated_keys=2.0),
]


@pytest.mark.parametrize("engine", ["torch", "gather", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "options", NAIVE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_every_engine_matches_the_naive_reference(engine, options):
    from fastgen.attention.rectified import rectified_attention
    from fastgen.attention.rectified_naive import rectified_naive
    from fastgen.configs import RectifiedSpaAttnConfig

    b, h, d, grid, text, bs = 2, 2, 32, (2, 7, 9), 9, 16  # 126 video tokens: not a block multiple
    n = 126 + text
    q, k, v = qkv(b, h, n, d)
    k[:, :, 5] *= 6  # an outlier key to isolate
    mask = text_mask(b, n, [0, 4])
    config = RectifiedSpaAttnConfig(sparsity=0.6, block_size=bs, **options)
    args = dict(num_text_tokens=text, key_padding_mask=mask, grid=grid)
    out, stats = rectified_attention(q, k, v, config, backend=engine, return_stats=True, **args)
    ref, info = rectified_naive(q, k, v, config, **args)
    assert torch.equal(stats["block_mask"], info["block_mask"])
    assert torch.equal(stats["compensated_mask"], info["compensated_mask"])
    assert rel_rmse(out, ref) < 1e-5
    assert 0 < float(stats["density"]) < 1


@pytest.mark.parametrize("engine", ["torch", "gather"])
def test_padded_video_keys_and_bf16_match_the_naive_reference(engine):
    """Padded keys inside a video block are folded into the plan (``key_valid``); bf16 in, bf16 out."""
    from fastgen.attention.rectified import rectified_attention
    from fastgen.attention.rectified_naive import rectified_naive
    from fastgen.configs import RectifiedSpaAttnConfig

    b, h, n, d = 2, 2, 100, 16
    q, k, v = qkv(b, h, n, d, torch.bfloat16)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 20:27] = False  # inside a block
    config = RectifiedSpaAttnConfig(sparsity=0.5, block_size=16)
    out = rectified_attention(q, k, v, config, key_padding_mask=mask, backend=engine)
    ref, _ = rectified_naive(q.float(), k.float(), v.float(), config, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    assert rel_rmse(out, ref) < 3e-2


def test_stats_are_device_tensors_and_count_extra_keys():
    q, k, v = qkv(1, 2, 128, 16)
    _, plain = rectified_sparse_attention(
        q, k, v, sparsity=0.75, block_size=16, form="none", return_stats=True
    )
    _, default = rectified_sparse_attention(q, k, v, sparsity=0.75, block_size=16, return_stats=True)
    for stats in (plain, default):
        assert all(
            isinstance(stats[key], torch.Tensor)
            for key in ("density", "compensated_fraction", "keys_per_query")
        )
    assert float(plain["keys_per_query"]) == 2 * 16  # two blocks of 16, nothing extra
    # the default adds pooled and isolated keys: more keys per query at the same block density
    assert float(default["density"]) == float(plain["density"])
    assert float(default["keys_per_query"]) > float(plain["keys_per_query"])


def test_paper_selection_keeps_neighbours_and_the_mass_rule():
    from fastgen.attention.rectified import block_neighbours, video_token_index

    grid, bs = (2, 8, 8), 16
    index = video_token_index(128, grid, bs, True, torch.device("cpu"))
    pairs = block_neighbours(grid, index, 128, bs, first_frame=False)
    assert torch.equal(pairs, pairs.T) and bool(pairs.diagonal().all())
    q, k, v = qkv(1, 2, 128, 16)
    _, stats = rectified_sparse_attention(
        q, k, v, sparsity=0.9, block_size=bs, grid=grid, selection="paper", form="none", return_stats=True
    )
    assert bool((stats["block_mask"] >= pairs).all())  # every 3D-adjacent block is kept


def test_no_host_sync_in_a_plain_call(monkeypatch):
    """A Rectified call without key padding (Wan's case) reads no device value back to the host:
    every ``item``/``bool``/``int``/``float`` of a tensor is counted and none may happen."""
    from fastgen.attention.rectified import rectified_attention
    from fastgen.configs import RectifiedSpaAttnConfig

    q, k, v = qkv(1, 2, 3 * 7 * 9, 16)
    config = RectifiedSpaAttnConfig(sparsity=0.7, block_size=16)
    rectified_attention(q, k, v, config, grid=(3, 7, 9))  # builds / warms everything once
    reads = []
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a)
        )
    out = rectified_attention(q, k, v, config, grid=(3, 7, 9))
    monkeypatch.undo()
    assert torch.isfinite(out).all()
    assert reads == []
