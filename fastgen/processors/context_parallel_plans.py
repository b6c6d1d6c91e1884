"""Turning on diffusers' context parallelism for the models fastgen serves, with the guards it needs.

:func:`enable_context_parallel` is the library call behind ``fastgen generate/batch
--context-parallel ulysses|ring|unified`` (under ``torchrun``): it builds diffusers'
``ContextParallelConfig`` and calls ``transformer.enable_parallelism`` with the model's plan:

- Wan: diffusers' own ``WanTransformer3DModel._cp_plan``.
- HunyuanVideo: diffusers ships none; :data:`HUNYUAN_VIDEO_CP_PLAN` splits the video tokens and the
  (padded) text tokens separately at the first block, so rank r holds ``[V_r; T_r]``, and the RoPE
  table along with the video. After Ulysses' exchange the sequence is ``[V_0, T_0, V_1, T_1, ...]``
  while the model builds its padding mask in ``[V; T]`` order: a :class:`HunyuanMaskOrderHook` on
  every joint attention module puts the mask in the exchanged order for diffusers' processors
  (without it the output is wrong as soon as the text padding is longer than one rank's text
  share); fastgen's processors take the mask as built and put q/k/v in ``[V; T]`` order instead
  (:mod:`fastgen.processors.context_parallel`).

Checks made before any work (one clear error each): mode and degrees, heads divisible by the Ulysses
degree, no accelerator (diffusers 0.42 divides by ``torch.accelerator.device_count()``), HunyuanVideo
I2V's ``token_replace`` (it splits the full sequence at the first frame), and at every forward a
:class:`ContextParallelGuardHook` refuses a latent (or text) whose token count the context-parallel size
does not divide (diffusers' own check is a bare assertion deep in its sharder).
"""

from __future__ import annotations

import logging
import math

import torch

from .context_parallel import MODES, context_parallel_layout, interleaved_order

logger = logging.getLogger(__name__)

GUARD_HOOK = "fastgen_context_parallel_guard"
"""Name of the token-share guard hook in the model's diffusers ``HookRegistry``."""
MASK_HOOK = "fastgen_hunyuan_mask_order"
"""Name of the mask-order hook in each HunyuanVideo joint attention module's ``HookRegistry``."""


