"""Tests of the Gradio demo: handlers, a real ``gradio_client`` against the launched app, a headless browser."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'fastgen[app]')")

from fastgen.app.demo import DemoLimits, build_demo, draw_block_mask  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


# ----------------------------------------------------------------------------------------------------
# fakes with the runners' interface


def _mask(heads=2, nq=5, nk=5):
    rng = np.random.default_rng(0)
    return rng.random((heads, nq, nk)) < 0.4


def fake_video_generate(pipe, *, prompt, seed=0, method="rectified", config=None, progress=True, **params):
    """Seeded frames of the requested size; the sparse run is slightly off and records block masks."""
    frames = np.random.default_rng(seed).integers(
        0, 250, size=(params["frames"], params["height"], params["width"], 3)
    )
    stats = []
    if method != "dense":
        frames = frames + 2
        stats = [
            {"layer": i, "density": 0.4, "compensated_fraction": 0.5, "block_mask": _mask()} for i in (1, 2)
        ]
    return {"frames": frames.astype(np.uint8), "seconds": 1.0 if method == "dense" else 0.4, "fps": 8,
            "stats": stats, "config": {}}  # fmt: skip


def fake_causal_generate(
    pipe, *, prompt, seed=0, method="light_forcing", config=None, progress=True, **params
):
    """Seeded frames; the Light Forcing run records per-(chunk, layer) rows as the causal runner does."""
    frames = np.random.default_rng(seed).integers(
        0, 250, size=(params["frames"], params["height"], params["width"], 3)
    )
    stats = []
    if method != "dense":
        frames = frames + 1
        stats = [{"chunk": c, "layer": layer, "density": 1.0 if c == 0 else 0.3, "sparsity": 0.0 if c == 0 else 0.7,
                  "block_mask": _mask()} for c in (0, 1) for layer in (0, 1)]  # fmt: skip
    return {"frames": frames.astype(np.uint8), "seconds": 1.0 if method == "dense" else 0.5, "fps": 8,
            "stats": stats, "config": {}}  # fmt: skip


def fake_text_generate(pipe, *, prompt, seed=0, method="sparsed", config=None, progress=True, **params):
    """Seeded tokens; the accelerated run changes one token and reports stats as the runner does: SparseD
    layers, and for Window-Diffusion methods the per-step trace (refresh step, then pruned steps)."""
    n = params["gen_length"]
    tokens = [int(t) for t in np.random.default_rng(seed).integers(0, 50, size=n)]
    stats = {}
    if method != "dense":
        tokens[0] += 1
    if "sparsed" in method:
        stats = {"density": 0.3, "layers": [{"layer": 0, "density": 0.3, "block_mask": _mask(3, 4, 4)}]}
    if "window_diffusion" in method:
        prompt_length, total = 5, 5 + n
        trace = [{"step": 0, "refresh": True, "queries": total, "keys": total, "active": list(range(total)),
                  "window": list(range(total))}]  # fmt: skip
        for step in range(1, params["steps"]):
            trace.append({"step": step, "refresh": False, "queries": 2, "keys": total - 1,
                          "active": [prompt_length + step, prompt_length + step + 1],
                          "window": list(range(total - 1))})  # fmt: skip
        stats.update(refresh_steps=1, pruned_steps=len(trace) - 1, mean_queries=sum(t["queries"] for t in trace)
                     / len(trace), mean_keys=sum(t["keys"] for t in trace) / len(trace), positions=total,
                     prompt_length=prompt_length, trace=trace)  # fmt: skip
    seconds = 2.0 if method == "dense" else 1.0
    return {"text": " ".join(map(str, tokens)), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": len(tokens) / seconds, "stats": stats, "config": {}}  # fmt: skip


def _value(output):
    """The value of an output that the app returns as a component update."""
    return output["value"] if isinstance(output, dict) and output.get("__type__") == "update" else output


def _path(video):
    """The file of a video output (a path, or a dict with ``video`` depending on the gradio version)."""
    return video["video"] if isinstance(video, dict) else video


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(demo):
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    return demo.local_url


@pytest.fixture(scope="module")
def fake_app():
    loads = []
    demo = build_demo(
        video_loader=lambda: loads.append("video") or "video-pipe",
        text_loader=lambda: loads.append("text") or "text-pipe",
        video_generate=fake_video_generate,
        text_generate=fake_text_generate,
        causal_loader=lambda: loads.append("causal") or "causal-pipe",
        causal_generate=fake_causal_generate,
        limits=DemoLimits(max_frames=17, max_side=256, max_steps=8, max_gen_length=64),
        causal_defaults={"frames": 9, "height": 32, "width": 32},
    )
    url = _launch(demo)
    yield demo, url, loads
    demo.close()


VIDEO_ARGS = dict(prompt="a cat", negative_prompt="", sparsity=0.8, block_size=128, dense_layers=1,
                  warmup_steps=1, form="exact", steps=2, seed=3, height=32, width=48, frames=3)  # fmt: skip
TEXT_ARGS = dict(prompt="hello", method="sparsed", skip=0.2, select=0.3, block_size=32, window=8, active=4,
                 refresh_cycle=4, steps=4, gen_length=8, block_length=8, temperature=0.0, seed=5)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# pieces


def test_draw_block_mask_writes_png(tmp_path):
    stats = [{"layer": 4, "density": 0.25, "block_mask": _mask()}]
    path = draw_block_mask(stats, "4", 1, str(tmp_path / "m.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # no mask recorded (dense run, or a runner that keeps no tensors): a placeholder picture, no error
    assert os.path.getsize(draw_block_mask([], None, 0, str(tmp_path / "empty.png"))) > 0


# ----------------------------------------------------------------------------------------------------
# a real client against the launched app


def test_client_video_tab_returns_both_videos_metrics_and_mask(fake_app):
    from gradio_client import Client

    demo, url, loads = fake_app
    client = Client(url, verbose=False)
    out = client.predict(*VIDEO_ARGS.values(), api_name="/generate_video")
    dense_video, sparse_video, table, metrics, mask, layer, head = out
    for video in (dense_video, sparse_video):
        path = _path(video)
        assert os.path.getsize(path) > 0 and path.endswith(".mp4")
    assert metrics["speedup"] == pytest.approx(2.5)
    assert 30 < metrics["psnr"] < 60 and 0 < metrics["ssim"] <= 1
    assert metrics["density"] == pytest.approx(0.4) and metrics["seed"] == 3
    assert metrics["config"]["method"] == "rectified" and metrics["config"]["sparsity"] == 0.8
    assert "PSNR" in table
    # the median of the interleaved rounds, with their range and the load average next to it
    assert metrics["rounds"] == 3 and metrics["speedup_rounds"] == pytest.approx([2.5] * 3)
    assert "speedup vs dense 2.50x (median of 3 interleaved rounds, range 2.50x-2.50x" in table
    assert "load average" in table and metrics["sparse_never_ran"] is None
    assert os.path.getsize(mask) > 0 and _value(layer) == "1" and _value(head) == 0
    assert layer["choices"] == [["1", "1"], ["2", "2"]]
    # every request writes its own files; the pipeline was loaded once, lazily
    before = set(os.listdir(demo.fastgen_backend.folders.root))
    client.predict(*VIDEO_ARGS.values(), api_name="/generate_video")
    after = set(os.listdir(demo.fastgen_backend.folders.root))
    assert len(after - before) == 1
    assert sorted(os.listdir(os.path.join(demo.fastgen_backend.folders.root, *(after - before)))) == [
        "dense.mp4",
        "mask.png",
        "rectified.mp4",
    ]
    assert loads.count("video") == 1


def test_client_text_tab_returns_both_texts_and_metrics(fake_app):
    from gradio_client import Client

    demo, url, loads = fake_app
    client = Client(url, verbose=False)
    dense, sparse, table, metrics, mask, layer, head, sets = client.predict(
        *TEXT_ARGS.values(), api_name="/generate_text"
    )
    assert len(dense.split()) == 8 and dense != sparse
    assert metrics["token_agreement"] == pytest.approx(7 / 8)
    assert metrics["speedup"] == pytest.approx(2.0)
    assert metrics["accelerated_tokens_per_s"] == pytest.approx(8.0)
    assert metrics["config"] == {"method": "sparsed", "skip": 0.2, "select": 0.3, "block_size": 32}
    assert "token agreement" in table and os.path.getsize(mask) > 0 and _value(layer) == "0"
    assert metrics["density"] == pytest.approx(0.3) and "refresh_steps" not in metrics
    assert os.path.getsize(sets) > 0  # the placeholder: SparseD alone records no window trace


@pytest.mark.parametrize("method", ["window_diffusion", "sparsed+window_diffusion"])
def test_client_text_tab_window_methods_show_the_window_sets_and_their_statistics(fake_app, method):
    from gradio_client import Client

    demo, url, _ = fake_app
    args = {**TEXT_ARGS, "method": method}
    dense, fast, table, metrics, mask, layer, head, sets = Client(url, verbose=False).predict(
        *args.values(), api_name="/generate_text"
    )
    assert dense != fast and metrics["method"] == method
    assert (metrics["refresh_steps"], metrics["pruned_steps"]) == (1, 3)
    assert metrics["mean_rows_run"] == pytest.approx((13 + 3 * 2) / 4)  # the same trace as the picture
    assert "refresh / pruned steps | 1 / 3" in table and "Window-Diffusion" in table
    configs = [c["method"] for c in metrics["config"]]
    assert configs == ["window_diffusion"] + (["sparsed"] if "sparsed" in method else [])
    assert metrics["config"][0] == {"method": "window_diffusion", "window": 8, "active": 4, "refresh_cycle": 4,
                                    "sliding": None}  # fmt: skip
    assert ("mean density of sparse layers" in table) == ("sparsed" in method)
    with open(sets, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("api", "change", "message"),
    [  # sliders are bounded by gradio itself, the rest by the handlers
        ("/generate_video", {"frames": 1000}, "Value 1000 is greater than maximum value 17"),
        ("/generate_video", {"height": 4096}, "Value 4096 is greater than maximum value 256"),
        ("/generate_video", {"steps": 0}, "Value 0 is less than minimum value 1"),
        ("/generate_video", {"seed": -1}, "Value -1 is less than minimum value 0"),
        ("/generate_video", {"prompt": "   "}, "prompt is empty"),
        ("/generate_video", {"warmup_steps": 50}, r"warm-up steps=50 is out of range; allowed: 0\.\.8"),
        (
            "/generate_video",
            {"block_size": 48},
            r"48 is not in the list of choices: \[16, 32, 64, 128, 256\]",
        ),
        ("/generate_text", {"gen_length": 100000}, "Value 100000 is greater than maximum value 64"),
        ("/generate_text", {"block_length": 50}, r"block length=50 is out of range; allowed: 1\.\.8"),
        ("/generate_text", {"prompt": "x" * 5000}, "prompt has 5000 characters; allowed: at most 4000"),
        ("/generate_text", {"method": "window_diffusion", "active": 9}, "active=9 must be <= window=8"),
        ("/generate_text", {"method": "rectified"}, r"not in the list of choices: \['sparsed'"),
    ],
)
def test_out_of_range_inputs_are_clear_errors(fake_app, api, change, message):
    from gradio_client import Client

    demo, url, _ = fake_app
    args = {**(VIDEO_ARGS if api == "/generate_video" else TEXT_ARGS), **change}
    with pytest.raises(Exception, match=message):
        Client(url, verbose=False).predict(*args.values(), api_name=api)


def test_handlers_check_bounds_without_the_ui(fake_app):
    demo, _, _ = fake_app
    backend = demo.fastgen_backend
    with pytest.raises(gr.Error, match=r"frames=1000 is out of range; allowed: 1\.\.17"):
        backend.run_video(*{**VIDEO_ARGS, "frames": 1000}.values())
    with pytest.raises(gr.Error, match="steps=2.5 must be a whole number"):
        backend.run_text(*{**TEXT_ARGS, "steps": 2.5}.values())
    with pytest.raises(gr.Error, match="sparsity=1.5 is out of range"):
        backend.run_video(*{**VIDEO_ARGS, "sparsity": 1.5}.values())
    with pytest.raises(gr.Error, match="block_size=48 is not allowed; it must be a power of two"):
        backend.run_video(*{**VIDEO_ARGS, "block_size": 48}.values())


def _real_runner(name: str) -> bool:
    return importlib.util.find_spec(f"fastgen.pipelines.{name}") is not None


@pytest.mark.skipif(not _real_runner("text_runner"), reason="fastgen.pipelines.text_runner is not there yet")
def test_client_text_tab_with_tiny_llada():
    from gradio_client import Client

    demo = build_demo(video_loader=lambda: None, video_generate=fake_video_generate, text_preset="tiny-llada")
    url = _launch(demo)
    try:
        out = Client(url, verbose=False).predict(*{**TEXT_ARGS, "gen_length": 16, "block_length": 16}.values(),
                                                 api_name="/generate_text")  # fmt: skip
        dense, sparse, table, metrics, mask, layer, head, sets = out
        assert isinstance(dense, str) and isinstance(sparse, str)
        assert 0.0 <= metrics["token_agreement"] <= 1.0
        assert metrics["dense_tokens_per_s"] > 0 and metrics["accelerated_tokens_per_s"] > 0
        assert os.path.getsize(mask) > 0
    finally:
        demo.close()


def test_window_sets_picture_codes(tmp_path):
    from fastgen.app.window_demo import draw_window_sets, window_sets_image

    trace = [
        {"refresh": True, "active": np.arange(6), "window": np.arange(6)},
        {"refresh": False, "active": np.array([3]), "window": np.array([0, 1, 2, 3, 4])},
    ]
    assert window_sets_image(trace, 6).tolist() == [[2] * 6, [1, 1, 1, 2, 1, 0]]
    assert os.path.getsize(draw_window_sets(trace, 6, 2, str(tmp_path / "w.png"))) > 0
    assert os.path.getsize(draw_window_sets(None, 0, 0, str(tmp_path / "none.png"))) > 0


def _real_text_backend(preset: str, limits: DemoLimits):
    """The demo's Text backend on ``preset`` with the real text runner (no video pipeline)."""
    from fastgen.app.demo import DemoBackend, LazyPipeline
    from fastgen.pipelines.text_runner import generate_text, load_text_pipeline

    return DemoBackend(
        video_pipeline=LazyPipeline(lambda: None),
        text_pipeline=LazyPipeline(lambda: load_text_pipeline(preset=preset)),
        video_generate=None,
        text_generate=generate_text,
        limits=limits,
    )


