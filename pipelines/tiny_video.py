"""Tiny, randomly initialised video pipelines built from configs in code (no downloads).

``build_tiny_wan`` returns a real diffusers ``WanPipeline``, ``build_tiny_causal_wan`` a
``fastgen.pipelines.CausalWanPipeline`` over the same components, and ``build_tiny_hunyuan`` a real
``HunyuanVideoPipeline``: tiny transformer, tiny VAE, tiny text encoder(s) and a character-level
tokenizer made with the ``tokenizers`` library, scheduler from config. Weights come from a fixed
seed, so two builds are identical. The default video size gives the transformer enough tokens
(about 1.6k for Wan) that block-sparse attention really runs at block size 128.

Each pipeline carries ``fastgen_defaults`` (steps, height, width, frames, guidance_scale) used by
``fastgen.pipelines.video_runner`` when an option is not given.

Example:
    >>> from fastgen.pipelines.tiny_video import build_tiny_wan
    >>> pipe = build_tiny_wan()
    >>> frames = pipe(prompt="a tiny test", num_inference_steps=4, output_type="np").frames[0]
"""

from __future__ import annotations

import string

import torch

WAN_DEFAULTS = {"steps": 8, "height": 128, "width": 160, "frames": 17, "guidance_scale": 5.0}
"""Generation defaults of the tiny Wan preset (latent 5 x 16 x 20 = 1600 video tokens)."""
WAN_LONG_DEFAULTS = {"steps": 4, "height": 128, "width": 160, "frames": 9, "guidance_scale": 5.0}
"""Generation defaults of the attention-bound ``tiny-wan-long`` preset (light VAE: latent 5 x 32 x 40 = 6400
video tokens for a 9 x 128 x 160 video)."""
WAN_LONG_RECTIFIED = {"sparsity": 0.9, "dense_layers": 0, "warmup_steps": 1}
"""Rectified SpaAttn defaults of ``tiny-wan-long``: its 2 layers and 4 steps leave no room for the
real-checkpoint defaults (first layer and first 5 steps dense), so only the first step runs dense."""
CAUSAL_WAN_DEFAULTS = {"height": 128, "width": 128, "frames": 33, "guidance_scale": 1.0, "fps": 16}
"""Generation defaults of the tiny causal Wan preset: 9 latent frames = 3 chunks of 3, 16 x 16 = 256 tokens
per frame (2 blocks of 128), Self-Forcing's 4 denoising steps per chunk."""
HUNYUAN_DEFAULTS = {"steps": 6, "height": 192, "width": 256, "frames": 17, "guidance_scale": 6.0}
"""Generation defaults of the tiny HunyuanVideo preset (latent 5 x 12 x 16 = 960 video tokens)."""

SEED = 20240607
"""Seed of the random weights."""

_SPECIAL = ["<pad>", "</s>", "<unk>", "<s>"]


def char_tokenizer(model_max_length: int = 512, bos: bool = False, padding_side: str = "right"):
    """A character-level ``PreTrainedTokenizerFast`` (printable ASCII), built offline.

    Tokens: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``<s>`` 3, then one per printable character. Every
    encoding ends with ``</s>`` (and starts with ``<s>`` when ``bos``).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(_SPECIAL + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    template = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=template,
        pair=template + " $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=model_max_length,
        padding_side=padding_side,
    )


def _resolve(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype if dtype is not None else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


def tiny_wan_transformer(num_layers: int, in_channels: int = 16):
    """The tiny ``WanTransformer3DModel`` of the Wan presets (2 heads x 32, 1x1 patches), drawn from the current
    torch seed; ``in_channels`` 36 for image-to-video (noisy latent 16 + frame mask 4 + first-frame latent 16)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 1, 1),  # 1x1 patches: many tokens for a small (cheap to decode) video
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=64,
        ffn_dim=128,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    ).eval()


