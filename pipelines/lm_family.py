"""Which diffusion LM a model is: its family (LLaDA, Dream or neither), its vocabulary size and its mask
token id, read from the model's config (the one family detector of the loaders and the pipeline)."""

from __future__ import annotations

KNOWN_MASK_TOKEN_IDS = {"llada": 126336, "dream": 151666}
"""Mask token id per model family (LLaDA-8B / LLaDA-1.5: 126336; Dream-v0-7B: 151666)."""


def detect_family(config) -> str | None:
    """``"llada"``, ``"dream"`` or ``None`` from a config (a ``config.json`` dict or a model config object):
    ``fastgen_family`` if set, else ``model_type``, else an architecture name that starts with the
    family's name. The one family detector (the loaders and the pipeline both use it)."""

    def read(name):
        return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

    family = read("fastgen_family")
    if family:
        return str(family).lower()
    model_type = str(read("model_type") or "").lower()
    architectures = [str(a).lower() for a in (read("architectures") or [])]
    for name in ("llada", "dream"):
        if model_type == name or any(a.startswith(name) for a in architectures):
            return name
    return None


def model_family(model) -> str | None:
    """``"llada"``, ``"dream"`` or ``None`` from the model config (:func:`detect_family`)."""
    config = getattr(model, "config", None)
    return None if config is None else detect_family(config)


def vocabulary_size(model) -> int | None:
    """Tokens the model embeds (``config.vocab_size``, else its input embedding rows; None if unknown)."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(value, int):
        return value
    embeddings = getattr(model, "get_input_embeddings", None)
    try:
        table = embeddings() if callable(embeddings) else None
    except (AttributeError, NotImplementedError):
        table = None
    return getattr(table, "num_embeddings", None)


def resolve_mask_token_id(model, tokenizer=None) -> int:
    """The mask token id: ``config.fastgen_mask_token_id``, ``config.mask_token_id``, the family default,
    or the tokenizer's mask token; ``ValueError`` if none is known."""
    config = getattr(model, "config", None)
    for name in ("fastgen_mask_token_id", "mask_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    family = model_family(model)
    if family in KNOWN_MASK_TOKEN_IDS:
        return KNOWN_MASK_TOKEN_IDS[family]
    value = getattr(tokenizer, "mask_token_id", None)
    if isinstance(value, int):
        return value
    raise ValueError(
        f"mask_token_id=None and it cannot be inferred for model={type(model).__name__}; pass the id of the "
        f"mask token (known families: {KNOWN_MASK_TOKEN_IDS})"
    )


__all__ = [
    "KNOWN_MASK_TOKEN_IDS",
    "detect_family",
    "model_family",
    "resolve_mask_token_id",
    "vocabulary_size",
]