def hunyuan_video_cp_plan(model) -> dict:
    """diffusers context-parallel plan for ``HunyuanVideoTransformer3DModel``: the RoPE table (2-D
    ``[Sv, D]`` cos and sin) split on tokens, video and text split at the first block, output
    gathered after ``proj_out``."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    first = "transformer_blocks.0" if len(model.transformer_blocks) else "single_transformer_blocks.0"
    return {
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        first: {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def _model_hook_base():
    from diffusers.hooks import ModelHook

    return ModelHook


class HunyuanMaskOrderHook(_model_hook_base()):
    """Pre-forward hook of a HunyuanVideo joint attention module under context parallelism: the
    model's ``[B, 1, 1, Sv+St]`` key mask in ``[V; T]`` order becomes the exchanged order
    ``[V_0, T_0, V_1, T_1, ...]`` for diffusers' processors; left as built for fastgen's (which
    reorder q/k/v instead)."""

    def __init__(self, parallel_config) -> None:
        super().__init__()
        self.world = context_parallel_layout(parallel_config).world
        """Context-parallel size P (from the config's mesh)."""
        self._order: dict[tuple, torch.Tensor] = {}

    def pre_forward(self, module, *args, **kwargs):
        """Reorder ``attention_mask`` unless the module's processor is fastgen's."""
        from .rectified_base import RectifiedProcessorBase

        mask = kwargs.get("attention_mask")
        hidden, text = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
        if (
            mask is None
            or text is None
            or hidden is None
            or isinstance(module.processor, RectifiedProcessorBase)
        ):
            return args, kwargs
        world = self.world
        n_video, n_text = hidden.shape[1] * world, text.shape[1] * world
        if mask.shape[-1] != n_video + n_text:
            return args, kwargs
        key = (n_video, n_text, world, mask.device)
        if key not in self._order:
            self._order[key] = interleaved_order(n_video, n_text, world, mask.device)
        kwargs["attention_mask"] = mask.index_select(-1, self._order[key])
        return args, kwargs


class ContextParallelGuardHook(_model_hook_base()):
    """Model pre-forward hook under context parallelism, before diffusers shards anything:

    - a clear ``ValueError`` when the context-parallel size does not divide the call's video tokens
      (and, for HunyuanVideo, its text tokens), and for a 2-D timestep that is not per token (a
      per-frame ``[B, F]`` timestep would be split along frames by Wan's plan);
    - a processor set on a block's attention after ``enable_parallelism`` (``set_attn_processor`` by
      hand) would attend within the rank's token share only: it is given the model's parallel
      config, with a log line."""

    def __init__(self, world: int, parallel_config=None, attention_modules=()) -> None:
        super().__init__()
        self.world = world
        """Context-parallel size P."""
        self.parallel_config = parallel_config
        """diffusers ``ParallelConfig`` of the model."""
        self.attention_modules = list(attention_modules)
        """The blocks' attention modules whose processors must see ``parallel_config``."""

    def pre_forward(self, module, *args, **kwargs):
        """Check the token counts of this call and the processors' parallel config."""
        from fastgen.tracking import video_grid

        hidden = kwargs.get("hidden_states", args[0] if args else None)
        grid = video_grid(module, hidden)
        if grid is not None and math.prod(grid) % self.world:
            raise ValueError(
                f"context parallelism: the latent grid {grid} has {math.prod(grid)} tokens, not divisible by "
                f"the context-parallel size {self.world}; allowed: frames/height/width whose token count "
                f"is a multiple of {self.world}"
            )
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if (
            grid is not None
            and isinstance(timestep, torch.Tensor)
            and timestep.ndim == 2
            and timestep.shape[1] != math.prod(grid)
        ):
            raise ValueError(
                f"context parallelism: a timestep of shape {tuple(timestep.shape)} (per frame?) would be split "
                f"along dim 1 by diffusers' plan; allowed: [B] or per token [B, {math.prod(grid)}]"
            )
        text = kwargs.get("encoder_hidden_states")
        if _is_hunyuan(module) and isinstance(text, torch.Tensor) and text.shape[1] % self.world:
            raise ValueError(
                f"context parallelism: {text.shape[1]} text tokens are not divisible by the context-parallel "
                f"size {self.world}; allowed: a text length (max_sequence_length) that is a multiple of it"
            )
        for attn in self.attention_modules:
            processor = attn.processor
            if getattr(processor, "_parallel_config", self.parallel_config) is None:
                processor._parallel_config = self.parallel_config
                logger.info(
                    "fastgen: %s was set after enable_parallelism; it now has the model's parallel config",
                    type(processor).__name__,
                )
        return args, kwargs


def _is_hunyuan(model) -> bool:
    from diffusers import HunyuanVideoTransformer3DModel

    return isinstance(model, HunyuanVideoTransformer3DModel)


def _is_wan(model) -> bool:
    from diffusers import WanTransformer3DModel

    return isinstance(model, WanTransformer3DModel)


def degrees(mode: str, degree: int, heads: int, ulysses_degree: int | None = None) -> tuple[int, int]:
    """``(ulysses_degree, ring_degree)`` for ``mode`` over ``degree`` ranks and a model of ``heads``
    heads; unified without ``ulysses_degree`` takes the largest proper divisor of ``degree`` that
    divides ``heads``. A ``ValueError`` names what is not allowed."""
    if mode not in MODES:
        raise ValueError(f"context parallel mode={mode!r} is not supported; allowed: {', '.join(MODES)}")
    if not isinstance(degree, int) or degree < 2:
        raise ValueError(f"context parallel degree={degree!r} is not allowed; allowed: an integer >= 2")
    if mode == "ring":
        return 1, degree
    if mode == "ulysses":
        u = degree
    elif ulysses_degree is not None:
        u = ulysses_degree
        if not isinstance(u, int) or u < 2 or degree % u or u == degree:
            raise ValueError(
                f"ulysses_degree={u!r} is not allowed for unified over {degree} ranks; allowed: a divisor of "
                f"{degree} in [2, {degree // 2}]"
            )
    else:
        options = [d for d in range(degree - 1, 1, -1) if degree % d == 0 and heads % d == 0]
        if not options:
            raise ValueError(
                f"context parallel mode='unified' over {degree} ranks: no Ulysses degree in [2, {degree // 2}] "
                f"divides both {degree} and the {heads} heads; allowed: mode='ring'"
            )
        u = options[0]
    if heads % u:
        raise ValueError(
            f"context parallelism: {heads} attention heads are not divisible by ulysses_degree={u}; allowed: "
            f"a Ulysses degree that divides {heads} (or mode='ring' / 'unified')"
        )
    return u, degree // u


def enable_context_parallel(
    target,
    mode: str = "ulysses",
    degree: int | None = None,
    *,
    ulysses_degree: int | None = None,
    mesh=None,
) -> list:
    """Turn on diffusers' context parallelism on a pipeline's transformer(s) (or one transformer).

    Args:
        target: a diffusers pipeline (its ``transformer`` and ``transformer_2``) or a Wan /
            HunyuanVideo transformer. fastgen's sparse attention may be applied before or after.
        mode: ``"ulysses"`` (heads exchanged for tokens; sparse methods run), ``"ring"`` (K/V
            all-gathered; dense) or ``"unified"`` (both).
        degree: ranks per video (default: the world size, or the size of ``mesh``).
        ulysses_degree: Ulysses part of ``"unified"`` (default: the largest proper divisor of
            ``degree`` that divides the head count).
        mesh: an existing 2-D DeviceMesh with dims ``("ring", "ulysses")`` (a slice of a larger mesh
            when data parallelism runs over groups of ranks); default: diffusers builds one over all ranks.

    Returns the diffusers ``ParallelConfig`` of each model. ``torch.distributed`` must be initialised.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from fastgen.api import is_pipeline, pipeline_transformers

    models = pipeline_transformers(target) if is_pipeline(target) else [target]
    if not models or not all(_is_wan(m) or _is_hunyuan(m) for m in models):
        names = ", ".join(type(m).__name__ for m in models) or type(target).__name__
        raise ValueError(
            f"enable_context_parallel: {names} is not supported; allowed: WanTransformer3DModel, "
            "HunyuanVideoTransformer3DModel (or a pipeline holding them)"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "enable_context_parallel: torch.distributed is not initialised (run under torchrun)"
        )
    if torch.accelerator.device_count() == 0:
        raise RuntimeError(
            "enable_context_parallel: no accelerator is visible; diffusers' context parallelism needs one "
            "device per rank (it divides by torch.accelerator.device_count())"
        )
    if degree is None:
        degree = mesh.size() if mesh is not None else dist.get_world_size()
    if mesh is None and degree != dist.get_world_size():
        raise ValueError(
            f"context parallel degree={degree} differs from the world size {dist.get_world_size()}; allowed: "
            "the world size, or pass mesh= (a ('ring', 'ulysses') slice of a larger mesh)"
        )
    plans = []
    for model in models:
        heads = int(model.config.num_attention_heads)
        u, r = degrees(mode, degree, heads, ulysses_degree)
        if _is_hunyuan(model) and getattr(model.config, "image_condition_type", None) == "token_replace":
            raise ValueError(
                "context parallelism: HunyuanVideo image_condition_type='token_replace' (I2V) splits the full "
                "sequence at the first frame; allowed: text-to-video (image_condition_type=None)"
            )
        plans.append((model, u, r))
    configs = []
    for model, u, r in plans:
        config = ContextParallelConfig(ulysses_degree=u, ring_degree=r, mesh=mesh)
        plan = hunyuan_video_cp_plan(model) if _is_hunyuan(model) else None
        model.enable_parallelism(config=config, cp_plan=plan)
        _install_hooks(model, u * r)
        configs.append(model._parallel_config)
        logger.info("fastgen: context parallelism on %s: ulysses=%d ring=%d", type(model).__name__, u, r)
    return configs


def _install_hooks(model, world: int) -> None:
    from diffusers.hooks import HookRegistry

    if _is_hunyuan(model):
        attention = [b.attn for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    else:
        attention = [m for b in model.blocks for m in (b.attn1, b.attn2)]
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook(GUARD_HOOK) is None:
        registry.register_hook(ContextParallelGuardHook(world, model._parallel_config, attention), GUARD_HOOK)
    if not _is_hunyuan(model):
        return
    for attn in attention:
        attn_registry = HookRegistry.check_if_exists_or_initialize(attn)
        if attn_registry.get_hook(MASK_HOOK) is None:
            attn_registry.register_hook(HunyuanMaskOrderHook(model._parallel_config), MASK_HOOK)


__all__ = [
    "GUARD_HOOK",
    "ContextParallelGuardHook",
    "MASK_HOOK",
    "HunyuanMaskOrderHook",
    "degrees",
    "enable_context_parallel",
    "hunyuan_video_cp_plan",
]