@pytest.mark.skipif(not _real_runner("text_runner"), reason="fastgen.pipelines.text_runner is not there yet")
def test_text_handler_composes_window_diffusion_and_sparsed_on_tiny_llada():
    backend = _real_text_backend("tiny-llada", DemoLimits(max_gen_length=64))
    args = dict(prompt="Hello", method="sparsed+window_diffusion", skip=0.25, select=0.5, block_size=16, window=16,
                active=4, refresh_cycle=8, steps=32, gen_length=32, block_length=32, temperature=0.0, seed=0)  # fmt: skip
    dense, fast, table, metrics, mask, layer, head, state, sets = backend.run_text(*args.values())
    assert isinstance(dense, str) and isinstance(fast, str) and "token agreement" in table
    assert (metrics["refresh_steps"], metrics["pruned_steps"]) == (4, 28)
    # SparseD's statistics of the composed run: the heatmap's layer rows, averaged in the table
    assert state["stats"] and 0 < metrics["density"] <= 1
    assert layer.value in {str(row["layer"]) for row in state["stats"]}
    assert metrics["density"] == pytest.approx(float(np.mean([s["density"] for s in state["stats"]])))
    assert os.path.getsize(mask) > 0 and os.path.getsize(sets) > 0
    with pytest.raises(gr.Error, match=r"active=4 \+ \(refresh_cycle=8 - 1\).*window=8"):
        backend.run_text(*{**args, "window": 8}.values())


