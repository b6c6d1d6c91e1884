"""The demo's page (:func:`build_demo`: the Video, Causal and Text tabs in one ``gr.Blocks``) and
``fastgen demo`` (:func:`launch`: checks the presets and the port, then serves with errors shown in
the browser as messages).

Example::

    fastgen demo --video-preset tiny-wan --text-preset tiny-llada --port 7860
    python -m fastgen.app --video-model Wan-AI/Wan2.1-T2V-1.3B-Diffusers
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from fastgen.optional import require

from .backends import RANDOM_WEIGHTS_NOTE, CausalDemoBackend, DemoBackend
from .causal_tab import add_causal_tab
from .limits import TRAINED_TEXT_PRESETS, DemoLimits, LazyPipeline
from .text_tab import add_text_tab
from .video_tab import add_video_tab

logger = logging.getLogger(__name__)


def _default_video_loader(preset, model):
    def load():
        from fastgen.pipelines.video_runner import load_video_pipeline

        return load_video_pipeline(preset=preset if model is None else None, model=model)

    return load


def _default_text_loader(preset, model):
    def load():
        from fastgen.pipelines.text_runner import load_text_pipeline

        return load_text_pipeline(preset=preset if model is None else None, model=model)

    return load


def _default_video_generate(pipe, **kwargs):
    from fastgen.pipelines.video_runner import generate_video

    return generate_video(pipe, **kwargs)


def _default_text_generate(pipe, **kwargs):
    from fastgen.pipelines.text_runner import generate_text

    return generate_text(pipe, **kwargs)


def _default_causal_generate(pipe, **kwargs):
    from fastgen.pipelines.causal_video_runner import generate_causal_video

    return generate_causal_video(pipe, **kwargs)


def note_of(preset: str | None, model: str | None) -> str | None:
    """``"random weights: output is noise by design"`` for a preset with random weights, else ``None``."""
    from fastgen.pipelines.presets import PRESETS

    found = PRESETS.get(preset or "") if model is None else None
    return RANDOM_WEIGHTS_NOTE if found is not None and "random weights" in found.description else None


def video_takes_image(preset: str | None, model: str | None) -> bool:
    """Whether the Video tab's model is image-to-video (read from its ``model_index.json``, no loading);
    no preset is."""
    if model is None:
        return False
    from fastgen.pipelines.video_loaders import pipeline_class_name

    try:
        return "ImageToVideo" in pipeline_class_name(model)
    except (OSError, ValueError):
        return False


def text_choices(text_preset: str, text_model: str | None, custom_loader: bool) -> list[str]:
    """The text models the Text tab offers, the served one first: with presets (no ``text_model``, no
    custom loader) also the trained :data:`~fastgen.app.limits.TRAINED_TEXT_PRESETS`; else only the
    served model."""
    served = text_model or text_preset
    if text_model is not None or custom_loader:
        return [served]
    return [served, *(p for p in TRAINED_TEXT_PRESETS if p != served)]


def build_demo(
    video_loader: Callable[[], object] | None = None,
    text_loader: Callable[[], object] | None = None,
    video_generate: Callable[..., dict] | None = None,
    text_generate: Callable[..., dict] | None = None,
    limits: DemoLimits | None = None,
    *,
    video_preset: str = "tiny-wan-long",
    text_preset: str = "tiny-llada-kv",
    video_model: str | None = None,
    text_model: str | None = None,
    video_defaults: dict | None = None,
    text_defaults: dict | None = None,
    causal_loader: Callable[[], object] | None = None,
    causal_generate: Callable[..., dict] | None = None,
    causal_preset: str = "tiny-causal-wan",
    causal_model: str | None = None,
    causal_defaults: dict | None = None,
    video_image: bool | None = None,
):
    """The demo as a ``gr.Blocks`` (queue already on with ``limits.concurrency`` per tab).

    Loaders are zero-argument callables returning a pipeline; generators follow
    ``fastgen.pipelines.video_runner.generate_video`` / ``text_runner.generate_text``. Defaults: those
    runners on ``video_preset`` / ``text_preset`` (or ``video_model`` / ``text_model``). The Causal tab
    (dense vs Light Forcing) uses ``causal_loader`` / ``causal_generate`` (default
    ``causal_video_runner.generate_causal_video`` on ``causal_preset`` or ``causal_model``).
    ``video_image`` shows the first-frame upload (default: only for an image-to-video ``video_model``).
    The Text tab starts on the served text model; started on presets it also offers the trained
    ``tiny-llada-kv`` and ``tiny-llada-long`` (:func:`text_choices`), each loaded on first use.
    """
    gr = require("gradio")
    require("matplotlib")  # every tab draws its pictures with it (in the app extra)

    limits = limits or DemoLimits()
    text_name, *text_more = text_choices(text_preset, text_model, text_loader is not None)
    backend = DemoBackend(
        video_pipeline=LazyPipeline(video_loader or _default_video_loader(video_preset, video_model)),
        text_pipeline=LazyPipeline(text_loader or _default_text_loader(text_preset, text_model)),
        video_generate=video_generate or _default_video_generate,
        text_generate=text_generate or _default_text_generate,
        limits=limits,
        video_note=note_of(video_preset, video_model) if video_loader is None else None,
        text_note=note_of(text_preset, text_model) if text_loader is None else None,
        text_name=text_name,
        text_others={p: (LazyPipeline(_default_text_loader(p, None)), note_of(p, None)) for p in text_more},
    )
    causal_backend = CausalDemoBackend(
        pipeline=LazyPipeline(causal_loader or _default_video_loader(causal_preset, causal_model)),
        generate=causal_generate or _default_causal_generate,
        limits=limits,
        note=note_of(causal_preset, causal_model) if causal_loader is None else None,
    )
    takes_image = video_takes_image(video_preset, video_model) if video_image is None else video_image
    with gr.Blocks(title="fastgen: dense vs sparse attention", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# fastgen: dense vs sparse attention\n"
            "Generate runs the dense model and the accelerated one with the **same seed** and shows both, "
            f"with time (median speedup of {limits.rounds} interleaved rounds, with its range and the load "
            "average), fidelity, and the block mask the sparse attention kept."
        )
        add_video_tab(backend, video_model or video_preset, video_defaults, takes_image)
        add_causal_tab(causal_backend, causal_model or causal_preset, causal_defaults)
        add_text_tab(backend, text_name, text_defaults)
    demo.queue(max_size=32, default_concurrency_limit=limits.concurrency)
    demo.fastgen_backend = backend
    demo.fastgen_causal_backend = causal_backend
    return demo


def check_presets(args: argparse.Namespace) -> None:
    """Each tab's preset makes what the tab shows (a ``ValueError`` naming the option otherwise)."""
    from fastgen.pipelines.presets import PRESETS, get_preset

    def kind_of(p):
        return "causal video" if p.family == "causal-wan" else p.kind

    wanted = (
        ("--video-preset", args.video_preset, "video", args.video_model),
        ("--text-preset", args.text_preset, "text", args.text_model),
        ("--causal-preset", getattr(args, "causal_preset", None), "causal video", None),
    )
    for flag, name, kind, model in wanted:
        if name is None or model is not None:
            continue
        found = kind_of(get_preset(name)) if name in PRESETS else None
        if found != kind:
            allowed = ", ".join(p.name for p in PRESETS.values() if kind_of(p) == kind)
            what = f"makes {found}" if found else "is unknown"
            raise ValueError(f"{flag}={name!r} {what}; allowed: {allowed}")


def launch(args: argparse.Namespace) -> int:
    """Run ``fastgen demo`` (blocks until the server stops); returns the exit status. The presets, the
    port (in range and free) and the demo's dependencies are checked before anything is built."""
    from fastgen.cli.checks import check_port

    if not isinstance(args.port, int) or not 1 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} is not allowed; allowed: 1..65535")
    rounds = getattr(args, "rounds", None)
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"--rounds={rounds} is not allowed; allowed: an integer >= 1")
    check_presets(args)
    require("gradio")
    require("matplotlib")
    check_port(args.port, args.host)
    limits = DemoLimits(rounds=rounds) if rounds else None
    demo = build_demo(
        limits=limits,
        video_preset=args.video_preset,
        text_preset=args.text_preset,
        video_model=args.video_model,
        text_model=args.text_model,
        causal_preset=getattr(args, "causal_preset", None) or "tiny-causal-wan",
    )
    host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    sys.stderr.write(f"fastgen demo: serving on http://{host}:{args.port} (Ctrl-C to stop)\n")
    # quiet: no gradio banner or share hint; show_error: a handler's error reaches the browser as its message
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, quiet=True)
    return 0


__all__ = ["build_demo", "check_presets", "launch", "note_of", "text_choices", "video_takes_image"]
