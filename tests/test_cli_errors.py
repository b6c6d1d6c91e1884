"""Every mistake a user can make on the command line gets ONE line naming the option, the value and what
is allowed, the right exit status (2: what was typed, 1: a failure of the run, 130: Ctrl-C), no
traceback, and nothing written or lost. Table-driven, in-process (``fastgen.cli.main`` with capsys),
tiny presets; nothing here loads a model unless the check needs one (marked)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from fastgen.cli import main


def _files(root) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder with one existing output (it must survive every failed command)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.mp4").write_bytes(b"finished work")
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    return tmp_path


def _run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # main raises SystemExit(status) after printing the reason
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


GEN = ["generate", "--preset", "tiny-wan", "--prompt", "a cat"]
TEXT = ["generate", "--preset", "tiny-llada", "--prompt", "hi"]

# (id, argv, exit status, the one line expected on stderr (regex))
USAGE_CASES = [
    ("height-negative", [*GEN, "--height", "-64"], 2, r"--height=-64 is not allowed; allowed: a multiple of 16"),
    ("steps-zero", [*GEN, "--steps", "0"], 2, r"--steps=0 is not allowed; allowed: an integer >= 1"),
    ("width-zero", [*GEN, "--width", "0"], 2, r"--width=0 is not allowed"),
    ("frames-zero", [*GEN, "--frames", "0"], 2, r"--frames=0 is not allowed; allowed: an integer >= 1"),
    ("frames-negative", [*GEN, "--frames", "-5"], 2, r"--frames=-5 is not allowed; allowed: an integer >= 1"),
    ("guidance-negative", [*GEN, "--guidance-scale", "-5"], 2, r"--guidance-scale=-5.0 is not allowed; allowed: a number >= 0"),
    ("sparsity-range", [*GEN, "--sparsity", "1.5"], 2, r"--sparsity=1.5 is not allowed; allowed: a number in \[0, 1\)"),
    ("block-size-pow2", [*GEN, "--block-size", "48"], 2, r"--block-size=48 is not allowed; allowed: a power of two >= 16"),
    ("device-tpu", [*GEN, "--device", "tpu"], 2, r"--device='tpu' is not a device; allowed: cpu"),
    ("select-on-video", [*GEN, "--select", "0.5"], 2, r"--select=0.5 does not apply: it is for SparseD \(text\); this run is video \(tiny-wan\) with --method rectified"),
    ("window-on-video", [*GEN, "--window", "4"], 2, r"--window=4 does not apply: it is for Window-Diffusion \(text\)"),
    ("sparsity-on-text", [*TEXT, "--sparsity", "0.5"], 2, r"--sparsity=0.5 does not apply: it is for Rectified SpaAttn / Light Forcing \(video\); this run is text \(tiny-llada\)"),
    ("frames-on-text", [*TEXT, "--frames", "5"], 2, r"--frames=5 does not apply: it is for video; this run is text"),
    ("window-with-sparsed", [*TEXT, "--method", "sparsed", "--window", "4"], 2, r"--window=4 does not apply: it is for Window-Diffusion \(text\); this run is text \(tiny-llada\) with --method sparsed"),
    ("select-with-window", [*TEXT, "--method", "window_diffusion", "--select", "0.5"], 2, r"--select=0.5 does not apply: it is for SparseD"),
    ("dense-layers-on-causal", ["generate", "--preset", "tiny-causal-wan", "--prompt", "x", "--dense-layers", "2"], 2, r"--dense-layers=2 does not apply: it is for Rectified SpaAttn \(video\); this run is a causal Wan"),
    ("local-window-on-wan", [*GEN, "--local-attn-frames", "3"], 2, r"--local-attn-frames=3 does not apply: it is for the causal Wan"),
    ("compare-dense-with-dense", [*GEN, "--method", "dense", "--compare-dense"], 2, r"--compare-dense with --method dense compares dense with itself"),
    ("rounds-without-compare", [*GEN, "--rounds", "3"], 2, r"--rounds=3 is for --compare-dense timings"),
    ("rounds-zero", [*GEN, "--compare-dense", "--rounds", "0"], 2, r"--rounds=0 is not allowed; allowed: an integer >= 1"),
    ("method-of-other-family", [*GEN, "--method", "sparsed"], 2, r"--method='sparsed' is not allowed for video; allowed: rectified, dense"),
    ("text-steps-over-length", [*TEXT, "--gen-length", "8", "--steps", "16"], 2, r"--steps=16 is more than --gen-length=8"),
    ("text-block-length", [*TEXT, "--gen-length", "8", "--block-length", "3"], 2, r"--block-length=3 must divide --gen-length=8"),
    ("temperature-negative", [*TEXT, "--temperature", "-1"], 2, r"--temperature=-1.0 is not allowed"),
    ("prompt-missing", ["generate", "--preset", "tiny-wan"], 2, r"--prompt is required for video"),
    ("image-on-t2v", [*GEN, "--image", "keep.mp4"], 2, r"--image='keep.mp4' is for image-to-video pipelines \(Wan I2V\); tiny-wan is text-to-video"),
    ("out-wrong-ext-video", [*GEN, "--out", "x.txt"], 2, r"--out='x.txt' has extension '.txt'; allowed for video: .mp4"),
    ("out-wrong-ext-text", [*TEXT, "--out", "x.mp4"], 2, r"--out='x.mp4' has extension '.mp4'; allowed for text: .txt"),
    ("out-exists", [*GEN, "--out", "keep.mp4"], 2, r"--out='keep.mp4' exists; pass --overwrite to replace it"),
    ("out-folder-is-file", [*GEN, "--out", "afile/x.mp4"], 2, r"--out='afile/x.mp4': .*afile' is a file, not a folder"),
    ("kv-free-prompt", ["generate", "--preset", "tiny-llada-kv", "--prompt", "what is the capital of France?"], 2, r"--prompt='what is the capital of France\?' is not a prompt of tiny-llada-kv's key-value retrieval task"),
    ("self-forcing-without-model", ["generate", "--self-forcing-checkpoint", "x.pt", "--prompt", "x"], 2, r"--self-forcing-checkpoint='x.pt' needs --model"),
    ("demo-port-range", ["demo", "--port", "70000"], 2, r"--port=70000 is not allowed; allowed: 1..65535"),
    ("bench-tokens", ["bench", "attention", "--tokens", "-5"], 2, r"--tokens=-5 is not allowed; allowed: an integer >= 1"),
    ("bench-sparsity", ["bench", "attention", "--sparsity", "1.2"], 2, r"--sparsity=1.2 is not allowed; allowed: numbers in \[0, 1\)"),
    ("batch-out-dir-file", ["batch", "prompts.txt", "--preset", "tiny-wan", "--out-dir", "afile"], 2, r"--out-dir='afile': 'afile' is a file, not a folder"),
    ("batch-select-on-video", ["batch", "prompts.txt", "--preset", "tiny-wan", "--select", "0.3"], 2, r"--select=0.3 does not apply"),
    ("batch-compare-dense-with-dense", ["batch", "prompts.txt", "--preset", "tiny-llada", "--method", "dense", "--compare-dense"], 2, r"--compare-dense with --method dense"),
]  # fmt: skip


@pytest.mark.parametrize(
    "argv, status, message", [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES]
)
def test_usage_mistakes_get_one_line_and_nothing_is_written(workdir, capsys, argv, status, message):
    before = _files(workdir)
    code, out, err = _run(argv, capsys)
    assert code == status
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastgen {argv[0]}: error: ")
    assert pytest.importorskip("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert _files(workdir) == before  # nothing written, nothing lost


def test_several_mistakes_are_all_reported(workdir, capsys):
    code, _, err = _run([*GEN, "--steps", "0", "--select", "0.5", "--frames", "-1"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("fastgen generate: error: --") for line in lines)


def test_device_cuda_without_cuda(workdir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run([*GEN, "--device", "cuda"], capsys)
    assert code == 2
    assert (
        err.strip()
        == (
            f"fastgen generate: error: --device='cuda': CUDA is not available on this machine (torch "
            f"{torch.__version__}, no usable GPU); allowed: cpu"
        )
        or "CUDA is not available" in err
    )


def test_missing_output_folder_is_created_up_front(workdir, capsys, monkeypatch):
    """A missing --out folder is created before generating (so generation is never lost at the end)."""
    import fastgen.cli.generate as gen

    seen = {}

    def stop(args, run):
        seen["exists"] = os.path.isdir(workdir / "new" / "deeper")
        return 0

    monkeypatch.setattr(gen, "generate_video_from_args", stop)
    assert _run([*GEN, "--out", "new/deeper/x.mp4"], capsys)[0] == 0
    assert seen == {"exists": True}


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder(workdir, capsys):
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, _, err = _run([*GEN, "--out", "ro/x.mp4"], capsys)
    assert code == 2 and "is not writable" in err


def test_busy_demo_port_is_a_runtime_error(workdir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = _run(["demo", "--port", port], capsys)
    assert code == 1
    assert err.strip().startswith(f"fastgen demo: error: --port={port}: cannot listen on 127.0.0.1:{port}")


def test_wrong_kind_demo_preset_is_refused_at_launch(workdir, capsys):
    code, _, err = _run(["demo", "--video-preset", "tiny-llada", "--port", "1"], capsys)
    assert code == 2
    assert "--video-preset='tiny-llada' makes text; allowed:" in err


# ----------------------------------------------------------------------------------------------------
# checkpoint files (exit 1: the run fails on the user's file, named; never torch's unpickling advice)


def _truncated_safetensors_folder(root):
    import torch
    from safetensors.torch import save_file

    folder = root / "lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    path = folder / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return folder, path


def test_truncated_safetensors_names_the_file(workdir, capsys):
    folder, path = _truncated_safetensors_folder(workdir)
    code, _, err = _run(["generate", "--model", folder, "--prompt", "hi"], capsys)
    assert code == 1
    assert err.strip().startswith(f"fastgen generate: error: checkpoint file {str(path)!r} is truncated")
    assert len(err.strip().splitlines()) == 1


def test_corrupt_self_forcing_checkpoint_names_the_file_without_unpickling_advice(workdir, capsys):
    wan = workdir / "wan"
    wan.mkdir()
    (wan / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    pt = workdir / "sf.pt"
    pt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    code, _, err = _run(
        ["generate", "--model", wan, "--self-forcing-checkpoint", pt, "--prompt", "x"], capsys
    )
    assert code == 1
    assert f"--self-forcing-checkpoint={str(pt)!r} is not a complete PyTorch checkpoint" in err
    assert "weights_only" not in err and "Traceback" not in err


def test_friendly_load_error_drops_the_weights_only_advice():
    import pickle

    from fastgen.cli.checks import friendly_load_error

    err = pickle.UnpicklingError(
        "Weights only load failed. ... Re-running `torch.load` with `weights_only` set to `False` will likely"
    )
    message = friendly_load_error(err)
    assert message is not None and "False" not in message and "weights_only" not in message


# ----------------------------------------------------------------------------------------------------
# failures of the run, Ctrl-C, -v


def test_runtime_failure_is_one_line_and_verbose_shows_the_traceback(workdir, capsys, monkeypatch):
    import fastgen.cli.generate as gen

    def boom(args, run):
        raise RuntimeError("the generator exploded\nsecond line")

    monkeypatch.setattr(gen, "generate_video_from_args", boom)
    code, _, err = _run([*GEN, "--out", "y.mp4"], capsys)
    assert code == 1
    assert err.strip() == (
        "fastgen generate: error: RuntimeError: the generator exploded (run with -v for the traceback)"
    )
    code, _, err = _run(["-v", *GEN, "--out", "y.mp4"], capsys)
    assert code == 1 and "Traceback" in err


def test_ctrl_c_during_generate(workdir, capsys, monkeypatch):
    import fastgen.cli.generate as gen

    def interrupted(args, run):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "generate_video_from_args", interrupted)
    before = _files(workdir)
    code, _, err = _run([*GEN, "--out", "y.mp4"], capsys)
    assert code == 130
    assert err.strip().splitlines() == [
        "fastgen generate: interrupted: nothing half-written was left (outputs are written atomically); "
        "run the command again"
    ]
    assert _files(workdir) == before


def test_ctrl_c_during_batch_says_how_to_resume(workdir, capsys, monkeypatch):
    import fastgen.pipelines.video_runner as vr
    import numpy as np

    def generate(pipe, *, prompt, **kw):
        if prompt == "a dog":
            raise KeyboardInterrupt
        return {
            "frames": np.zeros((1, 16, 16, 3), np.uint8),
            "seconds": 0.1,
            "fps": 8,
            "stats": [],
            "config": {},
        }

    monkeypatch.setattr(vr, "load_video_pipeline", lambda **kw: "pipe")
    monkeypatch.setattr(vr, "generate_video", generate)
    code, _, err = _run(["batch", "prompts.txt", "--preset", "tiny-wan", "--out-dir", "out"], capsys)
    assert code == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "fastgen batch: interrupted: stopped at item 2 of 2 (1 generated, 0 already done, 0 failed)"
    )
    assert last.endswith("run the same command again to resume")
    assert "Traceback" not in err
    assert os.path.exists(workdir / "out" / "0000-a-cat.mp4")  # the finished item is kept


# ----------------------------------------------------------------------------------------------------
# batch prompt files: every bad row at once, encodings, empty files


def test_batch_reports_every_bad_row_with_file_and_line(workdir, capsys):
    rows = [{"prompt": "ok", "steps": 2}, {"prompt": "a", "steps": -4}, {"prompt": "b", "frames": 0},
            {"prompt": "c", "gen_length": 8}, {"prompt": "d", "pool_splits": 0}]  # fmt: skip
    (workdir / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = _run(["batch", "p.jsonl", "--preset", "tiny-wan", "--out-dir", "out"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 4, err
    assert lines[0].endswith("p.jsonl:2: steps=-4 is not allowed; allowed: an integer >= 1")
    assert lines[1].endswith("p.jsonl:3: frames=0 is not allowed; allowed: an integer >= 1")
    assert "p.jsonl:4: unknown column(s) 'gen_length'" in lines[2]
    assert "p.jsonl:5: " in lines[3] and "pool_splits" in lines[3]  # the config's own check, up front
    assert not os.path.exists(workdir / "out" / "manifest.jsonl")


def test_batch_non_utf8_prompt_file_names_file_and_line(workdir, capsys):
    (workdir / "latin.txt").write_bytes("a cat\nun caf\xe9\n".encode("latin-1"))
    code, _, err = _run(["batch", "latin.txt", "--preset", "tiny-wan", "--out-dir", "out"], capsys)
    assert code == 2
    assert err.strip() == (
        "fastgen batch: error: latin.txt:2: not UTF-8 (byte 0xe9 at column 7); allowed: a UTF-8 text file "
        "(re-save it as UTF-8)"
    )


def test_batch_empty_prompt_file_is_an_error(workdir, capsys):
    (workdir / "empty.txt").write_text("# only a comment\n\n")
    code, _, err = _run(["batch", "empty.txt", "--preset", "tiny-wan", "--out-dir", "out"], capsys)
    assert code == 2
    assert "prompt file 'empty.txt' holds no prompt" in err


def test_batch_image_column_on_text_to_video_is_refused(workdir, capsys):
    (workdir / "p.csv").write_text("prompt,image\na cat,first.png\n")
    code, _, err = _run(["batch", "p.csv", "--preset", "tiny-llada", "--out-dir", "out"], capsys)
    assert code == 2 and "unknown column(s) 'image'" in err


# ----------------------------------------------------------------------------------------------------
# --help and --version


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fastgen ")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0)" in text and "``" not in text and ":func:" not in text
    with pytest.raises(SystemExit):
        main(["bench", "attention", "--help"])
    assert capsys.readouterr().out.startswith("usage: fastgen bench attention")
    with pytest.raises(SystemExit):  # a suite that parses its own options names itself too
        main(["bench", "fidelity", "--help"])
    assert capsys.readouterr().out.startswith("usage: fastgen bench fidelity")


# ----------------------------------------------------------------------------------------------------
# reachable settings, the demo's launch, library noise


def test_causal_local_window_is_reachable_from_the_cli(workdir, capsys, monkeypatch):
    import fastgen.pipelines.causal_video_runner as cvr
    import fastgen.pipelines.video_runner as vr
    import numpy as np

    class CausalWanPipeline:  # the runner recognises the causal Wan by its class name
        pass

    seen = {}

    def generate(pipe, **kw):
        seen.update(kw)
        return {
            "frames": np.zeros((9, 32, 32, 3), np.uint8),
            "seconds": 0.1,
            "fps": 8,
            "stats": [],
            "config": {},
        }

    monkeypatch.setattr(vr, "load_video_pipeline", lambda **kw: CausalWanPipeline())
    monkeypatch.setattr(cvr, "generate_causal_video", generate)
    argv = ["generate", "--preset", "tiny-causal-wan", "--prompt", "a kite", "--method", "dense",
            "--local-attn-frames", "3", "--sink-frames", "1", "--out", "c.mp4"]  # fmt: skip
    assert _run(argv, capsys)[0] == 0
    assert seen["local_attn_frames"] == 3 and seen["sink_frames"] == 1
    code, _, err = _run([*argv[:-2], "--sink-frames", "-1", "--out", "d.mp4"], capsys)
    assert code == 2 and "--sink-frames=-1 is not allowed; allowed: an integer >= 0" in err


def test_demo_launches_with_errors_shown_in_the_browser_and_quiet(workdir, capsys, monkeypatch):
    pytest.importorskip("gradio")
    import fastgen.app.layout as layout

    launched = {}

    class FakeDemo:
        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr(layout, "build_demo", lambda **kw: FakeDemo())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = _run(["demo", "--port", port], capsys)
    assert code == 0 and launched["show_error"] is True and launched["quiet"] is True
    assert err.strip() == f"fastgen demo: serving on http://localhost:{port} (Ctrl-C to stop)"


def test_notices_a_user_cannot_act_on_are_dropped():
    import logging

    from fastgen.cli import _DropNotices

    def record(message):
        return logging.LogRecord(
            "transformers.utils.import_utils", logging.WARNING, __file__, 1, message, None, None
        )

    notice = (
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    )
    assert not _DropNotices().filter(record(notice))
    assert _DropNotices().filter(record("the checkpoint's config has no rope_theta"))
