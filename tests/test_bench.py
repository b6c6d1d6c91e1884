"""The attention benchmark harness, its workloads, the bench CLI and the gather fast path's chunking."""

from __future__ import annotations

import json

import pytest
import torch

from fastgen.attention import block_sparse_attention
from fastgen.bench import attention as bench_attention
from fastgen.bench import cli as bench_cli
from fastgen.bench.workloads import text_workload, topk_block_mass, video_workload
from fastgen.cli import main as fastgen_main
from tests.helpers import masked_reference, rel_rmse, token_mask_from_blocks

ROW_KEYS = {
    "method",
    "sparsity",
    "density",
    "keys_per_query",
    "effective_density",
    "ideal",
    "speedup",
    "speedup_best",
    "fraction_of_ideal",
    "time_s",
    "select_s",
    "rel_l2",
    "cosine",
    "peak_bytes",
    "dense_peak_bytes",
}


# ---------------------------------------------------------------- workloads


def test_video_workload_shapes_padding_and_seed():
    w = video_workload((2, 4, 6), heads=3, head_dim=24, num_text_tokens=10, text_valid=7, batch=2, seed=3)
    assert w.q.shape == w.k.shape == w.v.shape == (2, 3, 48 + 10, 24)
    assert w.grid == (2, 4, 6) and w.num_text_tokens == 10
    assert w.key_padding_mask.shape == (2, 58)
    assert w.key_padding_mask[:, :55].all() and not w.key_padding_mask[:, 55:].any()
    again = video_workload((2, 4, 6), heads=3, head_dim=24, num_text_tokens=10, text_valid=7, batch=2, seed=3)
    assert torch.equal(w.q, again.q) and torch.equal(w.v, again.v)
    assert video_workload((2, 4, 6), 3, 24, dtype=torch.bfloat16).q.dtype == torch.bfloat16
    assert video_workload((2, 4, 6), 3, 24).key_padding_mask is None


def test_workloads_reject_bad_arguments():
    with pytest.raises(ValueError, match="head_dim"):
        video_workload((2, 4, 4), heads=2, head_dim=7)
    with pytest.raises(ValueError, match="text_valid"):
        video_workload((2, 4, 4), heads=2, head_dim=16, num_text_tokens=4, text_valid=5)
    with pytest.raises(ValueError, match="retrieval_heads"):
        text_workload(64, heads=2, head_dim=16, retrieval_heads=3)


def test_workloads_are_peaked_unlike_random():
    """Most attention mass falls in the top 15% key blocks; random q/k spread it almost uniformly."""
    video = video_workload((4, 8, 16), heads=3, head_dim=32, num_text_tokens=16, text_valid=12)
    text = text_workload(512, heads=4, head_dim=32)
    video_mass = topk_block_mass(video.q, video.k, 32, 0.15, video.key_padding_mask)
    text_mass = topk_block_mass(text.q, text.k, 32, 0.15)
    random_mass = topk_block_mass(torch.randn(1, 3, 512, 32), torch.randn(1, 3, 512, 32), 32, 0.15)
    assert random_mass < 0.3
    assert video_mass > 0.6
    assert text_mass > 0.6


# ---------------------------------------------------------------- harness