def build_tiny_wan(device=None, dtype=None, num_layers: int = 3, light_vae: bool = False):
    """A ``WanPipeline`` with a tiny ``WanTransformer3DModel`` (2 heads x 32, ``num_layers`` blocks, 1x1x1 patches).

    Args:
        device: where the pipeline lives (default CPU).
        dtype: transformer dtype (default float32); the VAE and text encoder stay float32.
        num_layers: transformer blocks.
        light_vae: a VAE with 4x spatial / 2x temporal compression instead of Wan's 8x / 4x, so a video
            of many transformer tokens has 8x fewer pixels to decode.
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    device, dtype = _resolve(device, dtype)
    tokenizer = char_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(SEED + 1)
    if light_vae:
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=16,
            dim_mult=[1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            scale_factor_temporal=2,
            scale_factor_spatial=4,
        ).eval()
    else:
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()
    torch.manual_seed(SEED + 2)
    transformer = tiny_wan_transformer(num_layers)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.to(device)
    if dtype != torch.float32:
        pipe.transformer.to(dtype)
    pipe.fastgen_defaults = dict(WAN_DEFAULTS)
    return pipe


def build_tiny_wan_long(device=None, dtype=None, num_layers: int = 2):
    """The ``tiny-wan-long`` preset: the tiny Wan with a light VAE at 9x128x160 (6400 tokens), where
    attention is the cost.

    The transformer has the weights of :func:`build_tiny_wan` (fewer blocks); the VAE compresses less, so
    the transformer sees many tokens while the video stays cheap to decode, and dense attention takes
    most of the time on a CPU: sparse attention shows its speed-up.
    """
    pipe = build_tiny_wan(device=device, dtype=dtype, num_layers=num_layers, light_vae=True)
    pipe.fastgen_defaults = dict(WAN_LONG_DEFAULTS)
    pipe.fastgen_rectified = dict(WAN_LONG_RECTIFIED)
    return pipe


def build_tiny_causal_wan(device=None, dtype=None, num_layers: int = 3):
    """A ``fastgen.pipelines.CausalWanPipeline`` over the components of :func:`build_tiny_wan` (same weights)."""
    from .causal_wan import CausalWanPipeline

    wan = build_tiny_wan(device=device, dtype=dtype, num_layers=num_layers)
    pipe = CausalWanPipeline(
        tokenizer=wan.tokenizer,
        text_encoder=wan.text_encoder,
        vae=wan.vae,
        transformer=wan.transformer,
        scheduler=wan.scheduler,
    )
    pipe.fastgen_defaults = dict(CAUSAL_WAN_DEFAULTS)
    return pipe


def build_tiny_hunyuan(device=None, dtype=None, num_layers: int = 2, num_single_layers: int = 2):
    """A ``HunyuanVideoPipeline`` with a tiny transformer (2 heads x 32), tiny Llama and CLIP text encoders."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    device, dtype = _resolve(device, dtype)
    tokenizer = char_tokenizer(model_max_length=256, bos=True)
    tokenizer_2 = char_tokenizer(model_max_length=77, bos=True)
    torch.manual_seed(SEED)
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=3,
            eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(SEED + 3)
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            max_position_embeddings=77,
            pad_token_id=0,
            bos_token_id=3,
            eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(SEED + 1)
    vae = _tiny_hunyuan_vae()
    torch.manual_seed(SEED + 2)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=32,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(8, 12, 12),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    pipe.to(device)
    if dtype != torch.float32:
        pipe.transformer.to(dtype)
    pipe.fastgen_defaults = dict(HUNYUAN_DEFAULTS)
    return pipe


def _tiny_hunyuan_vae():
    """The tiny HunyuanVideo VAE (4 latent channels, 8 channels per level; weights from the current seed)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()


__all__ = [
    "CAUSAL_WAN_DEFAULTS",
    "HUNYUAN_DEFAULTS",
    "WAN_DEFAULTS",
    "WAN_LONG_DEFAULTS",
    "WAN_LONG_RECTIFIED",
    "build_tiny_causal_wan",
    "build_tiny_hunyuan",
    "build_tiny_wan",
    "build_tiny_wan_long",
    "char_tokenizer",
    "tiny_wan_transformer",
]