@pytest.mark.skipif(
    not _real_runner("video_runner"), reason="fastgen.pipelines.video_runner is not there yet"
)
def test_client_video_tab_with_tiny_wan():
    from gradio_client import Client

    demo = build_demo(text_loader=lambda: None, text_generate=fake_text_generate, video_preset="tiny-wan-long",
                      limits=DemoLimits(rounds=1))  # fmt: skip
    url = _launch(demo)
    try:
        # 2 latent frames of 8x16 tokens: 256 tokens, enough for Rectified SpaAttn to run sparse
        args = {**VIDEO_ARGS, "height": 64, "width": 128, "frames": 5, "steps": 2, "dense_layers": 0}
        dense, sparse, table, metrics, mask, layer, head = Client(url, verbose=False).predict(
            *args.values(), api_name="/generate_video"
        )
        assert os.path.getsize(_path(dense)) > 0 and os.path.getsize(_path(sparse)) > 0
        assert metrics["ssim"] > 0
        # the block-mask panel shows the recorded masks (it said "no block mask recorded" before)
        assert _value(layer) and metrics["density"] is not None
        assert metrics["speedup"] is None or metrics["speedup"] > 0
        assert metrics["note"] == "random weights: output is noise by design"
    finally:
        demo.close()


# ----------------------------------------------------------------------------------------------------
# a headless browser clicks Generate


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (the Python package) is not installed: pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at /usr/bin/chromium: apt-get install -y chromium")
    return sync_playwright


