"""Tests of ``fastgen batch``: prompt files, seeds and names, manifest, resume, failures, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastgen.batch import (
    MANIFEST,
    allowed_columns,
    append_record,
    latest_records,
    output_name,
    read_prompt_file,
    read_records,
    run_batch,
    slugify,
)
from fastgen.cli import build_parser
from fastgen.configs import RectifiedSpaAttnConfig, SparseDConfig
from fastgen.io import read_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "a cat surfing",
    "# a comment",
    "",
    "A dog, on the MOON!",
    "rain over a city",
    "boom goes the item",
]


# ----------------------------------------------------------------------------------------------------
# fakes with the runners' interface (deterministic in the seed, log every call when asked)


def _log_call(prompt: str, seed: int, method: str) -> None:
    path = os.environ.get("FAKE_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"prompt": prompt, "seed": seed, "method": method}) + "\n")


def _runner_config(method, config, default_cls):
    """What a runner reports: the config it used (its default when none was given)."""
    if method == "dense":
        return {"method": "dense"}
    return (config if config is not None else default_cls()).to_dict()


def fake_video_generate(pipe, *, prompt, seed=0, method="rectified", config=None, progress=True, **params):
    """Video frames that depend on the seed only; the sparse run differs slightly from dense."""
    _log_call(prompt, seed, method)
    if "boom" in prompt and os.environ.get("FAKE_BOOM", "1") == "1":
        raise RuntimeError("the generator exploded")
    if "crash" in prompt:
        os.kill(os.getpid(), signal.SIGKILL)
    frames = np.random.default_rng(seed).integers(0, 256, size=(params.get("frames") or 3, 16, 24, 3))
    if method != "dense":
        frames = np.clip(frames + 3, 0, 255)
    stats = [{"layer": 0, "density": 0.25, "compensated_fraction": 0.5, "block_mask": None}]
    return {
        "frames": frames.astype(np.uint8),
        "seconds": 1.0 if method == "dense" else 0.5,
        "fps": 8,
        "stats": stats if method != "dense" else [],
        "config": _runner_config(method, config, RectifiedSpaAttnConfig),
    }


def fake_text_generate(pipe, *, prompt, seed=0, method="sparsed", config=None, progress=True, **params):
    """Tokens that depend on the seed; the sparse run changes the last token."""
    _log_call(prompt, seed, method)
    tokens = [
        int(t) for t in np.random.default_rng(seed).integers(0, 100, size=params.get("gen_length") or 8)
    ]
    if method != "dense":
        tokens[-1] += 1
    return {
        "text": " ".join(map(str, tokens)),
        "tokens": tokens,
        "seconds": 2.0 if method == "dense" else 1.0,
        "tokens_per_s": len(tokens) / (2.0 if method == "dense" else 1.0),
        "stats": {"density": 0.3, "layers": [{"layer": 0, "density": 0.3}]} if method != "dense" else {},
        "config": {"gen_length": len(tokens), "method": _runner_config(method, config, SparseDConfig)},
    }


def _args(*argv):
    return build_parser().parse_args(["batch", *map(str, argv)])


def _calls(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def prompt_txt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture
def call_log(tmp_path, monkeypatch):
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALL_LOG", str(path))
    return path


# ----------------------------------------------------------------------------------------------------
# prompt files


def test_read_txt_skips_blank_and_comments(prompt_txt):
    items = read_prompt_file(prompt_txt)
    assert [i.prompt for i in items] == [
        "a cat surfing",
        "A dog, on the MOON!",
        "rain over a city",
        "boom goes the item",
    ]
    assert [i.index for i in items] == [0, 1, 2, 3]
    assert all(i.seed is None and i.overrides == {} for i in items)
    assert [i.resolved_seed(10) for i in items] == [10, 11, 12, 13]


def test_read_jsonl_and_csv_with_overrides(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt": "one", "seed": 7, "steps": 3}\n\n"two"\n{"prompt": "three", "sparsity": 0.5}\n'
    )
    items = read_prompt_file(jsonl)
    assert [(i.prompt, i.seed, i.overrides) for i in items] == [
        ("one", 7, {"steps": 3}),
        ("two", None, {}),
        ("three", None, {"sparsity": 0.5}),
    ]
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt,seed,negative_prompt,steps,sparsity\n"a, b",5,blurry,4,0.7\nc,,,,\n')
    items = read_prompt_file(csv_path)
    assert items[0].prompt == "a, b" and items[0].seed == 5
    assert items[0].overrides == {"negative_prompt": "blurry", "steps": 4, "sparsity": 0.7}
    assert items[1].prompt == "c" and items[1].seed is None and items[1].overrides == {}


def test_unknown_or_bad_columns_are_clear_errors(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("prompt,sparsty\nx,0.5\n")
    with pytest.raises(ValueError, match=r"unknown column\(s\) 'sparsty'; allowed: .*sparsity"):
        read_prompt_file(csv_path)
    # a text-only column is rejected for a video run
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x", "gen_length": 8}\n')
    with pytest.raises(ValueError, match="'gen_length'"):
        read_prompt_file(jsonl, allowed_columns("video", "rectified"))
    jsonl.write_text('{"prompt": "x", "steps": 2.5}\n')
    with pytest.raises(ValueError, match="column 'steps'=2.5 must be of type int"):
        read_prompt_file(jsonl)
    with pytest.raises(ValueError, match="extension '.yaml'"):
        read_prompt_file(tmp_path / "p.yaml")


def test_slug_and_output_name():
    items = read_prompt_file_from_list(["A dog, on the MOON!", "!!!", "x" * 100])
    assert output_name(items[0], "video") == "0000-a-dog-on-the-moon.mp4"
    assert output_name(items[1], "text") == "0001-prompt.txt"
    assert len(slugify("word " * 30)) <= 40 and not slugify("word " * 30).endswith("-")
    assert slugify("x" * 100) == "x" * 40


def read_prompt_file_from_list(prompts):
    from fastgen.batch import Item

    return [Item(index=i, prompt=p) for i, p in enumerate(prompts)]


# ----------------------------------------------------------------------------------------------------
# single process runs


def test_video_batch_outputs_manifest_and_compare_dense(tmp_path, prompt_txt, call_log, capsys):
    out = tmp_path / "out"
    args = _args(prompt_txt, "--preset", "tiny-wan", "--out-dir", out, "--seed", "100", "--sparsity", "0.6",
                 "--frames", "2", "--compare-dense")  # fmt: skip
    status = run_batch(args, kind="video", load=lambda: "pipe", generate=fake_video_generate)
    assert status == 1  # the "boom" item failed
    records = read_records(str(out / MANIFEST))
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "error"]
    assert "RuntimeError: the generator exploded" in records[3]["error"]
    first = records[0]
    assert first["seed"] == 100 and records[2]["seed"] == 102
    assert first["output"] == "0000-a-cat-surfing.mp4"
    assert first["method"] == "rectified" and first["model"] == "tiny-wan"
    assert first["config"]["method"] == "rectified" and first["config"]["sparsity"] == 0.6
    assert first["params"] == {"frames": 2}
    assert first["speedup"] == pytest.approx(2.0) and first["density"] == pytest.approx(0.25)
    assert first["rounds"] == 3 and first["speedups"] == pytest.approx([2.0] * 3)
    assert first["sparse_never_ran"] is None and "load_average" in first
    # the comparison is on screen too, not only in the manifest
    shown = capsys.readouterr().err
    assert (
        "item 0 (0000-a-cat-surfing.mp4): speedup vs dense 2.00x (median of 3 interleaved rounds, range 2.00x-2.00x"
        in shown
    )
    assert 20 < first["psnr"] < 60 and 0 < first["ssim"] < 1
    video = read_video(out / first["output"])
    assert video.shape == (2, 16, 24, 3)
    # every output is complete, no temp files, journals merged away
    assert sorted(os.listdir(out)) == sorted(
        [
            ".manifest.lock",
            MANIFEST,
            "0000-a-cat-surfing.mp4",
            "0001-a-dog-on-the-moon.mp4",
            "0002-rain-over-a-city.mp4",
        ]
    )
    # same seeds for sparse and dense of one item
    seeds = [(c["prompt"], c["seed"], c["method"]) for c in _calls(call_log)]
    assert ("a cat surfing", 100, "rectified") in seeds and ("a cat surfing", 100, "dense") in seeds


def test_image_to_video_batch_passes_each_items_first_frame(tmp_path, call_log):
    """``--image`` for every item, or an ``image`` column (relative to the prompt file's folder)."""
    seen = []

    def generate(pipe, **kw):
        seen.append(kw.get("image"))
        return fake_video_generate(pipe, **{k: v for k, v in kw.items() if k != "image"})

    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "b.png").write_bytes(b"png")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,image\na cat,a.png\na dog,\n")
    args = _args(prompts, "--out-dir", tmp_path / "out", "--image", tmp_path / "b.png")
    assert run_batch(args, kind="video", load=lambda: "pipe", generate=generate) == 0
    assert seen == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    prompts.write_text("prompt,image\na cat,missing.png\n")
    with pytest.raises(ValueError, match=r"p.csv:2: image='.*missing.png' does not exist"):
        run_batch(args, kind="video", load=lambda: "pipe", generate=generate)


