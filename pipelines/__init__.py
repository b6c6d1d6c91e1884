"""fastgen pipelines: diffusion-LM pipeline, causal Wan pipeline, checkpoint loaders, tiny presets."""

from .presets import PRESETS, Preset, get_preset, load_preset


def __getattr__(name):
    # heavy pipelines are imported on first use
    if name in ("DiffusionLMPipeline", "DiffusionLMOutput"):
        from . import diffusion_lm

        return getattr(diffusion_lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PRESETS", "DiffusionLMOutput", "DiffusionLMPipeline", "Preset", "get_preset", "load_preset"]
