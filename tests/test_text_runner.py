"""Tests of the text runner: ``generate_text`` and ``fastgen generate`` for the tiny-llada preset."""

from __future__ import annotations

import pytest
import torch
from fastgen.pipelines.text_runner import default_sparsed_config, generate_text, load_text_pipeline

from fastgen.cli import main


@pytest.fixture(scope="module")
def pipe():
    return load_text_pipeline(preset="tiny-llada", device="cpu", dtype="float32")


def test_generate_text_dense_returns_all_keys(pipe):
    result = generate_text(
        pipe, prompt="Hello", seed=1, gen_length=16, steps=4, block_length=8, method="dense"
    )
    assert set(result) >= {"text", "tokens", "seconds", "tokens_per_s", "stats", "config", "method"}
    assert len(result["tokens"]) == 16 and result["tokens_per_s"] > 0
    assert result["config"]["steps"] == 4 and result["config"]["method"] == {"method": "dense"}
    again = generate_text(
        pipe, prompt="Hello", seed=1, gen_length=16, steps=4, block_length=8, method="dense"
    )
    assert again["tokens"] == result["tokens"]


def test_generate_text_sparsed_runs_sparse(pipe):
    """SparseD must really run: ``method`` says so, every layer reports a pattern with density < 1 (a
    silent dense fallback reports ``dense`` or density 1.0 and fails here), the adapter is removed after."""
    from fastgen import SparseDConfig

    config = SparseDConfig(block_size=16, select=0.3)  # 65+ tokens -> 5 blocks of 16, 0.3 keeps ~2
    kw = dict(prompt="Hello", gen_length=64, steps=8, block_length=32, progress=False)
    result = generate_text(pipe, method="sparsed", config=config, **kw)
    dense = generate_text(pipe, method="dense", **kw)
    assert len(result["tokens"]) == 64
    assert result["method"] == "sparsed" and result["config"]["method"]["method"] == "sparsed"
    layers = result["stats"]["layers"]
    assert len(layers) == pipe.model.config.num_hidden_layers
    assert all(row["density"] < 0.8 and row["block_mask"].dtype == torch.bool for row in layers)
    assert result["stats"]["density"] < 0.8
    assert not all(row["block_mask"].all() for row in layers)
    agreement = sum(a == b for a, b in zip(result["tokens"], dense["tokens"])) / 64
    assert agreement >= 0.5  # measured 43/64 on this random-weight model
    assert getattr(pipe.model, "_fastgen_adapter", None) is None


def test_bad_method_and_preset(pipe):
    with pytest.raises(ValueError, match="method"):
        generate_text(pipe, prompt="a", method="rectified")
    with pytest.raises(ValueError, match="preset"):
        load_text_pipeline(preset="tiny-wan")
    with pytest.raises(ValueError, match="dtype"):
        load_text_pipeline(dtype="float64")


def test_default_sparsed_config_block_size():
    assert default_sparsed_config(100).block_size == 32
    assert default_sparsed_config(100_000).block_size == 128
    assert default_sparsed_config(100, block_size=64, select=0.5).select == 0.5


def test_cli_generate_compare_dense_and_out(tmp_path, capsys):
    out = tmp_path / "nested" / "out.txt"
    argv = [
        "generate", "--preset", "tiny-llada", "--method", "sparsed", "--prompt", "Once upon",
        "--gen-length", "64", "--steps", "8", "--block-length", "32", "--block-size", "16",
        "--device", "cpu", "--compare-dense", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "token agreement with dense" in printed
    assert "speedup vs dense " in printed and "interleaved rounds" in printed and "load average" in printed
    text = out.read_text(encoding="utf-8")
    assert printed.startswith(text)
    assert not list(out.parent.glob(".*partial*"))
    lines = printed.splitlines()
    density = next(line for line in lines if "attention density" in line)
    assert density.startswith("[sparsed]") and float(density.rsplit(" ", 1)[1]) < 0.8


def test_cli_rejects_video_method(capsys):
    with pytest.raises(SystemExit) as err:
        main(
            [
                "generate",
                "--preset",
                "tiny-llada",
                "--method",
                "rectified",
                "--prompt",
                "x",
                "--device",
                "cpu",
            ]
        )
    assert err.value.code == 2 and "--method='rectified' is not allowed for text" in capsys.readouterr().err


def test_tiny_pipeline_is_float32_on_cpu(pipe):
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"


def test_kernel_build_happens_before_the_timed_call(pipe, monkeypatch):
    """A first build of the native CPU kernel (15-60 s) must not be counted in ``seconds``."""
    import fastgen.pipelines.text_runner as text_runner

    order = []
    monkeypatch.setattr(text_runner, "warm_up_cpu_kernel", lambda: order.append("warm-up"))
    real_call = type(pipe).__call__
    monkeypatch.setattr(
        type(pipe), "__call__", lambda self, **kw: order.append("call") or real_call(self, **kw)
    )
    generate_text(pipe, prompt="Hello", gen_length=16, steps=4, block_length=8, method="sparsed")
    assert order[:2] == ["warm-up", "call"]


def test_warm_up_logs_a_slow_build(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from fastgen.kernels import cpu_attn

    clock = iter([0.0, 30.0])
    monkeypatch.setattr(cpu_attn, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(cpu_attn, "cpu_kernel_unavailable", lambda: None)
    with caplog.at_level(logging.INFO, logger="fastgen.kernels.cpu_attn"):
        assert cpu_attn.warm_up_cpu_kernel() is None
    assert "built the native CPU attention kernel in 30 s" in caplog.text
