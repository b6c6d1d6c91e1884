"""SelectionPlan + execute_plan: every engine against the dense plain-PyTorch reference
(``fastgen.attention.naive``) at awkward shapes, and the capability table that picks engines."""

from __future__ import annotations

import logging

import pytest
import torch

from fastgen.attention.backends import backend_spec, resolve_backend
from fastgen.attention.naive import naive_plan_attention
from fastgen.attention.plan import SelectionPlan, execute_plan

from .helpers import rel_rmse

ENGINES = ["torch", "gather", "triton", "flex"]


def _plan(b, h, nq, nk, d, bs, *, extras=0, visible=True, key_valid=False, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-nq // bs), -(-nk // bs)
    mask = torch.rand(b, h, nqb, nkb, generator=g) < density
    mask[0, 0, 0] = False  # one query block that sees no key block
    fields = {}
    if extras:
        fields = dict(
            extra_k=torch.randn(b, h, extras + 3, d, generator=g),  # 3 padding rows never read
            extra_v=torch.randn(b, h, extras + 3, d, generator=g),
            extra_log_weight=torch.randn(b, h, extras, generator=g).masked_fill(
                torch.rand(b, h, extras, generator=g) < 0.2, float("-inf")
            ),
        )
        if not visible:
            fields["extra_visible"] = torch.rand(b, h, nqb, extras, generator=g) < 0.5
    if key_valid:
        valid = torch.rand(b, nk, generator=g) > 0.3
        valid[:, 0] = True
        fields["key_valid"] = valid
    return SelectionPlan.from_block_mask(mask, bs, nq, nk, **fields)


def _qkv(b, h, nq, nk, d, dtype):
    q = torch.randn(b, h, nq, d).to(dtype)
    k = torch.randn(b, h, nk, d).to(dtype)
    v = torch.randn(b, h, nk, d).to(dtype)
    return q, k, v


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        dict(),  # selected blocks only
        dict(extras=7),  # extra keys seen by every query block
        dict(extras=5, visible=False),  # extra keys per query block
        dict(extras=4, visible=False, key_valid=True),  # padded keys inside selected blocks
    ],
    ids=["blocks", "extras", "visible", "padded"],
)
def test_every_engine_matches_the_naive_plan(engine, dtype, case):
    # q shorter than k (Light Forcing: chunk queries over cache + chunk), neither a block multiple
    b, h, nq, nk, d, bs = 2, 3, 45, 83, 32, 16
    q, k, v = _qkv(b, h, nq, nk, d, dtype)
    plan = _plan(b, h, nq, nk, d, bs, **case)
    ref, ref_lse = naive_plan_attention(q.float(), k.float(), v.float(), plan)
    out, lse = execute_plan(q, k, v, plan, backend=engine, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_rmse(out, ref) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max() < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("engine", ["torch", "gather", "flex", "triton"])
def test_keys_past_kv_len_are_never_attended(engine):
    b, h, nq, d, bs = 1, 2, 40, 16, 16
    q, k, v = _qkv(b, h, nq, 64, d, torch.float32)
    plan = SelectionPlan.from_block_mask(torch.ones(b, h, 3, 3, dtype=torch.bool), bs, nq, 37)
    out = execute_plan(q, k, v, plan, backend=engine)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 37:] = 1e3  # garbage in the padded tail must not matter
    v2[:, :, 37:] = float("nan")
    assert torch.allclose(execute_plan(q, k2, v2, plan, backend=engine), out, atol=1e-6)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :37], v[:, :, :37])
    assert rel_rmse(out, dense) < 1e-5


def test_extra_bias_is_the_packed_form_of_log_weight_and_visibility():
    plan = _plan(2, 2, 50, 50, 8, 16, extras=6, visible=False)
    bias = plan.extra_bias()
    assert bias.shape == (2, 2, 4, 6) and bias.dtype == torch.float32
    for b in range(2):
        for h in range(2):
            for i in range(4):
                for p in range(6):
                    w = plan.extra_log_weight[b, h, p]
                    expected = w if plan.extra_visible[b, h, i, p] else float("-inf")
                    assert bias[b, h, i, p] == expected
    assert _plan(1, 1, 40, 40, 8, 16).extra_bias() is None


def test_block_mask_round_trip_density_and_keys_per_query():
    mask = torch.tensor([[[[True, False, True], [False, False, False], [True, True, True]]]])
    plan = SelectionPlan.from_block_mask(mask, 16, 40, 40)  # key blocks hold 16, 16, 8 tokens
    assert torch.equal(plan.block_mask, mask)
    assert plan.density().item() == pytest.approx(5 / 9)
    assert plan.keys_per_query().item() == pytest.approx((24 + 0 + 40) / 3)
    extra = SelectionPlan.from_block_mask(
        mask,
        16,
        40,
        40,
        extra_k=torch.zeros(1, 1, 2, 4),
        extra_v=torch.zeros(1, 1, 2, 4),
        extra_log_weight=torch.tensor([[[0.0, float("-inf")]]]),
    )
    assert extra.keys_per_query().item() == pytest.approx((24 + 0 + 40) / 3 + 1)


def test_bad_plan_is_a_value_error_naming_the_field():
    q, k, v = _qkv(1, 2, 40, 40, 8, torch.float32)
    plan = _plan(1, 2, 48, 40, 8, 16)
    with pytest.raises(ValueError, match="q_len"):
        execute_plan(q, k, v, plan)
    plan = _plan(1, 2, 40, 40, 8, 16, extras=3)
    bad = SelectionPlan(
        16, 40, 40, plan.block_indices, plan.block_counts, extra_log_weight=plan.extra_log_weight
    )
    with pytest.raises(ValueError, match="extra_k"):
        execute_plan(q, k, v, bad)


def test_triton_spec_refuses_head_dim_96_and_grad_and_falls_back_with_one_log(caplog, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = backend_spec("triton")
    assert "head_dim 96" in spec.unsupported(torch.device("cpu"), torch.float32, 96)
    assert "grad" in spec.unsupported(torch.device("cpu"), torch.float32, 64, requires_grad=True)
    with caplog.at_level(logging.WARNING):
        name = resolve_backend("triton", torch.device("cpu"), dtype=torch.float32, head_dim=96)
    assert name == "gather" and "head_dim 96" in caplog.text
    # end to end: a head_dim-96 call asked of Triton runs (on another engine) and is right
    q, k, v = _qkv(1, 1, 40, 40, 96, torch.float32)
    plan = _plan(1, 1, 40, 40, 96, 16, extras=2)
    assert (
        rel_rmse(execute_plan(q, k, v, plan, backend="triton"), naive_plan_attention(q, k, v, plan)[0]) < 1e-5
    )


@pytest.mark.parametrize("engine", ["gather", "triton", "flex"])
def test_inputs_that_need_grad_keep_their_gradients(engine):
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 40, 40, 16, torch.float32))
    plan = _plan(1, 2, 40, 40, 16, 16, extras=3)
    execute_plan(q, k, v, plan, backend=engine).square().sum().backward()
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    naive_plan_attention(q2, k2, v2, plan)[0].square().sum().backward()
    for a, e in ((q, q2), (k, k2), (v, v2)):
        assert a.grad is not None and rel_rmse(a.grad, e.grad) < 1e-5
