"""Load diffusion-LM checkpoints (LLaDA-8B Base / Instruct / 1.5, Dream-v0-7B Base / Instruct) into
transformers' NATIVE ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, without the checkpoints' remote code.

- LLaDA (``model_type`` ``"llada"``, architecture ``LLaDAModelLM``) is a Llama block without the causal
  mask: its OLMo-style config (``d_model``, ``n_heads``, ``n_layers``, ``mlp_hidden_size``...) becomes a
  ``LlamaConfig`` and its weights (``model.transformer.blocks.{i}.q_proj`` ...) are renamed. In LLaDA's
  block ``x = ff_out(act(ff_proj(x)) * up_proj(x))``, so ``ff_proj`` is the gate and ``up_proj`` the up
  projection.
- Dream (``model_type`` ``"Dream"``, architecture ``DreamModel``) has Qwen2's layout and key names; its
  config becomes a ``Qwen2Config``.

The returned model is marked (``config.fastgen_family``, ``config.fastgen_mask_token_id``) so
:class:`~fastgen.pipelines.diffusion_lm.DiffusionLMPipeline` finds the mask id and Dream's logit shift.
The checkpoint's own modelling code runs only with ``trust_remote_code=True``.

Example:
    >>> model, tokenizer, mask_id = load_diffusion_lm("GSAI-ML/LLaDA-8B-Instruct", device="cuda")
    >>> pipe = DiffusionLMPipeline(model, tokenizer, mask_id)
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from fastgen.pipelines.lm_family import detect_family

logger = logging.getLogger(__name__)

LLADA_MASK_TOKEN_ID = 126336
"""LLaDA's mask token id (``<|mdm_mask|>``)."""

DREAM_MASK_TOKEN_ID = 151666
"""Dream's mask token id (``<|mask|>``)."""

_LLADA_BLOCK_KEYS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
_LLADA_TOP_KEYS = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_LLADA_BLOCK = re.compile(r"^model\.transformer\.blocks\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def llada_key(name: str) -> str:
    """The native Llama name of a LLaDA weight ``name``; ``ValueError`` for an unknown key."""
    if name in _LLADA_TOP_KEYS:
        return _LLADA_TOP_KEYS[name]
    match = _LLADA_BLOCK.match(name)
    if match is None or match.group(2) not in _LLADA_BLOCK_KEYS:
        raise ValueError(
            f"LLaDA weight {name!r} has no Llama equivalent; supported: block_type='llama' checkpoints "
            "(q_proj/k_proj/v_proj/attn_out/ff_proj/up_proj/ff_out/attn_norm/ff_norm)"
        )
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LLADA_BLOCK_KEYS[part]}.{kind}"


def _check_llada_config(config: dict) -> None:
    expected = {
        "block_type": ("llama",),
        "layer_norm_type": ("rms",),
        "activation_type": ("silu", "swiglu"),
        "alibi": (False,),
        "rope": (True,),
        "attention_layer_norm": (False,),
        "scale_logits": (False,),
        "input_emb_norm": (False,),
        "bias_for_layer_norm": (False, None),
        "layer_norm_with_affine": (True,),
    }
    for field, allowed in expected.items():
        if field in config and config[field] not in allowed:
            raise ValueError(
                f"LLaDA config {field}={config[field]!r} is not supported by the native Llama loader; "
                f"allowed: {allowed} (use trust_remote_code=True for other variants)"
            )


def llada_to_llama_config(config: dict):
    """A ``LlamaConfig`` equivalent to LLaDA's ``config.json`` contents (a dict)."""
    from transformers import LlamaConfig

    _check_llada_config(config)
    d_model, n_heads = config["d_model"], config["n_heads"]
    kv_heads = 1 if config.get("multi_query_attention") else (config.get("n_kv_heads") or n_heads)
    include_bias = bool(config.get("include_bias", False))
    llama = LlamaConfig(
        vocab_size=config.get("embedding_size") or config["vocab_size"],
        hidden_size=d_model,
        intermediate_size=config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d_model,
        num_hidden_layers=config["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=kv_heads,
        head_dim=d_model // n_heads,
        hidden_act="silu",
        max_position_embeddings=config.get("max_sequence_length", 4096),
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))},
        attention_bias=include_bias or bool(config.get("include_qkv_bias", False)),
        mlp_bias=include_bias,
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        pad_token_id=config.get("pad_token_id"),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        use_cache=False,
    )
    llama.fastgen_family = "llada"
    llama.fastgen_mask_token_id = int(config.get("mask_token_id") or LLADA_MASK_TOKEN_ID)
    return llama


