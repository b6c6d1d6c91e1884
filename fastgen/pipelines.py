"""fastgen pipelines (the modules are in the repository's ``pipelines/``): diffusion-LM pipeline, causal Wan pipeline, checkpoint loaders, tiny presets."""

from fastgen._layout import subpackage_path

__path__ = subpackage_path("pipelines", "presets.py")  # the modules live in the root's pipelines/

from typing import TYPE_CHECKING  # noqa: E402

from fastgen.pipelines.presets import PRESETS, Preset, get_preset, load_preset  # noqa: E402

if TYPE_CHECKING:  # imported on first use (below): they pull in diffusers / transformers
    from fastgen.pipelines.causal_wan import CausalWanPipeline
    from fastgen.pipelines.diffusion_lm import DiffusionLMOutput, DiffusionLMPipeline
    from fastgen.pipelines.self_forcing import load_self_forcing_checkpoint


def __getattr__(name):
    # heavy pipelines are imported on first use
    if name in ("DiffusionLMPipeline", "DiffusionLMOutput"):
        from fastgen.pipelines import diffusion_lm

        return getattr(diffusion_lm, name)
    if name == "CausalWanPipeline":
        from fastgen.pipelines.causal_wan import CausalWanPipeline

        return CausalWanPipeline
    if name == "load_self_forcing_checkpoint":
        from fastgen.pipelines.self_forcing import load_self_forcing_checkpoint

        return load_self_forcing_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "CausalWanPipeline",
    "DiffusionLMOutput",
    "DiffusionLMPipeline",
    "Preset",
    "get_preset",
    "load_preset",
    "load_self_forcing_checkpoint",
]