def test_text_batch_token_agreement_and_row_overrides(tmp_path, call_log):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "hello", "seed": 42, "gen_length": 4, "select": 0.5}\n{"prompt": "world"}\n'
    )
    out = tmp_path / "out"
    args = _args(prompts, "--preset", "tiny-llada", "--out-dir", out, "--compare-dense", "--gen-length", "8")
    assert run_batch(args, kind="text", load=lambda: "pipe", generate=fake_text_generate) == 0
    records = read_records(str(out / MANIFEST))
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert records[0]["seed"] == 42 and records[1]["seed"] == 1
    assert records[0]["params"] == {"gen_length": 4} and records[1]["params"] == {"gen_length": 8}
    assert records[0]["config"]["select"] == 0.5 and records[1]["config"]["select"] == 0.3
    assert records[0]["options"] == {"select": 0.5} and records[1]["options"] == {}
    assert records[0]["token_agreement"] == pytest.approx(3 / 4)
    assert records[1]["token_agreement"] == pytest.approx(7 / 8)
    assert records[0]["speedup"] == pytest.approx(2.0) and records[0]["tokens_per_s"] == pytest.approx(4.0)
    text = (out / records[0]["output"]).read_text()
    assert text == fake_text_generate(None, prompt="hello", seed=42, gen_length=4)["text"]