def test_bench_attention_end_to_end(tmp_path, capsys):
    json_path, png_path = tmp_path / "out.json", tmp_path / "out.png"
    argv = ["bench", "attention", "--grid", "2", "8", "8", "--heads", "2", "--head-dim", "32"]
    argv += ["--block-size", "32", "--text-tokens", "12", "--text-valid", "9", "--sparsity", "0.5", "0.75"]
    argv += ["--repeats", "1", "--json", str(json_path), "--plot", str(png_path)]
    assert fastgen_main(argv) == 0
    table = capsys.readouterr().out
    assert "block_sparse" in table and "SDPA" in table
    result = json.loads(json_path.read_text())
    assert set(result) == {"config", "dense", "rows"}
    assert result["config"]["tokens"] == 2 * 8 * 8 + 12 and result["config"]["padded_keys"] == 3
    assert {r["method"] for r in result["rows"]} == {"block_sparse", "rectified"}
    for row in result["rows"]:
        assert ROW_KEYS <= set(row)
        assert 0 < row["density"] <= 1 and row["speedup"] > 0
        assert 0 <= row["rel_l2"] < 1 and 0 < row["cosine"] <= 1
        assert row["peak_bytes"] is None or row["peak_bytes"] >= 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_text_workload_with_sparsed(tmp_path):
    w = bench_attention.make_workload("text", heads=2, head_dim=16, tokens=200)
    result = bench_attention.run_attention_bench(
        w, ("block_sparse", "sparsed"), (0.5,), block_size=32, repeats=1, measure_memory=False
    )
    assert [r["method"] for r in result["rows"]] == ["block_sparse", "sparsed"]
    for row in result["rows"]:
        assert ROW_KEYS <= set(row)
        # equal work is counted in keys: density is keys per query over the 200 keys, and the ideal
        # speed-up and the fraction of it follow from the measured figures
        assert row["keys_per_query"] == pytest.approx(row["density"] * 200, rel=1e-5)
        assert row["ideal"] == pytest.approx(1 / row["effective_density"], rel=1e-5)
        assert row["fraction_of_ideal"] == pytest.approx(row["speedup"] / row["ideal"], rel=1e-5)
        assert 0.0 < row["rel_l2"] < 1.0 and 0.0 < row["cosine"] <= 1.0


def test_bench_dense_selection_has_no_error():
    """At sparsity 0 every block is kept: block_sparse equals SDPA, so the error columns read ~0."""
    w = bench_attention.make_workload(
        "video", heads=2, head_dim=16, grid=(2, 4, 10), num_text_tokens=6, text_valid=4
    )
    result = bench_attention.run_attention_bench(w, ("block_sparse",), (0.0,), block_size=16, repeats=1)
    row = result["rows"][0]
    assert row["density"] == 1.0
    assert row["rel_l2"] < 1e-5 and row["cosine"] > 0.99999


def test_bench_rejects_bad_arguments():
    w = bench_attention.make_workload("text", heads=1, head_dim=16, tokens=64)
    with pytest.raises(ValueError, match="method"):
        bench_attention.run_attention_bench(w, ("nope",), (0.5,), block_size=16, repeats=1)
    with pytest.raises(ValueError, match="workload"):
        bench_attention.make_workload("audio")
    with pytest.raises(ValueError, match="shape"):
        bench_attention._parse_shape("1,2,3")


def test_grid_for_tokens_factors_exactly():
    for n in (14080, 1024, 97, 300):
        f, h, w = bench_attention.grid_for_tokens(n)
        assert f * h * w == n
    assert bench_attention.grid_for_tokens(14080) == (11, 32, 40)


# ---------------------------------------------------------------- CLI


def test_bench_attention_help(capsys):
    with pytest.raises(SystemExit) as exc:
        fastgen_main(["bench", "attention", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--target" in out and "--sparsity" in out and "--plot" in out


def test_bench_pass_through_suite(monkeypatch, capsys):
    """Suites other than attention hand every argument to their module's main(argv)."""
    import sys
    import types

    seen = {}
    fake = types.ModuleType("fastgen_fake_suite")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fastgen_fake_suite", fake)
    monkeypatch.setitem(bench_cli.PASS_THROUGH_SUITES, "transformer", ("fastgen_fake_suite", "fake"))
    assert fastgen_main(["bench", "transformer", "--steps", "2", "--help"]) == 0
    assert seen["argv"] == ["--steps", "2", "--help"]
    monkeypatch.setitem(bench_cli.PASS_THROUGH_SUITES, "transformer", ("fastgen_missing_suite", "fake"))
    with pytest.raises(SystemExit) as exc:
        fastgen_main(["bench", "transformer"])
    assert exc.value.code == 2
    assert "not available" in capsys.readouterr().err


# ---------------------------------------------------------------- gather fast path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_many_small_chunks_matches_reference(cpu_engine, monkeypatch, dtype):
    """A tiny slab budget forces one query block per chunk; ragged selections must stay exact."""
    monkeypatch.setenv("FASTGEN_GATHER_CHUNK_MB", "0.0001")
    b, h, n, d, bs = 2, 3, 150, 16, 32
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))
    mask = torch.rand(b, h, 5, 5) < 0.5
    mask[0, 0, 1] = False  # a query block with nothing selected
    out, lse = block_sparse_attention(q, k, v, mask, bs, return_lse=True, backend="gather")
    ref, ref_lse = masked_reference(q, k, v, token_mask_from_blocks(mask, n, n, bs))
    assert rel_rmse(out, ref) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.all(out[0, 0, 32:64] == 0) and torch.all(torch.isinf(lse[0, 0, 32:64]))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-3 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("model,layers", [("wan", 1), ("hunyuan", 2)])