def dream_to_qwen2_config(config: dict):
    """A ``Qwen2Config`` equivalent to Dream's ``config.json`` contents (a dict)."""
    from transformers import Qwen2Config

    names = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "attention_dropout",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    )
    kwargs = {n: config[n] for n in names if n in config}
    rope = dict(config.get("rope_scaling") or {}) or {"rope_type": "default"}
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = float(config.get("rope_theta", 10000.0))
    qwen = Qwen2Config(**kwargs, rope_parameters=rope, use_cache=False)
    qwen.fastgen_family = "dream"
    qwen.fastgen_mask_token_id = int(config.get("mask_token_id") or DREAM_MASK_TOKEN_ID)
    return qwen


def safetensors_files(folder: str) -> list[str]:
    """The safetensors shards of a checkpoint folder (from ``model.safetensors.index.json`` or a single file)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {folder!r}")


def _resolve_folder(name_or_path: str, trust_remote_code: bool) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
    if trust_remote_code:
        patterns.append("*.py")
    return snapshot_download(name_or_path, allow_patterns=patterns)


class _ExpectedModelTypeNotice(logging.Filter):
    """Drops transformers' "You are using a model of type `llada`/`Dream` to instantiate a model of
    type ``" notice: ``AutoTokenizer`` reads the checkpoint's config with the base config class, and
    for a family this loader has already recognised the mismatch is expected, not a warning."""

    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.marker = f"You are using a model of type `{model_type}` to instantiate a model of type ``."

    def filter(self, record: logging.LogRecord) -> bool:
        return self.marker not in record.getMessage()


def _load_tokenizer(folder: str, family: str | None, trust_remote_code: bool, model_type: str | None = None):
    from transformers import AutoTokenizer

    if not any(
        os.path.exists(os.path.join(folder, f))
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        logger.warning("no tokenizer files in %s; the pipeline will need input_ids", folder)
        return None
    notice = _ExpectedModelTypeNotice(str(model_type)) if family is not None and model_type else None
    config_logger = logging.getLogger("transformers.configuration_utils")
    try:
        if notice is not None:
            config_logger.addFilter(notice)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - fall back to the plain tokenizer class of the family
        if family == "dream":
            from transformers import Qwen2Tokenizer

            logger.info("loading Dream's tokenizer as Qwen2Tokenizer (%s)", err)
            return Qwen2Tokenizer.from_pretrained(folder)
        logger.warning("could not load the tokenizer of %s: %s", folder, err)
        return None
    finally:
        if notice is not None:
            config_logger.removeFilter(notice)


def _build_native(config, state_dict_items, device: torch.device, dtype: torch.dtype):
    """Instantiate the native model of ``config`` on the meta device and assign the loaded weights."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cls = LlamaForCausalLM if config.model_type == "llama" else Qwen2ForCausalLM
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = cls(config)
    state = {}
    for name, tensor in state_dict_items:
        state[name] = tensor.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if config.model_type == "llama" and config.attention_bias:
        # LLaDA's include_qkv_bias has no o_proj bias; Llama's attention_bias has one: it is zero
        for i in range(config.num_hidden_layers):
            key = f"model.layers.{i}.self_attn.o_proj.bias"
            if key not in state:
                state[key] = torch.zeros(config.hidden_size, device=device, dtype=dtype)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (RoPE frequencies) are rebuilt on the real device
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"weights left unloaded: {meta[:5]}")
    return model.eval()


def _rope_theta_in_use(model) -> float | None:
    """The RoPE base the built model actually uses, read back from its rotary table (None if unknown)."""
    config = model.config
    params = getattr(config, "rope_parameters", None) or {}
    declared = params.get("rope_theta", getattr(config, "rope_theta", None))
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if params.get("rope_type", "default") != "default" or inv_freq is None or inv_freq.numel() < 2:
        return None if declared is None else float(declared)
    head_dim = 2 * inv_freq.numel()  # inv_freq[i] = theta ** (-2 i / head_dim)
    return float(inv_freq[1].double() ** (-head_dim / 2))