def test_bad_method_option_is_an_error_before_any_work(tmp_path, prompt_txt):
    args = _args(prompt_txt, "--out-dir", tmp_path / "o", "--sparsity", "1.5")
    with pytest.raises(ValueError, match="sparsity=1.5"):
        run_batch(args, kind="video", load=lambda: "pipe", generate=fake_video_generate)
    args = _args(prompt_txt, "--out-dir", tmp_path / "o", "--method", "nope")
    with pytest.raises(
        ValueError, match="--method='nope' is not allowed for video; allowed: rectified, dense"
    ):
        run_batch(args, kind="video", load=lambda: "pipe", generate=fake_video_generate)


def test_resume_skips_finished_items_and_retries_failed(tmp_path, prompt_txt, call_log, monkeypatch):
    out = tmp_path / "out"
    args = _args(prompt_txt, "--out-dir", out)
    loads = []

    def load():
        loads.append(1)
        return "pipe"

    assert run_batch(args, kind="video", load=load, generate=fake_video_generate) == 1
    assert len(_calls(call_log)) == 4
    before = {name: os.path.getmtime(out / name) for name in os.listdir(out) if name.endswith(".mp4")}
    # the second run only redoes the failed item, which now succeeds
    monkeypatch.setenv("FAKE_BOOM", "0")
    call_log.unlink()
    assert run_batch(args, kind="video", load=load, generate=fake_video_generate) == 0
    assert [c["prompt"] for c in _calls(call_log)] == ["boom goes the item"]
    assert {n: os.path.getmtime(out / n) for n in before} == before
    assert [r["status"] for r in read_records(str(out / MANIFEST))] == ["ok"] * 4
    # a third run does nothing and does not even load the pipeline
    call_log.unlink()
    assert run_batch(args, kind="video", load=load, generate=fake_video_generate) == 0
    assert _calls(call_log) == [] and len(loads) == 2
    # changed settings redo the items; --overwrite redoes everything
    assert run_batch(_args(prompt_txt, "--out-dir", out, "--sparsity", "0.5"), kind="video", load=load,
                     generate=fake_video_generate) == 0  # fmt: skip
    assert len(_calls(call_log)) == 4
    call_log.unlink()
    assert run_batch(_args(prompt_txt, "--out-dir", out, "--sparsity", "0.5", "--overwrite"), kind="video",
                     load=load, generate=fake_video_generate) == 0  # fmt: skip
    assert len(_calls(call_log)) == 4
    assert len(read_records(str(out / MANIFEST))) == 4


