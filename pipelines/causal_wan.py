"""``CausalWanPipeline``: autoregressive, KV-cached text-to-video on a plain diffusers Wan 2.1 (Self-Forcing).

Self-Forcing (Huang et al., 2025) generates the latent video in chunks of ``num_frames_per_chunk`` frames
(default 3). Each chunk is denoised in a few steps at ``denoising_timesteps`` (default the warped
``[1000, 937.5, 833.33, 625]``; ``sigma = t / 1000``): the transformer predicts the flow ``v``,
``x0 = x_t - sigma * v`` and, except after the last step, the next input is
``(1 - sigma_next) * x0 + sigma_next * noise`` with fresh noise. Then one more forward on the clean chunk
at ``context_timestep`` (default 0) writes its K/V into the cache that later chunks attend to. That
context pass is skipped after the last chunk (nothing reads it; the output is the same).

The components are ``WanPipeline``'s (``tokenizer``, ``text_encoder``, ``vae``, ``transformer``: a plain
``WanTransformer3DModel``, ``scheduler``), so a diffusers Wan 2.1 T2V folder loads as is. The causal
behaviour lives in ``fastgen.processors.causal_wan`` (processors + a RoPE hook installed for the call and
removed after, or the ones already installed, e.g. Light Forcing's). ``scheduler`` is kept for
compatibility but unused: the few-step schedule above is the model's. With ``prompt_embeds`` and
``output_type="latent"`` only ``transformer`` is needed.

Reproducible noise: ``latents`` may pass the initial noise ``[B, C, F, H, W]`` (chunk c starts from
``latents[:, :, c*k:(c+1)*k]``). For each chunk and each denoising step but the last, the fresh noise is
``torch.randn(chunk.shape, generator=generator, dtype=torch.float32)`` moved to the latents' device and
dtype, drawn in chunk then step order; nothing else is drawn when ``latents`` is given (without it the
initial noise is drawn first, ``torch.randn(latents_shape, generator=generator, dtype=torch.float32)``).

Frames and blocks: latent frame ``f`` is the ``T = (H/16) * (W/16)`` consecutive tokens ``[f*T, (f+1)*T)``
(VAE /8, patch /2). 480x832 gives T = 1560 (blocks of 64 or 128 straddle frame boundaries: 1560 = 12 * 128
+ 24); 512x768 gives T = 1536 = 12 * 128, every frame exactly 12 blocks of 128 (24 of 64).

Example:
    >>> import torch
    >>> from fastgen.pipelines import CausalWanPipeline, load_self_forcing_checkpoint
    >>> pipe = CausalWanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
    >>> load_self_forcing_checkpoint(pipe.transformer, "self_forcing_dmd.pt")
    >>> pipe.to("cuda")
    >>> video = pipe(prompt="a corgi surfing a wave", generator=torch.Generator().manual_seed(0)).frames[0]
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline

from fastgen._validation import is_number
from fastgen.processors.causal_wan import causal_generation, check_causal_wan, check_chunking
from fastgen.tracking import get_step_tracker

logger = logging.getLogger(__name__)

SELF_FORCING_TIMESTEPS = (1000.0, 937.5, 2500.0 / 3.0, 625.0)
"""Self-Forcing's four denoising timesteps: ``[1000, 750, 500, 250]`` warped with shift 5."""

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
"""Allowed ``output_type`` values."""


def warp_timesteps(timesteps, shift: float = 5.0) -> list[float]:
    """``t -> 1000 * shift * s / (1 + (shift - 1) * s)`` with ``s = t / 1000`` (the flow-matching shift)."""
    out = []
    for t in timesteps:
        s = float(t) / 1000.0
        out.append(1000.0 * shift * s / (1.0 + (shift - 1.0) * s))
    return out


def allowed_num_frames(frames_per_chunk: int, temporal_factor: int = 4, up_to: int = 4) -> list[int]:
    """The first ``up_to`` video frame counts whose latent frame count is a whole number of chunks."""
    return [temporal_factor * (m * frames_per_chunk - 1) + 1 for m in range(1, up_to + 1)]