def test_browser_clicks_generate_and_sees_results(fake_app, tmp_path):
    sync_playwright = _browser_or_skip()
    demo, url, _ = fake_app
    save = os.environ.get("FASTGEN_SAVE_SCREENSHOT") == "1"
    if save and _real_runner("video_runner") and _real_runner("text_runner"):
        # the README screenshot shows the real tiny presets, not the fakes
        demo = build_demo()
        url = _launch(demo)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            # gradio pages keep connections open (and may try web fonts), so never "networkidle"
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector("#video-generate", timeout=60_000)
            page.click("#video-generate")
            page.wait_for_selector("#video-metrics :text('speedup')", timeout=180_000)
            page.wait_for_selector("#video-sparse video", timeout=60_000)
            page.wait_for_selector("#video-mask img", timeout=60_000)
            assert "PSNR" in page.inner_text("#video-metrics")
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert os.path.getsize(shot) > 10_000
            if save:
                page.screenshot(path=os.path.join(REPO, "samples", "demo_screenshot.png"), full_page=True)
            # the Text tab too: SparseD, then Window-Diffusion + SparseD with its picture of the window sets
            page.get_by_role("tab", name="Text").click()
            page.click("#text-generate")
            page.wait_for_selector("#text-metrics :text('token agreement')", timeout=180_000)
            page.locator("#text-method").get_by_text("sparsed+window_diffusion", exact=True).click()
            page.click("#text-generate")
            page.wait_for_selector("#text-metrics :text('refresh / pruned steps')", timeout=180_000)
            page.wait_for_selector("#text-window-sets img", timeout=60_000)
            if save:  # the Text tab as it is now, before the Causal tab is opened
                page.screenshot(
                    path=os.path.join(REPO, "samples", "demo_screenshot_text.png"), full_page=True
                )
            # and the Causal tab: dense vs Light Forcing, per-chunk density and a chunk's mask
            page.get_by_role("tab", name="Causal video (Light Forcing)").click()
            page.click("#causal-generate")
            page.wait_for_selector("#causal-metrics :text('density of chunk 1')", timeout=180_000)
            page.wait_for_selector("#causal-mask img", timeout=60_000)
            assert "speedup" in page.inner_text("#causal-metrics")
        finally:
            browser.close()
            if demo is not fake_app[0]:
                demo.close()


