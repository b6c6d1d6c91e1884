"""fastgen's sparse attention under diffusers' context parallelism (CPU, gloo, torchrun).

The multi-rank tests launch ``tests/cp_worker.py`` under ``python -m torch.distributed.run`` with 2
(default run) or 4 ranks (slow): every rank compares its context-parallel output, per-head block
masks and statistics with the single-process run it computed itself (fp32, relative error < 1e-5).
diffusers 0.42 divides by ``torch.accelerator.device_count()`` (0 on CPU-only torch) when it
resolves the parallel config; the worker, not the library, makes it return 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgen.processors.context_parallel import deinterleave, interleaved_order, reinterleave
from fastgen.processors.context_parallel_plans import (
    ContextParallelGuardHook,
    degrees,
    enable_context_parallel,
)

WORKER = Path(__file__).with_name("cp_worker.py")


def run_worker(ranks: int, *scenarios: str, timeout: int = 600) -> str:
    """Run the worker's scenarios on ``ranks`` gloo ranks; its output (fails with it on a non-zero exit)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    proc = subprocess.run(
        [*cmd, str(WORKER), *scenarios],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=WORKER.parent.parent,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    for name in scenarios:
        assert f"CP-OK {name} " in output, output[-6000:]
    return output


# ------------------------------------------------------------------------- multi-rank (torchrun)


def test_two_ranks_ulysses_dense_and_sparse_equal_single_process():
    """2 ranks, Ulysses (the fast one, about 30 s on an idle 2-core machine): dense Wan; Rectified
    SpaAttn on Wan (output, masks of the rank's global heads, gathered statistics); HunyuanVideo dense
    with text padding (6) longer than a rank's text share (4): the plain plan is measurably wrong,
    fastgen's plan exact."""
    run_worker(2, "wan_dense", "wan_sparse", "hunyuan_dense")


def test_two_ranks_sparse_hunyuan_bf16_and_guards():
    """2 ranks: HunyuanVideo sparse (padded text) and bf16 Wan sparse exact; heads not divisible by
    U, tokens not divisible by P, a per-frame timestep and HunyuanVideo token_replace raise one clear
    error; a processor set by hand after enabling gets the parallel config (logged) and, without a
    global grid, runs dense with a log line, equal to the single process; a per-query HunyuanVideo
    mask runs dense with the rank's query rows, exact."""
    run_worker(2, "hunyuan_sparse", "wan_sparse_bf16", "guards", "hunyuan_query_mask")


def test_two_ranks_ring_and_causal_wan():
    """2 ranks: ring: Rectified SpaAttn for the rank's query rows over all-gathered keys, Wan and
    HunyuanVideo with padded text (output, masks, statistics equal the single process). Causal Wan
    (Self-Forcing pipeline): latents over 4 chunks with a rolling window and a sink equal the single
    process, RoPE absolute and window, causal processors installed before or after
    enable_parallelism, the KV cache split over ranks; the same under ring (the chunk's q/k/v
    all-gathered over the ring group)."""
    run_worker(2, "wan_ring", "hunyuan_ring", "causal", "causal_ring")


@pytest.mark.slow
def test_two_ranks_ring_dense_fallback_two_grids_i2v_light_forcing():
    """2 ranks: the logged dense all-gather-K/V form where the sparse call has no ring form, exact
    (Wan, HunyuanVideo); ring sparse on two grids of the same token count in turn; Wan 2.1 I2V
    (image tokens in the cross-attention context) sparse under Ulysses, fastgen applied after
    enable_parallelism; Light Forcing on the causal Wan under Ulysses and ring: latents and the rank's
    per-head masks equal."""
    run_worker(
        2,
        "ring_dense",
        "ring_two_grids",
        "wan_i2v_sparse",
        "causal_light_forcing",
        "causal_light_forcing_ring",
    )


