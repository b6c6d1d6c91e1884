"""Tests of the one dense-vs-accelerated comparison (warm-up policy, speedup, fidelity), the stats
summaries the demo and batch share, and the tiny-wan-long preset's settings."""

from __future__ import annotations

import numpy as np
import pytest

from fastgen.compare import compare_with_dense, speedup_of, text_fidelity, video_fidelity
from fastgen.stats import mean_stat, stats_layers


class FakePipe:
    """A pipeline stand-in whose first call of each method is slow (a one-time cost)."""


def make_generate(log):
    def generate(pipe, *, method, config=None, progress=True, steps=4, prompt="p", seed=0, **_):
        first = (id(pipe), method) not in {(p, m) for p, m, _ in log}
        log.append((id(pipe), method, steps))
        one_time = 100.0 if first else 0.0
        per_step = 1.0 if method == "dense" else 0.5
        frames = np.full((2, 16, 16, 3), 100 + seed, dtype=np.uint8)
        stats = []
        if method != "dense":
            frames = frames + 2
            stats = [{"layer": 0, "density": 0.5}]  # one layer ran sparse
        return {"seconds": one_time + per_step * steps, "frames": frames, "stats": stats, "config": {}}

    return generate


def test_warm_up_runs_once_per_pipeline_and_method_and_is_excluded():
    log = []
    generate = make_generate(log)
    pipe = FakePipe()
    c = compare_with_dense(generate, pipe, method="rectified", fidelity=video_fidelity, warm_up={"steps": 1},
                           prompt="a", seed=0, steps=4, rounds=1)  # fmt: skip
    assert c.warmed_up
    # one short warm-up call per method first, then the two timed runs
    assert [(m, s) for _, m, s in log] == [("rectified", 1), ("dense", 1), ("rectified", 4), ("dense", 4)]
    assert c.speedup == pytest.approx(4.0 / 2.0)  # the one-time 100 s landed in the warm-up, not here
    assert c.fidelity["psnr"] is not None and 0 < c.fidelity["ssim"] <= 1
    log.clear()
    c2 = compare_with_dense(generate, pipe, method="rectified", fidelity=video_fidelity, warm_up={"steps": 1},
                            prompt="a", seed=0, steps=4, rounds=1)  # fmt: skip
    assert not c2.warmed_up and [m for _, m, _ in log] == ["rectified", "dense"]
    # another pipeline warms up again
    log.clear()
    compare_with_dense(
        generate, FakePipe(), method="rectified", fidelity=video_fidelity, warm_up={"steps": 1}, rounds=1
    )
    assert len(log) == 4


def test_rounds_interleave_and_report_median_range_and_load(monkeypatch):
    """Rounds alternate their order; the speedup is the median of the per-round ratios, shown with
    their range and the load average; a high load adds a warning."""
    times = iter(
        [1.0, 2.0, 4.0, 2.0, 1.0, 3.0]
    )  # round 0: acc, dense; round 1: dense, acc; round 2: acc, dense
    order = []

    def generate(pipe, *, method, config=None, progress=True, **_):
        order.append(method)
        return {"seconds": next(times) if not _.get("warm") else 0.0, "frames": np.zeros((1, 16, 16, 3), np.uint8),
                "stats": [{"layer": 0, "density": 0.5}] if method != "dense" else [], "config": {}}  # fmt: skip

    import fastgen.compare as compare

    monkeypatch.setattr(compare, "load_average", lambda: 3.5)
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 2)
    c = compare_with_dense(generate, FakePipe(), method="rectified", fidelity=video_fidelity,
                           warm_up={"warm": True}, rounds=3)  # fmt: skip
    assert order[2:] == ["rectified", "dense", "dense", "rectified", "rectified", "dense"]
    assert c.speedups == pytest.approx([2.0, 2.0, 3.0]) and c.speedup == pytest.approx(2.0)
    line = c.speed_summary()
    assert "speedup vs dense 2.00x (median of 3 interleaved rounds, range 2.00x-3.00x" in line
    assert "load average 3.50 on 2 CPUs" in line
    assert c.load_warning().startswith("warning: load average 3.50 on 2 CPUs")
    monkeypatch.setattr(compare, "load_average", lambda: 0.1)
    times = iter([1.0, 2.0])
    quiet = compare_with_dense(generate, FakePipe(), method="rectified", fidelity=video_fidelity,
                               warm_up={"warm": True}, rounds=1)  # fmt: skip
    assert quiet.load_warning() is None and "one round says little" in quiet.speed_summary()
    with pytest.raises(ValueError, match="rounds=0 is not allowed"):
        compare_with_dense(
            generate, FakePipe(), method="rectified", fidelity=video_fidelity, warm_up={}, rounds=0
        )


