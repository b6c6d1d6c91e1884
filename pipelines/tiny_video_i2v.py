"""A tiny Wan 2.2-style image-to-video pipeline built in code (no downloads), for tests of I2V paths.

``build_tiny_wan_i2v`` returns a real diffusers ``WanImageToVideoPipeline`` laid out like Wan 2.2
I2V-A14B: no CLIP image encoder, the first frame's latent and a frame mask concatenated to the noisy
latent (``in_channels`` 16 + 4 + 16 = 36) and, by default, two expert transformers (``transformer``
for high noise, ``transformer_2`` below ``boundary_ratio``). Text encoder, VAE and tokenizer are
those of :func:`fastgen.pipelines.tiny_video.build_tiny_wan`; weights come from a fixed seed.

Example:
    >>> from PIL import Image
    >>> from fastgen.pipelines.tiny_video_i2v import build_tiny_wan_i2v
    >>> pipe = build_tiny_wan_i2v()
    >>> image = Image.new("RGB", (64, 64))
    >>> frames = pipe(image=image, prompt="a boat", height=64, width=64, num_frames=5,
    ...               num_inference_steps=2, output_type="np").frames[0]
"""

from __future__ import annotations

import torch

from .tiny_video import SEED, WAN_DEFAULTS, build_tiny_wan, tiny_wan_transformer


def _transformer(num_layers: int, seed: int):
    torch.manual_seed(seed)
    return tiny_wan_transformer(num_layers, in_channels=36)  # noisy latent 16 + frame mask 4 + first frame 16


def build_tiny_wan_i2v(device=None, dtype=None, num_layers: int = 2, two_experts: bool = True):
    """A ``WanImageToVideoPipeline`` with tiny transformer(s); ``two_experts`` adds ``transformer_2``
    (Wan 2.2 I2V, ``boundary_ratio`` 0.9: steps at timesteps >= 900 run ``transformer``)."""
    from diffusers import WanImageToVideoPipeline

    base = build_tiny_wan(device="cpu", num_layers=1)
    pipe = WanImageToVideoPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        scheduler=base.scheduler,
        image_processor=None,
        image_encoder=None,
        transformer=_transformer(num_layers, SEED + 10),
        transformer_2=_transformer(num_layers, SEED + 11) if two_experts else None,
        boundary_ratio=0.9 if two_experts else None,
    )
    pipe.to(torch.device(device) if device is not None else torch.device("cpu"))
    if dtype is not None and dtype != torch.float32:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        for model in (pipe.transformer, pipe.transformer_2):
            if model is not None:
                model.to(dtype)
    pipe.fastgen_defaults = dict(WAN_DEFAULTS)
    return pipe


__all__ = ["build_tiny_wan_i2v"]