def _check_schedule(denoising_timesteps, context_timestep, generator) -> list[float]:
    """The checks of the denoising schedule and its noise generator (before any work); returns the
    timesteps (default :data:`SELF_FORCING_TIMESTEPS`)."""
    timesteps = [
        float(t) for t in (SELF_FORCING_TIMESTEPS if denoising_timesteps is None else denoising_timesteps)
    ]
    if not timesteps or any(not (0.0 <= t <= 1000.0) or math.isnan(t) for t in timesteps):
        raise ValueError(
            f"denoising_timesteps={denoising_timesteps!r} must be a non-empty list of values in [0, 1000]"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator={type(generator).__name__} is not allowed; allowed: one torch.Generator or None "
            "(the noise of every chunk is drawn for the whole batch, in chunk then step order)"
        )
    if not 0.0 <= float(context_timestep) <= 1000.0:
        raise ValueError(f"context_timestep={context_timestep!r} must be in [0, 1000]")
    return timesteps


@contextlib.contextmanager
def _explicit_steps(tracker):
    """The step tracker (or None) marked by the pipeline itself for the call: reset, ``explicit`` set,
    then restored and reset again afterwards (also on error)."""
    if tracker is None:
        yield None
        return
    was_explicit = tracker.explicit
    tracker.reset()
    tracker.explicit = True
    try:
        yield tracker
    finally:
        tracker.explicit = was_explicit
        tracker.reset()


class _ChunkedRun:
    """One call's Self-Forcing loop (module docstring): per chunk the few-step denoising with re-noising,
    then the context pass that writes the clean chunk into the KV cache; classifier-free guidance runs
    the unconditional branch on its own cache. State of this call only."""

    def __init__(
        self,
        transformer,
        prompt_embeds,
        negative_prompt_embeds,
        guidance_scale,
        timesteps,
        context_timestep,
        generator,
    ) -> None:
        self.transformer = transformer
        self.prompt_embeds, self.negative_prompt_embeds = prompt_embeds, negative_prompt_embeds
        self.guidance_scale, self.cfg = guidance_scale, guidance_scale > 1
        self.timesteps, self.context_timestep = timesteps, context_timestep
        self.generator = generator
        self.tracker = None
        self.forwards = 0
        """Transformer forwards so far (both CFG branches counted)."""

    def predict(self, session, x, t) -> torch.Tensor:
        """The flow ``v`` at timestep ``t`` (fp32), guided when ``guidance_scale > 1``."""
        transformer, dtype = self.transformer, self.transformer.dtype
        self.forwards += 2 if self.cfg else 1
        stamp = torch.full((x.shape[0],), float(t), device=transformer.device, dtype=torch.float32)
        session.branch = 0
        flow = transformer(x.to(dtype), stamp, self.prompt_embeds, return_dict=False)[0].float()
        if self.cfg:
            session.branch = 1
            uncond = transformer(x.to(dtype), stamp, self.negative_prompt_embeds, return_dict=False)[
                0
            ].float()
            flow = uncond + self.guidance_scale * (flow - uncond)
        session.branch = 0
        return flow

    def _mark(self, step: int) -> None:
        if self.tracker is not None:
            self.tracker.mark_step(step)

    def denoise(self, session, x) -> torch.Tensor:
        """One chunk's few-step denoising from its noise ``x`` to its clean latents (``x``'s dtype)."""
        timesteps = self.timesteps
        for s, t in enumerate(timesteps):
            session.begin_step(s, t)
            self._mark(s)
            x0 = x.float() - t / 1000.0 * self.predict(session, x, t)
            if s + 1 == len(timesteps):
                return x0.to(x.dtype)
            noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)
            sigma_next = timesteps[s + 1] / 1000.0
            x = ((1.0 - sigma_next) * x0 + sigma_next * noise.float()).to(x.dtype)
        return x

    def generate(self, session, latents, k: int, progress, on_chunk_end) -> torch.Tensor:
        """Every chunk of ``k`` latent frames in order; returns the clean latents (``latents``' shape)."""
        output = torch.empty_like(latents)
        num_chunks = latents.shape[2] // k
        for c in range(num_chunks):
            session.begin_chunk(c)
            x = self.denoise(session, latents[:, :, c * k : (c + 1) * k])
            output[:, :, c * k : (c + 1) * k] = x
            if c + 1 < num_chunks:  # the context pass of the last chunk would be read by nobody
                session.begin_step(len(self.timesteps), self.context_timestep, context=True)
                self._mark(len(self.timesteps))
                self.predict(session, x, self.context_timestep)
            if on_chunk_end is not None:
                on_chunk_end(c, output[:, :, : (c + 1) * k])
            progress.update()
        return output