def test_no_speedup_when_sparse_attention_never_ran():
    """warmup_steps >= steps: the accelerated run was dense; the comparison says why and gives no speedup."""

    def generate(pipe, *, method, config=None, progress=True, steps=2, **_):
        return {"seconds": 0.1 if method != "dense" else 0.5, "frames": np.zeros((1, 16, 16, 3), np.uint8),
                "stats": [], "steps": steps, "config": {"warmup_steps": 5} if method != "dense" else {}}  # fmt: skip

    c = compare_with_dense(
        generate, FakePipe(), method="rectified", fidelity=video_fidelity, warm_up={}, steps=2
    )
    assert c.speedup is None and c.speedups == []
    assert c.not_sparse == "warmup_steps=5 >= steps=2"
    assert c.speed_summary() == (
        "no speedup vs dense: sparse attention never ran (warmup_steps=5 >= steps=2); the output is dense"
    )


def test_compare_rejects_dense_and_speedup_handles_missing_times():
    with pytest.raises(ValueError, match="method='dense'"):
        compare_with_dense(make_generate([]), FakePipe(), method="dense", fidelity=video_fidelity, warm_up={})
    assert speedup_of(2.0, 0.0) is None and speedup_of(None, 1.0) is None and speedup_of(3.0, 1.5) == 2.0


def test_text_fidelity_checks_answers_when_known():
    acc = {"tokens": [1, 2, 3, 4], "text": "a01 b02 c03 d00"}
    dense = {"tokens": [1, 2, 3, 5], "text": "a01 b02 c03 d04"}
    fid = text_fidelity(acc, dense, answer="a01 b02 c03 d04")
    assert fid["token_agreement"] == pytest.approx(0.75)
    assert fid["dense_correct"] and not fid["accelerated_correct"]
    assert "dense_correct" not in text_fidelity(acc, dense)


def test_mean_stat_reads_the_layer_rows_the_heatmap_draws():
    # a summary that disagrees with its rows: the rows win, so a table and a picture cannot disagree
    stats = {"density": 0.667, "layers": [{"layer": 0, "density": 0.25}, {"layer": 1, "density": 0.75}]}
    assert mean_stat(stats, "density") == pytest.approx(0.5)
    assert mean_stat(stats_layers(stats), "density") == pytest.approx(0.5)
    # no rows: only a dict's own summary, and nothing from a bare list
    assert mean_stat({"density": 0.3}, "density") == pytest.approx(0.3)
    assert mean_stat(stats_layers({"density": 0.3}), "density") is None
    assert mean_stat([{"layer": 0, "density": 0.2}, {"layer": 1}], "density") == pytest.approx(0.2)


def test_tiny_wan_long_preset_is_attention_bound_and_sparse_by_default():
    from fastgen.pipelines.video_runner import default_rectified_config

    from fastgen.pipelines import get_preset, load_preset

    assert get_preset("tiny-wan-long").kind == "video"
    pipe = load_preset("tiny-wan-long")
    d = pipe.fastgen_defaults
    tokens = ((d["frames"] - 1) // pipe.vae_scale_factor_temporal + 1) * (
        d["height"] // pipe.vae_scale_factor_spatial
    ) * (d["width"] // pipe.vae_scale_factor_spatial)  # fmt: skip
    assert tokens >= 4096  # a few thousand tokens per frame stack, patch 1x1x1
    config = default_rectified_config(pipe)
    assert config.dense_layers == 0 and config.warmup_steps < d["steps"] and config.sparsity >= 0.8
    # explicit options still win over the preset's defaults
    assert default_rectified_config(pipe, sparsity=0.5).sparsity == 0.5
    assert default_rectified_config(None).dense_layers == 1  # real checkpoints keep the class defaults