def test_deleted_output_is_redone(tmp_path, prompt_txt, call_log, monkeypatch):
    monkeypatch.setenv("FAKE_BOOM", "0")
    out = tmp_path / "out"
    args = _args(prompt_txt, "--out-dir", out)
    assert run_batch(args, kind="video", load=lambda: 1, generate=fake_video_generate) == 0
    os.remove(out / "0001-a-dog-on-the-moon.mp4")
    call_log.unlink()
    assert run_batch(args, kind="video", load=lambda: 1, generate=fake_video_generate) == 0
    assert [c["prompt"] for c in _calls(call_log)] == ["A dog, on the MOON!"]


def test_interrupt_mid_item_then_resume(tmp_path, prompt_txt, call_log, monkeypatch):
    monkeypatch.setenv("FAKE_BOOM", "0")
    out = tmp_path / "out"
    args = _args(prompt_txt, "--out-dir", out)

    def interrupted(pipe, **kw):
        if kw["prompt"] == "rain over a city":
            raise KeyboardInterrupt
        return fake_video_generate(pipe, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_batch(args, kind="video", load=lambda: 1, generate=interrupted)
    assert sorted(n for n in os.listdir(out) if n.endswith(".mp4")) == [
        "0000-a-cat-surfing.mp4",
        "0001-a-dog-on-the-moon.mp4",
    ]
    assert sorted(latest_records(str(out))) == [0, 1]
    call_log.unlink()
    assert run_batch(args, kind="video", load=lambda: 1, generate=fake_video_generate) == 0
    assert [c["prompt"] for c in _calls(call_log)] == ["rain over a city", "boom goes the item"]
    assert [r["index"] for r in read_records(str(out / MANIFEST))] == [0, 1, 2, 3]
    assert not any(".partial" in n or n.startswith("manifest.rank") for n in os.listdir(out))


def test_truncated_manifest_line_is_tolerated(tmp_path):
    journal = tmp_path / "manifest.rank0.jsonl"
    append_record(str(journal), {"index": 0, "status": "ok", "finished_at": 1.0})
    with open(journal, "a") as f:
        f.write('{"index": 1, "stat')  # an append cut by a crash
    assert list(latest_records(str(tmp_path))) == [0]


# ----------------------------------------------------------------------------------------------------
# separate processes: killed mid-write and mid-item, and two ranks


SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from fastgen.batch import BatchRunner, run_batch
    from fastgen.cli import build_parser
    from tests.test_batch import fake_video_generate

    if os.environ.get("KILL_MID_WRITE"):
        from fastgen.io import atomic_path
        real = BatchRunner._write_output

        def half_write(self, path, result):
            if "rain" in path:
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    f.write(b"\\x00" * 100)
                    f.flush()
                    os.kill(os.getpid(), 9)
            return real(self, path, result)

        BatchRunner._write_output = half_write
    args = build_parser().parse_args(["batch", *sys.argv[1:]])
    sys.exit(run_batch(args, kind="video", load=lambda: "pipe", generate=fake_video_generate))
    """
)


def _spawn(tmp_path, argv, **env):
    script = tmp_path / "run_fake_batch.py"
    script.write_text(SCRIPT.format(repo=REPO))
    full_env = {**os.environ, "FAKE_BOOM": "0", **env}
    return subprocess.Popen([sys.executable, str(script), *map(str, argv)], env=full_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_killed_process_leaves_no_truncated_output_and_resumes(tmp_path, prompt_txt, call_log):
    out = tmp_path / "out"
    proc = _spawn(tmp_path, [prompt_txt, "--out-dir", out], KILL_MID_WRITE="1")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(out)
    assert "0002-rain-over-a-city.mp4" not in names  # only a hidden .partial temp may be left
    assert any(n.startswith(".0002-rain-over-a-city.") and ".partial" in n for n in names)
    assert sorted(latest_records(str(out))) == [0, 1]
    # the next run (a process killed inside the generator this time) redoes item 2 only ...
    prompt_txt.write_text(prompt_txt.read_text().replace("boom goes the item", "crash now"))
    call_log.unlink()
    proc = _spawn(tmp_path, [prompt_txt, "--out-dir", out])
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert [c["prompt"] for c in _calls(call_log)] == ["rain over a city", "crash now"]
    assert not any(".partial" in n for n in os.listdir(out))  # the stale temp of item 2 was cleaned
    assert read_video(out / "0002-rain-over-a-city.mp4").shape == (3, 16, 24, 3)
    # ... and a run without the crash finishes the last one
    prompt_txt.write_text(prompt_txt.read_text().replace("crash now", "calm now"))
    call_log.unlink()
    proc = _spawn(tmp_path, [prompt_txt, "--out-dir", out])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [c["prompt"] for c in _calls(call_log)] == ["calm now"]
    records = read_records(str(out / MANIFEST))
    assert [(r["index"], r["status"]) for r in records] == [(i, "ok") for i in range(4)]


def test_two_processes_split_items_and_merge_one_manifest(tmp_path, call_log):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(7)) + "\n")
    out = tmp_path / "out"
    procs = [
        _spawn(
            tmp_path,
            [prompts, "--out-dir", out, "--seed", "5"],
            RANK=str(r),
            WORLD_SIZE="2",
            LOCAL_RANK=str(r),
        )
        for r in range(2)
    ]
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        errs.append(err if isinstance(err, str) else err.decode())
    # rank 0 prints one summary that counts both ranks' items; rank 1 prints none
    assert "2 of 2 ranks: 7 generated, 0 already done, 0 failed, of 7 items" in errs[0]
    assert "fastgen batch:" not in errs[1]
    calls = _calls(call_log)
    assert sorted(c["prompt"] for c in calls) == sorted(f"prompt number {i}" for i in range(7))  # none twice
    records = read_records(str(out / MANIFEST))
    assert [r["index"] for r in records] == list(range(7))
    assert [r["rank"] for r in records] == [i % 2 for i in range(7)]
    assert [r["seed"] for r in records] == [5 + i for i in range(7)]
    assert all(r["status"] == "ok" and os.path.exists(out / r["output"]) for r in records)
    # a later single-process run finds everything done and folds the rank journals away
    call_log.unlink()
    proc = _spawn(tmp_path, [prompts, "--out-dir", out, "--seed", "5"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _calls(call_log) == []
    assert not [n for n in os.listdir(out) if n.startswith("manifest.rank")]
    assert len(read_records(str(out / MANIFEST))) == 7


# ----------------------------------------------------------------------------------------------------
# samples and the real tiny presets


def test_sample_prompt_files_and_configs_load():
    from fastgen.configs import config_from_dict

    samples = os.path.join(REPO, "samples")
    for name, kind, method in [("video_prompts", "video", "rectified"), ("text_prompts", "text", "sparsed")]:
        for ext in ("txt", "jsonl"):
            items = read_prompt_file(os.path.join(samples, f"{name}.{ext}"), allowed_columns(kind, method))
            assert len(items) >= 4 and all(i.prompt for i in items)
    for method in ("rectified", "light_forcing", "sparsed", "window_diffusion"):
        with open(os.path.join(samples, "configs", f"{method}.json")) as f:
            data = json.load(f)
        assert config_from_dict(data).to_dict()["method"] == method


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _has("fastgen.pipelines.text_runner"), reason="text runner not there yet")
def test_tiny_llada_batch_end_to_end(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nWhy is the sky blue?\n")
    out = tmp_path / "out"
    argv = [prompts, "--preset", "tiny-llada", "--out-dir", out, "--gen-length", "8", "--steps", "4",
            "--block-size", "16", "--compare-dense"]  # fmt: skip
    assert run_batch(_args(*argv)) == 0
    records = read_records(str(out / MANIFEST))
    assert [(r["index"], r["status"], r["kind"]) for r in records] == [(0, "ok", "text"), (1, "ok", "text")]
    assert records[0]["config"]["method"] == "sparsed" and 0 <= records[0]["token_agreement"] <= 1
    assert (out / records[1]["output"]).read_text() is not None
    assert run_batch(_args(*argv)) == 0  # resumes: nothing to do
    assert read_records(str(out / MANIFEST)) == records


@pytest.mark.skipif(not _has("fastgen.pipelines.video_runner"), reason="video runner not there yet")
def test_tiny_wan_batch_end_to_end(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "seed": 3, "sparsity": 0.5}\n')
    out = tmp_path / "out"
    argv = [prompts, "--preset", "tiny-wan", "--method", "rectified", "--out-dir", out, "--height", "32",
            "--width", "32", "--frames", "1", "--steps", "1", "--compare-dense"]  # fmt: skip
    assert run_batch(_args(*argv)) == 0
    (record,) = read_records(str(out / MANIFEST))
    assert record["status"] == "ok" and record["seed"] == 3 and record["config"]["sparsity"] == 0.5
    assert read_video(out / record["output"]).shape[1:] == (32, 32, 3)
    # one step under tiny-wan's default warmup_steps=5: sparse attention never ran, so no speed-up
    assert record["ssim"] is not None and record["speedup"] is None
    assert record["sparse_never_ran"] == "warmup_steps=5 >= steps=1"