@pytest.mark.slow
def test_four_ranks_ulysses_dense_and_sparse_equal_single_process():
    """Every scenario at 4 ranks (one head per rank, text share 2; unified = Ulysses 2 x ring 2, the
    causal Wan included)."""
    run_worker(
        4,
        "wan_dense",
        "wan_sparse",
        "wan_sparse_bf16",
        "wan_i2v_sparse",
        "hunyuan_dense",
        "hunyuan_sparse",
        "guards",
        "hunyuan_query_mask",
        "wan_ring",
        "hunyuan_ring",
        "ring_dense",
        "ring_two_grids",
        "causal",
        "causal_light_forcing",
        "causal_ring",
        "causal_light_forcing_ring",
    )


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize("world", [1, 2, 4])
def test_interleave_round_trip_and_order(world):
    """deinterleave puts [V_0,T_0,V_1,T_1,...] into [V; T] order (the order interleaved_order
    describes), reinterleave undoes it exactly; batch > 1 and trailing dims kept."""
    n_video, n_text = 12 * world, 3 * world
    canonical = torch.randn(2, n_video + n_text, 3, 5)
    order = interleaved_order(n_video, n_text, world)
    assert sorted(order.tolist()) == list(range(n_video + n_text))
    exchanged = canonical[:, order]
    assert torch.equal(deinterleave(exchanged, n_text // world, world), canonical)
    assert torch.equal(reinterleave(canonical, n_text // world, world), exchanged)
    if world > 1:
        assert not torch.equal(exchanged, canonical)


def test_degrees_and_their_errors():
    """Mode/degree resolution, and one clear error naming the value for what is not allowed."""
    assert degrees("ulysses", 4, heads=12) == (4, 1)
    assert degrees("ring", 4, heads=3) == (1, 4)
    assert degrees("unified", 8, heads=12) == (4, 2)
    assert degrees("unified", 8, heads=12, ulysses_degree=2) == (2, 4)
    with pytest.raises(ValueError, match="mode='sideways'.*allowed: ulysses, ring, unified"):
        degrees("sideways", 2, heads=4)
    with pytest.raises(ValueError, match="5 attention heads are not divisible by ulysses_degree=2"):
        degrees("ulysses", 2, heads=5)
    with pytest.raises(ValueError, match="degree=1 is not allowed"):
        degrees("ulysses", 1, heads=4)
    with pytest.raises(ValueError, match="ulysses_degree=3 is not allowed for unified over 8"):
        degrees("unified", 8, heads=12, ulysses_degree=3)
    with pytest.raises(ValueError, match="no Ulysses degree"):
        degrees("unified", 4, heads=3)


def test_enable_refuses_unsupported_model_and_missing_process_group():
    """A model fastgen has no plan for, and a call outside torchrun, fail with one clear line."""
    with pytest.raises(ValueError, match="Linear is not supported; allowed: WanTransformer3DModel"):
        enable_context_parallel(torch.nn.Linear(2, 2), "ulysses")
    sys.path.insert(0, str(WORKER.parent))
    from cp_worker import tiny_wan

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        enable_context_parallel(tiny_wan(), "ulysses")


def test_token_share_guard_names_grid_and_size():
    """Tokens not divisible by the context-parallel size: a ValueError before diffusers' sharder."""
    sys.path.insert(0, str(WORKER.parent))
    from cp_worker import tiny_hunyuan, tiny_wan, wan_inputs

    guard = ContextParallelGuardHook(4)
    inputs = wan_inputs(grid=(3, 3, 5))  # 45 tokens
    with pytest.raises(
        ValueError, match=r"grid \(3, 3, 5\) has 45 tokens, not divisible by the context-parallel size 4"
    ):
        guard.pre_forward(tiny_wan(), **inputs)
    guard.pre_forward(tiny_wan(), **wan_inputs(grid=(4, 3, 5)))  # 60 tokens: fine
    text = torch.zeros(1, 6, 16)
    with pytest.raises(ValueError, match="6 text tokens are not divisible by the context-parallel size 4"):
        guard.pre_forward(
            tiny_hunyuan(), hidden_states=torch.zeros(1, 4, 4, 4, 4), encoder_hidden_states=text
        )


@pytest.mark.slow
def test_bench_cp_runs_and_checks_its_outputs(tmp_path):
    """``fastgen.bench.context_parallel`` under torchrun (2 ranks, tiny): the report has both ratios and
    the communication share, and the sparse CP outputs equal the single-process ones (no timing checked)."""
    import json

    report = tmp_path / "cp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "fastgen.bench.context_parallel", "--tokens", "1024", "--heads", "2", "--rounds", "3"]
    proc = subprocess.run([*cmd, "--json", str(report)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(report.read_text())
    assert result["world"] == 2 and 0 < result["density"] < 1
    assert result["max_rel_err_vs_single"] < 1e-5
    assert 0 < result["cp"]["sparse"]["communication_share"] < 1
    assert {"cp_attention_ratio", "cp_total_ratio", "within_10_percent"} <= set(result)
    assert "ratio sparse/dense under CP" in proc.stdout
    paired = result["paired_ratio_vs_single"]
    assert 0 < paired["q1"] <= paired["median"] <= paired["q3"]


def test_bench_cp_paired_ratio_takes_each_rounds_slowest_rank():
    """The round-by-round comparison: per round, each call's slowest rank, then (CP sparse / CP dense) over
    (single sparse / single dense); worked out by hand for two ranks and three rounds."""
    from fastgen.bench.context_parallel import NAMES, _paired_ratio_vs_single

    def rank_times(single_dense, single_sparse, cp_dense, cp_sparse):
        times = {n: [1.0, 1.0, 1.0] for n in NAMES}
        times.update(single_dense=single_dense, single_sparse=single_sparse)
        times.update(cp_dense_attn=cp_dense, cp_sparse_attn=cp_sparse)
        return times

    a = rank_times([10, 10, 20], [4, 5, 8], [5, 6, 10], [2, 3, 4])
    b = rank_times([8, 12, 20], [4, 4, 8], [6, 6, 10], [2, 2, 5])
    # round 1: single 4/10, CP 2/6 -> (1/3)/(2/5) = 5/6; round 2: single 5/12, CP 3/6 -> 6/5;
    # round 3: single 8/20, CP 5/10 -> 5/4
    got = _paired_ratio_vs_single([a, b], rounds=3)
    assert got["median"] == pytest.approx(6 / 5)
    assert got["q1"] <= 6 / 5 <= got["q3"] and got["q1"] < got["q3"]