def test_transformer_bench_runs_dense_and_sparse_in_turn(model, layers):
    from fastgen.bench.transformer import run_transformer_bench

    result = run_transformer_bench(
        model=model,
        grid=(2, 8, 16),
        heads=2,
        head_dim=32,
        layers=layers,
        sparsity=0.5,
        block_size=16,
        repeats=2,
    )
    assert result["model"] == model and result["tokens"] == 256
    assert result["density"] < 1.0  # the sparse path really ran
    assert result["speedup"] > 0 and result["median_speedup"] > 0
    assert result["fastgen_dense_seconds"] > 0 and result["speedup_from_sparsity"] > 0
    assert 0 < result["no_self_attention_seconds"]
    assert 0 <= result["attention_share_of_fastgen_dense"] <= 1  # timing-derived: no strict bound under load
    assert result["ideal_speedup_from_sparsity"] >= 1.0
    assert result["rel_l2_error"] < 0.5


def test_transformer_bench_rejects_an_unknown_model():
    from fastgen.bench.transformer import run_transformer_bench

    with pytest.raises(ValueError, match="model='flux'"):
        run_transformer_bench(model="flux")


# ---------------------------------------------------------------- issue 14: honest comparisons


def test_random_block_mask_keeps_each_rows_count():
    like = torch.rand(1, 3, 7, 9) < 0.3
    mask = bench_attention.random_block_mask(like, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and torch.equal(mask.sum(-1), like.sum(-1))
    assert not torch.equal(mask, like)


def test_fidelity_rows_count_keys_and_match_top_k_at_equal_keys():
    from fastgen.bench import fidelity

    rows = fidelity.run_fidelity(
        sparsities=(0.75,),
        variants=("topk", "isolated", "default", "paper"),
        grid=(2, 8, 8),
        heads=2,
        head_dim=16,
        block_size=16,
        text_tokens=4,
        padded_text=1,
    )
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"topk", "isolated", "default", "paper", fidelity.MATCHED}
    assert by["topk"]["ratio_to_topk"] == 1.0 and by[fidelity.MATCHED]["ratio_to_topk_at_keys"] == 1.0
    # extra keys are counted: the default attends to more keys than its block density says
    assert by["default"]["keys_per_query"] > by["topk"]["keys_per_query"]
    assert by["default"]["density"] == by["topk"]["density"]
    assert by[fidelity.MATCHED]["keys_per_query"] >= by["default"]["keys_per_query"]
    assert "topk@keys" in fidelity.format_table(rows)


def test_fidelity_cost_times_selection_and_attention_of_both():
    from fastgen.bench import fidelity

    cost = fidelity.measure_cost(grid=(2, 8, 8), heads=2, head_dim=16, block_size=16, text_tokens=4, rounds=1)
    for name in ("topk", "default"):
        assert cost[f"{name}_selection"] > 0 and cost[f"{name}_attention"] > 0
    assert "sdpa" in cost and "loadavg_1m" in cost