class CausalWanPipeline(DiffusionPipeline):
    """Self-Forcing autoregressive text-to-video over a plain ``WanTransformer3DModel`` (module docstring).

    Example:
        >>> import torch
        >>> from diffusers.utils import export_to_video
        >>> from fastgen import LightForcingConfig, apply_sparse_attention
        >>> from fastgen.pipelines import CausalWanPipeline, load_self_forcing_checkpoint
        >>> pipe = CausalWanPipeline.from_pretrained(
        ...     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16
        ... )
        >>> load_self_forcing_checkpoint(pipe.transformer, "checkpoints/self_forcing_dmd.pt")
        >>> pipe.to("cuda")
        >>> apply_sparse_attention(pipe.transformer, LightForcingConfig())  # optional: Light Forcing
        >>> video = pipe(prompt="a corgi surfing a wave", generator=torch.Generator().manual_seed(0)).frames[0]
        >>> export_to_video(video, "corgi.mp4", fps=16)
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    # every component is keyword-optional (prompt_embeds + latent output need only the transformer);
    # listing them here also makes from_pretrained load them instead of passing their config entries on
    _optional_components = ["tokenizer", "text_encoder", "vae", "transformer", "scheduler"]
    fastgen_causal = True
    """Marks the chunked causal generation for the adapters (Light Forcing runs here, Rectified SpaAttn not)."""

    def __init__(self, tokenizer=None, text_encoder=None, vae=None, transformer=None, scheduler=None) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8
        from diffusers.video_processor import VideoProcessor

        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.last_generation: dict = {}
        """Facts of the last call: ``chunks``, ``frame_tokens``, ``cache_frames`` (frames one cache holds),
        ``cache_bytes`` (every self-attention K/V cache, all layers and CFG branches), ``forwards``."""

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = 512) -> torch.Tensor:
        """UMT5 embeddings ``[B, max_sequence_length, D]`` of ``prompt``, zero past each prompt's length (as Wan)."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "prompt= needs the pipeline's tokenizer and text_encoder; pass prompt_embeds= instead"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(
            [p.strip() for p in prompts],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)

    # ------------------------------------------------------------------ checks
    def _latent_geometry(self, num_frames: int, height: int, width: int, frames_per_chunk: int):
        temporal, spatial = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        patch = tuple(self.transformer.config.patch_size)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r} must be a positive integer")
        if (num_frames - 1) % temporal:
            raise ValueError(
                f"num_frames={num_frames} is not allowed: num_frames - 1 must be a multiple of {temporal}; "
                f"allowed with num_frames_per_chunk={frames_per_chunk}: "
                f"{', '.join(map(str, allowed_num_frames(frames_per_chunk, temporal)))}, ..."
            )
        latent_frames = (num_frames - 1) // temporal + 1
        if (
            isinstance(frames_per_chunk, bool)
            or not isinstance(frames_per_chunk, int)
            or frames_per_chunk < 1
        ):
            raise ValueError(f"num_frames_per_chunk={frames_per_chunk!r} must be an integer >= 1")
        if latent_frames % frames_per_chunk:
            raise ValueError(
                f"num_frames={num_frames} gives {latent_frames} latent frames, not a whole number of chunks of "
                f"num_frames_per_chunk={frames_per_chunk}; allowed: num_frames in "
                f"{', '.join(map(str, allowed_num_frames(frames_per_chunk, temporal)))}, ... "
                f"(= {temporal} * (m * {frames_per_chunk} - 1) + 1)"
            )
        for name, value, p in (("height", height, patch[1]), ("width", width, patch[2])):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % (spatial * p):
                raise ValueError(
                    f"{name}={value!r} is not allowed; it must be a positive multiple of {spatial * p}"
                )
        return latent_frames, height // spatial, width // spatial

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        num_frames_per_chunk: int = 3,
        denoising_timesteps: list[float] | None = None,
        context_timestep: float = 0,
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        callback_on_chunk_end: Callable[[CausalWanPipeline, int, torch.Tensor], None] | None = None,
        *,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        rope_positions: str = "absolute",
        return_dict: bool = True,
    ):
        """Generate a video chunk by chunk (Self-Forcing).

        Args:
            prompt / prompt_embeds: the text (one of them); ``prompt_embeds`` ``[B, L, text_dim]``.
            negative_prompt / negative_prompt_embeds: the unconditional branch (only with ``guidance_scale > 1``;
                default the empty prompt).
            num_frames, height, width: video size (``num_frames`` must give a whole number of chunks).
            num_frames_per_chunk: latent frames per chunk (3 in Self-Forcing).
            denoising_timesteps: per-chunk timesteps (default :data:`SELF_FORCING_TIMESTEPS`).
            context_timestep: timestep of the cache-writing pass on the clean chunk.
            local_attn_frames: rolling KV window in latent frames (None: every earlier frame is kept).
            sink_frames: first frames pinned in the rolling window.
            latents: initial noise ``[B, C, F, H/8, W/8]`` (F latent frames).
            generator: the re-noising (and, without ``latents``, initial noise) generator.
            output_type: ``"np"``, ``"pt"``, ``"pil"`` or ``"latent"`` (no decoding).
            callback_on_chunk_end: ``fn(pipe, chunk_index, latents_so_far)`` after every chunk, with
                ``latents_so_far`` the clean latents of frames ``[0, end of the chunk)``.
            guidance_scale: classifier-free guidance; off at 1 (Self-Forcing is distilled); above 1 the
                unconditional branch runs with its own KV cache.
            rope_positions: ``"absolute"`` (Self-Forcing: keys cached after RoPE at their absolute frames) or
                ``"window"`` (Light Forcing's long-video config: keys cached without RoPE, rotated on every
                read by their position in the attended window).
            return_dict: return a ``WanPipelineOutput`` (else a tuple).
        """
        from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

        self._check_call(output_type, prompt, prompt_embeds, guidance_scale)
        timesteps = _check_schedule(denoising_timesteps, context_timestep, generator)
        k = num_frames_per_chunk
        geometry = self._latent_geometry(num_frames, height, width, k)  # latent (frames, height, width)
        check_chunking(geometry[0], k, local_attn_frames, sink_frames)
        embeds = self._text_embeddings(
            prompt,
            prompt_embeds,
            negative_prompt,
            negative_prompt_embeds,
            max_sequence_length,
            guidance_scale > 1,
        )
        transformer = self.transformer
        shape = (embeds[0].shape[0], transformer.config.in_channels, *geometry)
        latents = self._initial_latents(latents, shape, generator, transformer.device)
        run = _ChunkedRun(transformer, *embeds, guidance_scale, timesteps, context_timestep, generator)
        window = dict(
            local_attn_frames=local_attn_frames, sink_frames=sink_frames, rope_positions=rope_positions
        )
        output = self._run_chunks(run, latents, k, window, callback_on_chunk_end)

        video = output if output_type == "latent" else self._decode(output, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)

    def _run_chunks(
        self, run: _ChunkedRun, latents, k: int, window: dict, callback_on_chunk_end
    ) -> torch.Tensor:
        """Run every chunk inside the causal session (``window``: its attention-window options) with
        the step tracker marked by the pipeline and a progress bar; records :attr:`last_generation`."""
        transformer = run.transformer
        patch = tuple(transformer.config.patch_size)
        frame_tokens = (latents.shape[3] // patch[1]) * (latents.shape[4] // patch[2])
        batch, num_frames, num_chunks = latents.shape[0], latents.shape[2], latents.shape[2] // k
        on_chunk_end = (
            None if callback_on_chunk_end is None else functools.partial(callback_on_chunk_end, self)
        )
        with _explicit_steps(get_step_tracker(transformer)) as tracker:
            run.tracker = tracker
            with causal_generation(
                transformer,
                batch_size=batch,
                num_frames=num_frames,
                frame_tokens=frame_tokens,
                frames_per_chunk=k,
                **window,
            ) as session:
                with self.progress_bar(total=num_chunks) as progress:
                    output = run.generate(session, latents, k, progress, on_chunk_end)
                self.last_generation = {
                    "chunks": num_chunks,
                    "frame_tokens": frame_tokens,
                    "cache_frames": session.capacity_frames,
                    "cache_bytes": session.cache_bytes(),
                    "forwards": run.forwards,
                }
        return output

    def _check_call(self, output_type, prompt, prompt_embeds, guidance_scale) -> None:
        """The checks of :meth:`__call__` on the components, the output and the text (before any work)."""
        if self.transformer is None:
            raise ValueError("transformer=None: the pipeline needs a WanTransformer3DModel")
        check_causal_wan(self.transformer)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(
                f"output_type={output_type!r} is not allowed; allowed: {', '.join(OUTPUT_TYPES)}"
            )
        if output_type != "latent" and self.vae is None:
            raise ValueError(
                f"output_type={output_type!r} needs the pipeline's vae; use output_type='latent'"
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt= and prompt_embeds=")
        if not is_number(guidance_scale) or guidance_scale < 1:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a number >= 1 (1: no guidance)")

    def _text_embeddings(
        self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, max_sequence_length, cfg: bool
    ):
        """``(prompt_embeds, negative_prompt_embeds)`` on the transformer's device and dtype (the negative
        ones only with guidance; default the empty prompt)."""
        device, model_dtype = self.transformer.device, self.transformer.dtype
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, max_sequence_length)
        prompt_embeds = prompt_embeds.to(device, model_dtype)
        batch = prompt_embeds.shape[0]
        if cfg:
            if negative_prompt_embeds is None:
                negative = negative_prompt if negative_prompt is not None else ""
                negative = [negative] * batch if isinstance(negative, str) else list(negative)
                negative_prompt_embeds = self.encode_prompt(negative, max_sequence_length)
            negative_prompt_embeds = negative_prompt_embeds.to(device, model_dtype)
            if negative_prompt_embeds.shape[0] != batch:
                raise ValueError(
                    f"negative prompt batch {negative_prompt_embeds.shape[0]} does not match the prompt batch {batch}"
                )

        return prompt_embeds, negative_prompt_embeds

    @staticmethod
    def _initial_latents(latents, shape: tuple, generator, device) -> torch.Tensor:
        """The initial noise ``shape`` (drawn on the CPU from ``generator``), or ``latents`` checked against it."""
        if latents is None:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)} do not match the request; expected {shape} "
                "(batch, channels, latent frames, height / 8, width / 8)"
            )
        return latents.to(device)

    def _decode(self, latents: torch.Tensor, output_type: str):
        vae = self.vae
        z = latents.to(vae.device, vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        video = vae.decode(z * std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)


__all__ = [
    "OUTPUT_TYPES",
    "SELF_FORCING_TIMESTEPS",
    "CausalWanPipeline",
    "allowed_num_frames",
    "warp_timesteps",
]