def test_video_handler_passes_the_first_frame_to_image_to_video_pipelines(fake_app, tmp_path):
    """The demo's image field reaches ``generate_video(image=...)`` for both runs; empty, it is not passed."""
    demo, _, _ = fake_app
    backend = demo.fastgen_backend
    seen = []
    real = backend.video_generate

    def recording(pipe, **kw):
        seen.append(kw.get("image", "absent"))
        return real(pipe, **{k: v for k, v in kw.items() if k != "image"})

    backend.video_generate = recording
    try:
        backend.run_video(*VIDEO_ARGS.values(), str(tmp_path / "first.png"))
        backend.run_video(*VIDEO_ARGS.values(), None)
    finally:
        backend.video_generate = real
    # 3 timing rounds of 2 runs each (plus the 2 untimed warm-up calls when this pipeline is still cold)
    first, second = seen[:-6], seen[-6:]
    assert first == [str(tmp_path / "first.png")] * len(first) and len(first) in (6, 8)
    assert second == ["absent"] * 6


def test_task_example_prompts_fit_the_demo_prompt_limit():
    # the Text tab offers these as its default prompt: each must pass the demo's own input check
    from fastgen.app.demo import DemoLimits, _check_prompt, task_examples

    examples = task_examples("tiny-llada-kv")
    assert examples
    for prompt in examples:
        assert _check_prompt(prompt, DemoLimits()) == prompt.strip()  # raises when over the limit


