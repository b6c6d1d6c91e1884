"""Tiny models and inputs several test modules share (tests import shared builders from here, never
from another test module)."""

from __future__ import annotations

import torch
from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline
from fastgen.pipelines.tiny_lm import build_tiny_llama

# ------------------------------------------------------------------ diffusion LMs (Window-Diffusion, Dream)

MASK = 63
VOCAB = 64


def tiny_pipe(family="llada", dtype=torch.float32, kv_heads=None, seed=0):
    """A tiny bidirectional Llama (LLaDA-shaped) or Qwen2 (Dream-shaped, GQA, logit shift)."""
    if family == "dream":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads or 2,
            max_position_embeddings=512,
            pad_token_id=0,
            use_cache=False,
            initializer_range=0.1,
            tie_word_embeddings=False,
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    else:
        model = build_tiny_llama(
            VOCAB, hidden=64, heads=4, kv_heads=kv_heads, layers=2, max_positions=512, seed=seed
        )
    model.config.fastgen_family = family
    model.config.fastgen_mask_token_id = MASK
    return DiffusionLMPipeline(model.to(dtype), mask_token_id=MASK)


def prompts(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 5, 7][:batch]
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, -n:] = torch.randint(4, MASK, (n,), generator=g)
        attn[b, -n:] = 1
    return ids, attn


# ------------------------------------------------------------------ HunyuanVideo

HUNYUAN_GRID = GRID = (3, 6, 11)  # 198 video tokens after 1x2x2 patchify


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(3)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=32,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(8, 12, 12),
    ).eval()


def inputs(text_lengths=(6, 10), timestep=900.0):
    g = torch.Generator().manual_seed(4)
    b = len(text_lengths)
    f, h, w = GRID
    x = torch.randn(b, 4, f, 2 * h, 2 * w, generator=g)
    text = torch.randn(b, 10, 16, generator=g)
    mask = torch.zeros(b, 10, dtype=torch.long)
    for i, n in enumerate(text_lengths):
        mask[i, :n] = 1
    return {
        "hidden_states": x,
        "timestep": torch.full((b,), timestep),
        "encoder_hidden_states": text,
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(b, 8, generator=g),
        "guidance": torch.full((b,), 6000.0),
    }