def check_loaded_model(model, *, rope_theta: float, dtype: torch.dtype) -> None:
    """Refuse a loaded model whose RoPE base or dtype is not what the checkpoint asked for.

    Older transformers releases ignore ``rope_parameters=`` (theta silently falls back to 10000) and
    ``dtype=``; this turns that into a ``RuntimeError`` naming the installed version.
    """
    import transformers

    used = _rope_theta_in_use(model)
    if used is None or abs(used - rope_theta) > 1e-3 * rope_theta:
        raise RuntimeError(
            f"loaded {type(model).__name__} uses rope_theta={used} but the checkpoint's config.json says "
            f"rope_theta={rope_theta}; transformers {transformers.__version__} did not apply it "
            "(fastgen needs transformers >= 5.0)"
        )
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {dtype}:
        raise RuntimeError(
            f"loaded {type(model).__name__} has parameter dtypes {sorted(map(str, dtypes))}, asked for "
            f"{dtype}; transformers {transformers.__version__} did not apply dtype= (fastgen needs >= 5.0)"
        )


def load_diffusion_lm(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
):
    """Load a LLaDA or Dream checkpoint (hub id or local folder) as ``(model, tokenizer, mask_token_id)``.

    Without ``trust_remote_code`` the model is transformers' native ``LlamaForCausalLM`` (LLaDA) or
    ``Qwen2ForCausalLM`` (Dream); with it, the checkpoint's own classes through ``AutoModel``. ``dtype``
    defaults to float32 on CPU and bfloat16 elsewhere. The tokenizer is ``None`` if the folder has none.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        allowed = ("float32", "bfloat16", "float16")
        if dtype not in allowed:
            raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {', '.join(allowed)}")
        dtype = getattr(torch, dtype)
    folder = _resolve_folder(name_or_path, trust_remote_code)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"name_or_path={name_or_path!r} has no config.json")
    with open(config_path) as f:
        raw = json.load(f)
    family = detect_family(raw)
    tokenizer = _load_tokenizer(folder, family, trust_remote_code, raw.get("model_type"))

    if trust_remote_code:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
        default = {"llada": LLADA_MASK_TOKEN_ID, "dream": DREAM_MASK_TOKEN_ID}.get(family)
        mask_token_id = raw.get("mask_token_id") or default
        if mask_token_id is None:
            raise ValueError(f"name_or_path={name_or_path!r}: cannot tell the mask token id of this model")
        model.config.fastgen_mask_token_id = int(mask_token_id)
        if {p.dtype for p in model.parameters()} != {dtype}:  # its own code may keep some in fp32
            logger.warning("remote-code model %s loaded with dtypes other than %s", name_or_path, dtype)
        if family is not None:
            model.config.fastgen_family = family
        return model, tokenizer, int(mask_token_id)

    from safetensors import safe_open

    def tensors(rename):
        for path in safetensors_files(folder):
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield rename(key), f.get_tensor(key)

    if family == "llada":
        config = llada_to_llama_config(raw)
        model = _build_native(config, tensors(llada_key), device, dtype)
    elif family == "dream":
        config = dream_to_qwen2_config(raw)
        model = _build_native(config, tensors(lambda k: k), device, dtype)
    else:
        raise ValueError(
            f"name_or_path={name_or_path!r} is not a LLaDA or Dream checkpoint (model_type="
            f"{raw.get('model_type')!r}); pass trust_remote_code=True to load it with its own code"
        )
    check_loaded_model(model, rope_theta=float(raw.get("rope_theta", 10000.0)), dtype=dtype)
    logger.info("loaded %s as native %s", name_or_path, type(model).__name__)
    return model, tokenizer, config.fastgen_mask_token_id


__all__ = [
    "DREAM_MASK_TOKEN_ID",
    "check_loaded_model",
    "LLADA_MASK_TOKEN_ID",
    "detect_family",
    "dream_to_qwen2_config",
    "llada_key",
    "llada_to_llama_config",
    "load_diffusion_lm",
    "safetensors_files",
]
