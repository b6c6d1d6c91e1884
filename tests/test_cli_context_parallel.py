"""``--context-parallel`` of ``fastgen generate`` / ``fastgen batch``: every refusal is ONE line with exit
status 2 before any model is loaded (in-process, the launcher's environment set with monkeypatch), and a
real 2-rank run under ``python -m torch.distributed.run`` on gloo through ``tests/cp_cli_wrapper.py``
(which, like ``tests/cp_worker.py``, makes ``torch.accelerator.device_count`` return 1 on a CPU rank)
whose video equals a single-process run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastgen.cli import main

WRAPPER = Path(__file__).with_name("cp_cli_wrapper.py")
GEN = ["generate", "--preset", "tiny-wan", "--prompt", "a cat"]


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def world(monkeypatch, tmp_path):
    """Set the launcher's environment: ``world(n)`` as torchrun would for rank 0 of ``n``."""
    monkeypatch.chdir(tmp_path)

    def set_world(n: int | None):
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        if n is not None:
            monkeypatch.setenv("WORLD_SIZE", str(n))
            monkeypatch.setenv("RANK", "0")
            monkeypatch.setenv("LOCAL_RANK", "0")

    return set_world


def _no_load(monkeypatch):
    """Loading a model fails the test: every refusal comes before it."""
    import pipelines.video_runner as runner  # noqa: F401 - the folder behind fastgen.pipelines

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("fastgen.pipelines.video_runner.load_video_pipeline", boom)
    monkeypatch.setattr("fastgen.pipelines.text_runner.load_text_pipeline", boom)


# (id, world size, extra argv, expected fragment of the one line)
CASES = [
    ("no-torchrun", None, [*GEN, "--context-parallel", "ulysses"],
     "needs one process per GPU; launch with `torchrun --nproc-per-node N -m fastgen.cli generate ...` (WORLD_SIZE is unset)"),
    ("world-1", 1, [*GEN, "--context-parallel", "ring"], "(WORLD_SIZE is 1)"),
    ("text", 2, ["generate", "--preset", "tiny-llada", "--prompt", "hi", "--context-parallel", "ulysses"],
     "--context-parallel=ulysses is for video models (Wan, HunyuanVideo, the causal Wan); this run is text"),
    ("causal-no-gpu", 2, ["generate", "--preset", "tiny-causal-wan", "--prompt", "a cat", "--context-parallel", "ring"],
     "--context-parallel=ring: no GPU is visible"),
    ("degree-not-divisor", 4, [*GEN, "--context-parallel", "ulysses", "--cp-degree", "3"],
     "--cp-degree=3 is not allowed with 4 processes; allowed: a divisor of the world size 4, >= 2"),
    ("degree-one", 2, [*GEN, "--context-parallel", "ulysses", "--cp-degree", "1"], "--cp-degree=1 is not allowed"),
    ("generate-dp", 4, [*GEN, "--context-parallel", "ulysses", "--cp-degree", "2"],
     "--cp-degree=2 with 4 processes: generate makes one video; allowed: --cp-degree 4 (the world size"),
    ("batch-degree-not-divisor", 4, ["batch", "prompts.txt", "--preset", "tiny-wan", "--context-parallel", "ulysses", "--cp-degree", "3"],
     "--cp-degree=3 is not allowed with 4 processes"),
    ("ulysses-degree-not-unified", 4, [*GEN, "--context-parallel", "ulysses", "--ulysses-degree", "2"],
     "--ulysses-degree=2 does not apply: it is for --context-parallel unified (this run: ulysses)"),
    ("ulysses-degree-bad", 4, [*GEN, "--context-parallel", "unified", "--ulysses-degree", "3"],
     "--ulysses-degree=3 is not allowed for unified over 4 ranks; allowed: a divisor of 4 in [2, 2]"),
    ("unified-2", 2, [*GEN, "--context-parallel", "unified"], "--context-parallel=unified over 2 ranks has no room"),
    ("cp-degree-without-cp", 2, [*GEN, "--cp-degree", "2"],
     "--cp-degree=2 does not apply: it is for --context-parallel"),
    ("no-gpu", 2, [*GEN, "--context-parallel", "ulysses"],
     "--context-parallel=ulysses: no GPU is visible; diffusers' context parallelism runs one GPU per rank"),
]  # fmt: skip