def test_text_tab_starts_with_the_long_answer_models_card_and_examples():
    # `fastgen demo --text-preset tiny-llada-long`: its card's 256 tokens, one per step, a held-out ledger prompt
    from fastgen.app.limits import TEXT_DEFAULTS, text_defaults_of
    from fastgen.pipelines.long_task import LedgerTask

    assert text_defaults_of("tiny-llada-kv") == TEXT_DEFAULTS == text_defaults_of(None)
    demo = build_demo(video_loader=lambda: None, video_generate=fake_video_generate, text_loader=lambda: None,
                      text_generate=None, text_preset="tiny-llada-long")  # fmt: skip
    values = {getattr(b, "label", None): getattr(b, "value", None) for b in demo.blocks.values()}
    expected = LedgerTask().held_out(1)[0]
    assert values["generation length"] == values["steps"] == values["block length"] == 256
    assert values["method"] == "window_diffusion"
    assert values["prompt (a held-out task example; the answer is checked)"] == expected.prompt
    from fastgen.app.limits import check_prompt

    assert check_prompt(expected.prompt, DemoLimits()) == expected.prompt  # raises when over the limit


@pytest.mark.skipif(not _real_runner("text_runner"), reason="fastgen.pipelines.text_runner is not there yet")
def test_text_handler_checks_the_long_answer_of_tiny_llada_long():
    from fastgen.app.limits import task_examples, text_defaults_of
    from fastgen.pipelines.long_task import LedgerTask

    backend = _real_text_backend("tiny-llada-long", DemoLimits(rounds=1))
    td = text_defaults_of("tiny-llada-long")
    # 4 tokens per step (64 steps) to stay fast: Window-Diffusion's window must hold 16 + 31 * 4 masks
    args = dict(prompt=task_examples("tiny-llada-long")[0], method=td["method"], skip=td["skip"],
                select=td["select"], block_size=td["block_size"], window=160, active=16, refresh_cycle=32, steps=64,
                gen_length=td["gen_length"], block_length=td["block_length"], temperature=0.0, seed=0)  # fmt: skip
    dense, fast, table, metrics, *_ = backend.run_text(*args.values())
    answer = LedgerTask().held_out(1)[0].answer
    assert metrics["answer"] == answer and len(answer.split()) == 256
    assert metrics["dense_correct"] == (dense.split() == answer.split())
    assert metrics["accelerated_correct"] == (fast.split() == answer.split())
    assert (metrics["refresh_steps"], metrics["pruned_steps"]) == (2, 62)
    assert "expected answer" in table and "Window-Diffusion answer right" in table


# ----------------------------------------------------------------------------------------------------
# the Text tab's model picker


