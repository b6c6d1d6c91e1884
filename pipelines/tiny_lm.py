"""Tiny diffusion-LM presets built in code (no downloads): the ``tiny-llada`` preset and an
attention-bound Llama for benchmarks.

``tiny-llada`` is a LLaDA-shaped model (a native ``LlamaForCausalLM`` run bidirectionally by
:class:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline`) with seeded random weights and a
character-level tokenizer (printable ASCII plus ``<|pad|>``, ``<|unk|>``, ``<|eos|>`` and the mask token
``<|mdm_mask|>``). Its text is gibberish; it exists to exercise the pipeline and the sparse methods.
"""

from __future__ import annotations

import string

import torch

from .diffusion_lm import DiffusionLMPipeline
from .kv_task import SPECIAL_TOKENS, fast_tokenizer  # the tiny tokenizers' special tokens, in id order

TINY_MASK_TOKEN_ID = SPECIAL_TOKENS.index("<|mdm_mask|>")
"""Mask token id of the tiny tokenizer."""


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over printable ASCII, built in code."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return fast_tokenizer(tok)


def _resolve(device, dtype):
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    layers: int = 2,
    intermediate: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.1,
    attn_implementation: str = "sdpa",
):
    """A ``LlamaForCausalLM`` from a tiny config with weights drawn under ``torch.manual_seed(seed)``.

    ``initializer_range`` 0.1 (instead of transformers' 0.02) gives peaked attention and varied text.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
        initializer_range=initializer_range,
    )
    config._attn_implementation = attn_implementation
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def build_tiny_llada(
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    hidden: int = 64,
    heads: int = 4,
    layers: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
) -> DiffusionLMPipeline:
    """The ``tiny-llada`` preset: a tiny bidirectional Llama + character tokenizer in a diffusion-LM pipeline.

    Example:
        >>> pipe = build_tiny_llada()
        >>> out = pipe(prompt="Hello", gen_length=32, steps=8, block_length=16)
        >>> out.texts[0]
    """
    device, dtype = _resolve(device, dtype)
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(
        len(tokenizer), hidden=hidden, heads=heads, layers=layers, max_positions=max_positions, seed=seed
    )
    model.config.fastgen_mask_token_id = TINY_MASK_TOKEN_ID
    model.config.fastgen_family = "llada"
    model = model.to(device=device, dtype=dtype)
    return DiffusionLMPipeline(model, tokenizer=tokenizer, mask_token_id=TINY_MASK_TOKEN_ID)


def build_attention_bound_llama(
    hidden: int = 512,
    heads: int = 4,
    head_dim: int = 128,
    layers: int = 2,
    *,
    vocab_size: int = 256,
    max_positions: int = 65536,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
) -> DiffusionLMPipeline:
    """A Llama whose cost at long context is dominated by attention (small MLP and vocab), for benchmarks.

    The mask token is the last vocabulary id; there is no tokenizer (call the pipeline with ``input_ids``).
    """
    device, dtype = _resolve(device, dtype)
    model = build_tiny_llama(
        vocab_size,
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        layers=layers,
        intermediate=hidden,
        max_positions=max_positions,
        seed=seed,
    )
    model.config.fastgen_mask_token_id = vocab_size - 1
    model.config.fastgen_family = "llada"
    model = model.to(device=device, dtype=dtype)
    return DiffusionLMPipeline(model, mask_token_id=vocab_size - 1)


__all__ = [
    "SPECIAL_TOKENS",
    "TINY_MASK_TOKEN_ID",
    "build_attention_bound_llama",
    "build_char_tokenizer",
    "build_tiny_llada",
    "build_tiny_llama",
]