@pytest.mark.parametrize("world_size, argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refusals_are_one_line_before_loading(world, monkeypatch, capsys, world_size, argv, expected):
    import torch

    world(world_size)
    Path("prompts.txt").write_text("a cat\na dog\n")
    _no_load(monkeypatch)
    if torch.accelerator.device_count():  # the no-GPU case can only be shown without one
        pytest.skip("an accelerator is visible")
    code, out, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert sorted(os.listdir(".")) == ["prompts.txt"]  # nothing written


def test_cp_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--context-parallel {ulysses,ring,unified}", "--cp-degree", "--ulysses-degree"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "cp " in capsys.readouterr().out


def _torchrun(ranks: int, argv: list[str], cwd: Path, timeout: int = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    proc = subprocess.run(
        [*cmd, str(WRAPPER), *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.mark.parametrize("mode", ["ulysses", pytest.param("ring", marks=pytest.mark.slow)])
def test_generate_two_ranks_equals_single_process(tmp_path, capsys, monkeypatch, mode):
    """Rank 0 writes the video, rank 1 writes nothing; the frames equal a single-process run's (fp32)."""
    from fastgen.io import read_video

    common = [*GEN, "--method", "rectified", "--seed", "3", "--dtype", "float32"]
    cp_dir, single_dir = tmp_path / "cp", tmp_path / "single"
    cp_dir.mkdir()
    single_dir.mkdir()
    out = _torchrun(2, [*common, "--context-parallel", mode, "--out", "video.mp4"], cp_dir)
    assert out.count("wrote video.mp4") == 1, out  # one report, from rank 0
    assert f"context parallel: {mode} over 2 ranks" in out, out
    assert sorted(os.listdir(cp_dir)) == ["video.mp4"]  # no second file, no leftover temp file
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(single_dir)
    code, _, err = _run([*common, "--out", "video.mp4"], capsys)
    assert code in (0, None), err
    cp_frames, single_frames = read_video(cp_dir / "video.mp4"), read_video(single_dir / "video.mp4")
    assert cp_frames.shape == single_frames.shape
    diff = np.abs(cp_frames.astype(np.int16) - single_frames.astype(np.int16))
    assert diff.max() <= 1, diff.max()  # fp32 sums in another order may round a value to the next level
    assert (diff > 0).mean() < 1e-3, (diff > 0).mean()


def test_batch_ulysses_two_ranks_two_items(tmp_path):
    """``fastgen batch`` under context parallelism: the group's first rank writes both videos and the
    manifest; the other rank writes nothing (no journal, no progress file of its own)."""
    import json

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    argv = ["batch", "prompts.txt", "--preset", "tiny-wan", "--method", "rectified", "--steps", "2"]
    _torchrun(2, [*argv, "--context-parallel", "ulysses", "--out-dir", "out"], tmp_path)
    files = sorted(os.listdir(tmp_path / "out"))
    assert [f for f in files if f.endswith(".mp4")] == ["0000-a-cat.mp4", "0001-a-dog.mp4"], files
    assert not [f for f in files if "rank1" in f], files
    with open(tmp_path / "out" / "manifest.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert sorted((r["index"], r["status"]) for r in records) == [(0, "ok"), (1, "ok")]
    again = _torchrun(2, [*argv, "--context-parallel", "ulysses", "--out-dir", "out"], tmp_path)
    assert "0 generated, 2 already done, 0 failed" in again, again[-3000:]  # resumed: every rank skips both


def test_usage_error_is_said_once_under_torchrun(world, monkeypatch, capsys):
    """Every rank finds the same problem; rank 0 says it, the others only exit with status 2."""
    world(2)
    monkeypatch.setenv("RANK", "1")
    code, _, err = _run([*GEN, "--context-parallel", "ulysses", "--cp-degree", "3"], capsys)
    assert (code, err) == (2, "")
    monkeypatch.setenv("RANK", "0")
    code, _, err = _run([*GEN, "--context-parallel", "ulysses", "--cp-degree", "3"], capsys)
    assert code == 2 and "--cp-degree=3 is not allowed with 2 processes" in err


@pytest.mark.slow
def test_batch_two_groups_of_two_ranks(tmp_path, capsys, monkeypatch):
    """4 ranks, ``--cp-degree 2``: two groups split the items; each group's first rank writes its items;
    the item made by the second group (ranks 2, 3) equals a single-process run with its seed."""
    import json

    from fastgen.io import read_video

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    argv = ["batch", "prompts.txt", "--preset", "tiny-wan", "--method", "rectified", "--steps", "2"]
    _torchrun(4, [*argv, "--context-parallel", "ulysses", "--cp-degree", "2", "--out-dir", "out"], tmp_path)
    with open(tmp_path / "out" / "manifest.jsonl") as f:
        records = {r["index"]: r for r in (json.loads(line) for line in f if line.strip())}
    assert {i: (r["status"], r["rank"]) for i, r in records.items()} == {0: ("ok", 0), 1: ("ok", 1)}
    assert not [f for f in os.listdir(tmp_path / "out") if "rank2" in f or "rank3" in f]
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    single = [*GEN[:3], "--prompt", "a dog", "--method", "rectified", "--steps", "2", "--seed", "1"]
    code, _, err = _run([*single, "--out", "single.mp4"], capsys)
    assert code in (0, None), err
    diff = np.abs(
        read_video(tmp_path / "out" / records[1]["output"]).astype(np.int16)
        - read_video(tmp_path / "single.mp4").astype(np.int16)
    )
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


@pytest.mark.slow
def test_library_refusal_after_loading_ends_every_rank(tmp_path):
    """tiny-wan's 2 heads under Ulysses over 4 ranks: ``enable_context_parallel`` refuses after loading;
    rank 0 says it in one line, every rank exits (nothing hangs), nothing is written."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(WRAPPER)]
    proc = subprocess.run(
        [*cmd, *GEN, "--steps", "2", "--context-parallel", "ulysses", "--out", "v.mp4"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastgen generate: error:")]
    assert lines == [
        "fastgen generate: error: context parallelism: 2 attention heads are not divisible by ulysses_degree=4; "
        "allowed: a Ulysses degree that divides 2 (or mode='ring' / 'unified')"
    ], proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []


# a tiny-wan run long enough to be sparse: 5 latent frames x 8x8 tokens = 320 tokens in 20 blocks of 16
SPARSE_WAN = [
    *GEN, "--method", "rectified", "--seed", "3", "--dtype", "float32", "--steps", "2", "--warmup-steps", "0",
    "--dense-layers", "0", "--frames", "17", "--height", "128", "--width", "128", "--block-size", "16",
    "--sparsity", "0.8",
]  # fmt: skip


def _figure(pattern: str, text: str) -> float:
    import re

    found = re.findall(pattern, text)
    assert len(found) == 1, (pattern, text[-3000:])  # said once: by rank 0 only
    return float(found[0])


def test_compare_dense_under_ulysses_reports_what_a_single_process_does(tmp_path, capsys, monkeypatch):
    """``generate --compare-dense --context-parallel ulysses`` on 2 ranks: rank 0 alone writes the video and
    prints the report (one line each, one progress bar per run); the speed-up is the printed dense time
    over the printed sparse time; the fidelity vs dense equals a single-process ``--compare-dense``'s for
    the same seed. The dense run goes through the same CP-enabled transformer: a dense run on the rank's
    token share alone (no exchange) would attend half the keys and give other frames and figures."""
    cp_dir, single_dir = tmp_path / "cp", tmp_path / "single"
    cp_dir.mkdir()
    single_dir.mkdir()
    argv = [*SPARSE_WAN, "--compare-dense", "--rounds", "1", "--out", "video.mp4"]
    out = _torchrun(2, [*argv, "--context-parallel", "ulysses"], cp_dir)
    assert sorted(os.listdir(cp_dir)) == ["video.mp4"]
    assert out.count("context parallel: ulysses over 2 ranks") == 1, out
    # one progress bar per timed run (sparse, dense), from rank 0 only (the warm-up runs show none)
    assert out.count("| 0/2 [") == 2, out[-4000:]
    sparse_s = _figure(r"wrote video\.mp4: 17 frames 128x128 in ([0-9.]+)s \(rectified\)", out)
    density = _figure(r"sparse layers: 3, mean density ([0-9.]+)", out)
    assert 0.0 < density < 0.5, density  # sparse under CP, not the dense fallback
    dense_s = _figure(r"dense: ([0-9.]+)s; PSNR", out)
    psnr = _figure(r"; PSNR ([0-9.]+) dB;", out)
    ssim = _figure(r"; SSIM ([0-9.]+)", out)
    speedup = _figure(r"speedup vs dense ([0-9.]+)x \(1 round", out)
    half = 0.005  # the printed figures are rounded to 2 decimals
    low, high = (dense_s - half) / (sparse_s + half), (dense_s + half) / max(sparse_s - half, 1e-3)
    assert low - half <= speedup <= high + half, (speedup, dense_s, sparse_s)

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(single_dir)
    code, single, err = _run(argv, capsys)
    assert code in (0, None), err
    assert psnr < 80, single  # sparse differs from dense: the comparison can tell a wrong dense run
    assert abs(psnr - _figure(r"; PSNR ([0-9.]+) dB;", single)) <= 0.05, (psnr, single)
    assert abs(ssim - _figure(r"; SSIM ([0-9.]+)", single)) <= 5e-4, (ssim, single)
    assert abs(density - _figure(r"mean density ([0-9.]+)", single)) <= 0.05, (density, single)


CAUSAL = [
    "generate", "--preset", "tiny-causal-wan", "--prompt", "a cat", "--seed", "3", "--dtype", "float32",
    "--local-attn-frames", "6", "--sink-frames", "1",
]  # fmt: skip


def _single_process(argv: list[str], cwd: Path, timeout: int = 300) -> str:
    """``python -m fastgen.cli *argv`` in ``cwd``, one process, with the environment of ``_torchrun``'s ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "fastgen.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.mark.parametrize(
    "method, mode",
    [
        ("light_forcing", "ulysses"),
        pytest.param("dense", "ulysses", marks=pytest.mark.slow),
        pytest.param("light_forcing", "ring", marks=pytest.mark.slow),
    ],
)
def test_causal_wan_under_cp_equals_single_process(tmp_path, method, mode):
    """The causal Wan (3 chunks of 3 latent frames, rolling window of 6 frames with 1 sink, so frames
    are evicted) through ``generate --context-parallel ulysses|ring`` on 2 ranks: rank 0 alone writes; the
    video equals a single-process run's (fp32; the mp4 is what the CLI writes, so equality is up to one
    level of rounding); Light Forcing runs sparse under CP (its per-chunk density line, below 1 after
    the first chunk, not the dense fallback). The reference runs in its own process with the ranks'
    ``OMP_NUM_THREADS=1``: on this tiny random model a near-tie in Light Forcing's top-k flips with the
    intra-op thread count (1 vs ``torch.set_num_threads(2)``, as this test process has: up to 9 levels
    from chunk 1 on), in one process as under CP."""
    from fastgen.io import read_video

    argv = [*CAUSAL, "--method", method, "--out", "video.mp4"]
    cp_dir, single_dir = tmp_path / "cp", tmp_path / "single"
    cp_dir.mkdir()
    single_dir.mkdir()
    out = _torchrun(2, [*argv, "--context-parallel", mode], cp_dir)
    assert out.count("wrote video.mp4: 33 frames 128x128") == 1, out[-4000:]
    assert out.count(f"context parallel: {mode} over 2 ranks") == 1, out
    assert sorted(os.listdir(cp_dir)) == ["video.mp4"]
    if method == "light_forcing":
        import re

        lines = re.findall(r"Light Forcing density per chunk \(mean over layers\): (.*)", out)
        assert len(lines) == 1, out[-4000:]
        per_chunk = {int(c): float(d) for c, d in (item.split(": ") for item in lines[0].split(", "))}
        assert sorted(per_chunk) == [0, 1, 2], per_chunk
        assert all(0.0 < per_chunk[c] < 0.5 for c in (1, 2)), per_chunk  # sparse after the first chunk
    else:
        assert "density" not in out and "sparse attention never ran" not in out, out[-3000:]
    _single_process(argv, single_dir)
    cp_frames, single_frames = read_video(cp_dir / "video.mp4"), read_video(single_dir / "video.mp4")
    assert cp_frames.shape == single_frames.shape == (33, 128, 128, 3)
    diff = np.abs(cp_frames.astype(np.int16) - single_frames.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