def _component(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def _picker(demo):
    """The model picker's choices and whether the user can change it."""
    picker = _component(demo, "text-model")
    return [value for _, value in picker.choices], picker.interactive


def _pick(demo, model):
    """Run the page's own handler of the model picker; its outputs by elem_id, else label, else type."""
    picker = _component(demo, "text-model")
    fn = next(f for f in demo.fns.values() if [b._id for b in f.inputs] == [picker._id])
    outputs = fn.fn(model)
    names = [getattr(o, "elem_id", None) or getattr(o, "label", None) or type(o).__name__ for o in fn.outputs]
    return dict(zip(names, outputs, strict=True))


def test_text_model_picker_lists_the_served_model_then_the_trained_presets():
    common = dict(video_loader=lambda: None, video_generate=fake_video_generate)
    assert _picker(build_demo(**common, text_preset="tiny-llada")) == (
        ["tiny-llada", "tiny-llada-kv", "tiny-llada-long"],
        True,
    )
    assert _picker(build_demo(**common, text_preset="tiny-llada-long")) == (
        ["tiny-llada-long", "tiny-llada-kv"],
        True,
    )
    # a custom loader or a checkpoint path: that model only, and the picker is not interactive
    custom = build_demo(**common, text_loader=lambda: None, text_generate=fake_text_generate)
    assert _picker(custom) == (["tiny-llada-kv"], False)
    assert list(custom.fastgen_backend.text_models) == ["tiny-llada-kv"]
    assert _picker(build_demo(**common, text_model="/models/my-llada")) == (["/models/my-llada"], False)


def test_picking_a_text_model_resets_the_tab_to_its_defaults_examples_and_note():
    from fastgen.app.limits import task_examples, text_defaults_of
    from fastgen.app.text_tab import text_model_values

    demo = build_demo(video_loader=lambda: None, video_generate=fake_video_generate, text_preset="tiny-llada")
    backend = demo.fastgen_backend
    long = text_model_values(backend, "tiny-llada-long")
    td = text_defaults_of("tiny-llada-long")
    assert (long["method"], long["steps"], long["length"], long["block_length"]) == (
        "window_diffusion",
        256,
        256,
        256,
    )
    assert (long["window"], long["active"], long["refresh"]) == (
        td["window"],
        td["active"],
        td["refresh_cycle"],
    )
    assert long["examples"] == task_examples("tiny-llada-long") and long["prompt"] == long["examples"][0]
    # the page's handler: every control, the prompt, the example list and the model line follow the pick
    out = _pick(demo, "tiny-llada-long")
    assert (out["text-method"], out["steps"], out["generation length"], out["block length"]) == (
        "window_diffusion",
        256,
        256,
        256,
    )
    assert (out["skip (dense fraction of steps)"], out["block size"]) == (td["skip"], td["block_size"])
    prompt = out["text-prompt"]
    assert prompt.value == long["prompt"] and prompt.label.startswith("prompt (a held-out")
    assert (
        out["text-examples"].constructor_args["samples"] == [[e] for e in long["examples"]]
        and out["State"] == long["examples"]
    )
    assert "`tiny-llada-long`" in out["text-model-line"] and "random weights" not in out["text-model-line"]
    # back to the served model (random weights, no task): its card, no examples, the note
    out = _pick(demo, "tiny-llada")
    assert (out["text-method"], out["steps"], out["generation length"]) == ("sparsed", 4, 4)
    assert out["text-prompt"].label == "prompt"
    assert out["text-examples"].visible is False and out["State"] == []
    assert "random weights" in out["text-model-line"]
    with pytest.raises(
        gr.Error, match=r"model='tiny-wan' is not allowed; allowed: tiny-llada, tiny-llada-kv"
    ):
        _pick(demo, "tiny-wan")
    # nothing was loaded by picking
    assert all(lazy.pipe is None for lazy, _ in backend.text_models.values())
    # build_demo's text_defaults stay with the model the tab started on, also when it is picked again
    demo = build_demo(video_loader=lambda: None, video_generate=fake_video_generate, text_preset="tiny-llada",
                      text_defaults={"steps": 7})  # fmt: skip
    assert (_pick(demo, "tiny-llada")["steps"], _pick(demo, "tiny-llada-kv")["steps"]) == (7, 4)


def test_text_api_takes_the_model_last_and_checks_it(fake_app):
    from gradio_client import Client

    demo, url, _ = fake_app
    client = Client(url, verbose=False)
    # old clients (no model) and the served model by name get the same run
    *_, metrics, _mask, _layer, _head, _sets = client.predict(*TEXT_ARGS.values(), api_name="/generate_text")
    assert metrics["model"] == "tiny-llada-kv"
    *_, metrics, _mask, _layer, _head, _sets = client.predict(
        *TEXT_ARGS.values(), "tiny-llada-kv", api_name="/generate_text"
    )
    assert metrics["model"] == "tiny-llada-kv"
    with pytest.raises(
        Exception, match=r"tiny-llada-long is not in the list of choices: \['tiny-llada-kv'\]"
    ):
        client.predict(*TEXT_ARGS.values(), "tiny-llada-long", api_name="/generate_text")
    # the handler itself: one line naming the value and the allowed models, before any work
    backend = demo.fastgen_backend
    before = set(os.listdir(backend.folders.root))
    with pytest.raises(gr.Error) as err:
        backend.run_text(*TEXT_ARGS.values(), "tiny-llada-long")
    assert err.value.message == "model='tiny-llada-long' is not allowed; allowed: tiny-llada-kv"
    assert set(os.listdir(backend.folders.root)) == before
    with pytest.raises(gr.Error, match=r"model=\[1\] is not allowed"):
        backend.run_text(*TEXT_ARGS.values(), [1])
    assert backend.run_text(*TEXT_ARGS.values(), None)[3]["model"] == "tiny-llada-kv"


@pytest.mark.skipif(not _real_runner("text_runner"), reason="fastgen.pipelines.text_runner is not there yet")
def test_text_handler_runs_the_picked_model_and_checks_its_task():
    from fastgen.app.limits import task_examples
    from fastgen.pipelines.kv_task import KVTask

    # served: the random-weights tiny-llada (no task); picked: the trained tiny-llada-kv
    demo = build_demo(video_loader=lambda: None, video_generate=fake_video_generate, text_preset="tiny-llada",
                      limits=DemoLimits(rounds=1))  # fmt: skip
    backend = demo.fastgen_backend
    prompt = task_examples("tiny-llada-kv")[0]
    args = {**TEXT_ARGS, "prompt": prompt, "steps": 4, "gen_length": 4, "block_length": 4}
    dense, fast, table, metrics, *_ = backend.run_text(*args.values(), "tiny-llada-kv")
    answer = KVTask().answer_of(prompt)
    assert metrics["model"] == "tiny-llada-kv" and metrics["answer"] == answer and metrics["note"] is None
    assert metrics["dense_correct"] == (dense.split() == answer.split())
    assert "expected answer" in table and "| model | tiny-llada-kv |" in table.replace("  ", " ")
    assert backend.text_models["tiny-llada-kv"][0].pipe is not None
    assert (
        backend.text_models["tiny-llada"][0].pipe is None
        and backend.text_models["tiny-llada-long"][0].pipe is None
    )
    # the served model (no model given): no task, so no answer check; its random-weights note
    *_, metrics, _mask, _layer, _head, _state, _sets = backend.run_text(
        *{**TEXT_ARGS, "prompt": "Hello"}.values()
    )
    assert metrics["model"] == "tiny-llada" and "answer" not in metrics
    assert metrics["note"] == "random weights: output is noise by design"


def test_browser_picks_a_text_model_and_its_examples():
    sync_playwright = _browser_or_skip()
    from fastgen.app.limits import task_examples

    # started on presets (the fake generator ignores the pipeline; picking loads nothing)
    demo = build_demo(video_loader=lambda: None, video_generate=fake_video_generate, text_generate=fake_text_generate,
                      text_preset="tiny-llada", limits=DemoLimits(rounds=1))  # fmt: skip
    url = _launch(demo)
    examples = task_examples("tiny-llada-long")
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
    ]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1500})
                page.goto(url, wait_until="domcontentloaded", timeout=60_000)
                page.get_by_role("tab", name="Text").click()
                prompt = page.locator("#text-prompt textarea")
                assert "random weights" in page.inner_text("#text-model-line")
                page.locator("#text-model input").click()
                page.get_by_role("option", name="tiny-llada-long", exact=True).click()
                page.wait_for_function(
                    "e => document.querySelector('#text-prompt textarea').value === e",
                    arg=examples[0],
                    timeout=30_000,
                )
                assert "tiny-llada-long" in page.inner_text("#text-model-line")
                assert "random weights" not in page.inner_text("#text-model-line")
                # the example list is the picked model's: its second example fills the prompt
                page.locator("#text-examples").get_by_role("button").nth(1).click()
                page.wait_for_function(
                    "e => document.querySelector('#text-prompt textarea').value === e",
                    arg=examples[1],
                    timeout=30_000,
                )
                assert prompt.input_value() == examples[1]
            finally:
                browser.close()
    finally:
        demo.close()
    assert all(lazy.pipe is None for lazy, _ in demo.fastgen_backend.text_models.values())
