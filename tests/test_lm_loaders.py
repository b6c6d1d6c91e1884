"""Tests of the LLaDA / Dream checkpoint loaders on tiny checkpoints written in the official layouts.

The checkpoints are written from an independent statement of the published layouts, never from the
loader's own rename table: the parameter names of LLaDA's ``modeling_llada.py`` (``LLaDAModelLM`` ->
``model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj,
up_proj, ff_out}, ln_f, ff_out}``) with the fields of its published ``config.json``, and Dream's
Qwen2 names (``model.layers.N.self_attn.q_proj`` with q/k/v biases ...). The loaded model is compared
with a plain-PyTorch forward written here from the same statement (pre-norm RMS blocks, half-split
RoPE with ``theta ** (-2i / d)``, bidirectional GQA attention, ``ff_out(silu(ff_proj(x)) * up_proj(x))``).
"""

from __future__ import annotations

import json

import pytest
import torch
from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline
from fastgen.pipelines.lm_loaders import detect_family, llada_key, load_diffusion_lm
from fastgen.pipelines.tiny_lm import build_char_tokenizer
from safetensors.torch import save_file

# geometry of the tiny checkpoints (GQA: 4 query heads over 2 KV heads, head_dim 8)
VOCAB, D_MODEL, HEADS, KV_HEADS, LAYERS, MLP = 101, 32, 4, 2, 2, 48
HEAD_DIM = D_MODEL // HEADS


def llada_published_config(**overrides) -> dict:
    """LLaDA-8B's config.json (as published with GSAI-ML/LLaDA-8B-Base) at tiny sizes."""
    config = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": D_MODEL,
        "embedding_dropout": 0.0, "embedding_size": VOCAB, "eos_token_id": 2, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": 3, "max_sequence_length": 128,
        "mlp_hidden_size": MLP, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS, "pad_token_id": 0,
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
        "transformers_version": "4.46.3", "use_cache": False, "vocab_size": VOCAB, "weight_tying": False,
    }  # fmt: skip
    config.update(overrides)
    return config


def dream_published_config(**overrides) -> dict:
    """Dream-v0-Base-7B's config.json (as published with Dream-org/Dream-v0-Base-7B) at tiny sizes."""
    config = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0, "bos_token_id": 94, "eos_token_id": 93,
        "hidden_act": "silu", "hidden_size": D_MODEL, "initializer_range": 0.02, "intermediate_size": MLP,
        "mask_token_id": 96, "max_position_embeddings": 128, "max_window_layers": LAYERS, "model_type": "Dream",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "pad_token_id": 95, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
    }  # fmt: skip
    config.update(overrides)
    return config


def _rand(*shape, scale=0.2, gen):
    return torch.randn(*shape, generator=gen) * scale


def llada_published_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LLaDA's own parameter names and shapes (``LLaDALlamaBlock``)."""
    gen = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * HEAD_DIM
    w = {"model.transformer.wte.weight": _rand(VOCAB, D_MODEL, scale=1.0, gen=gen)}
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        w[p + "attn_norm.weight"] = 1 + _rand(D_MODEL, gen=gen)
        w[p + "q_proj.weight"] = _rand(D_MODEL, D_MODEL, gen=gen)
        w[p + "k_proj.weight"] = _rand(kv, D_MODEL, gen=gen)
        w[p + "v_proj.weight"] = _rand(kv, D_MODEL, gen=gen)
        w[p + "attn_out.weight"] = _rand(D_MODEL, D_MODEL, gen=gen)
        w[p + "ff_norm.weight"] = 1 + _rand(D_MODEL, gen=gen)
        w[p + "ff_proj.weight"] = _rand(MLP, D_MODEL, gen=gen)
        w[p + "up_proj.weight"] = _rand(MLP, D_MODEL, gen=gen)
        w[p + "ff_out.weight"] = _rand(D_MODEL, MLP, gen=gen)
    w["model.transformer.ln_f.weight"] = 1 + _rand(D_MODEL, gen=gen)
    w["model.transformer.ff_out.weight"] = _rand(VOCAB, D_MODEL, gen=gen)
    return w


def dream_published_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Dream's (Qwen2) parameter names: q/k/v projections carry biases."""
    gen = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * HEAD_DIM
    w = {"model.embed_tokens.weight": _rand(VOCAB, D_MODEL, scale=1.0, gen=gen)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + _rand(D_MODEL, gen=gen)
        for name, rows in (("q_proj", D_MODEL), ("k_proj", kv), ("v_proj", kv)):
            w[p + f"self_attn.{name}.weight"] = _rand(rows, D_MODEL, gen=gen)
            w[p + f"self_attn.{name}.bias"] = _rand(rows, gen=gen)
        w[p + "self_attn.o_proj.weight"] = _rand(D_MODEL, D_MODEL, gen=gen)
        w[p + "post_attention_layernorm.weight"] = 1 + _rand(D_MODEL, gen=gen)
        w[p + "mlp.gate_proj.weight"] = _rand(MLP, D_MODEL, gen=gen)
        w[p + "mlp.up_proj.weight"] = _rand(MLP, D_MODEL, gen=gen)
        w[p + "mlp.down_proj.weight"] = _rand(D_MODEL, MLP, gen=gen)
    w["model.norm.weight"] = 1 + _rand(D_MODEL, gen=gen)
    w["lm_head.weight"] = _rand(VOCAB, D_MODEL, gen=gen)
    return w


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, theta):
    """Half-split rotary embedding of ``x`` ``[B, H, N, hd]`` at positions 0..N-1."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


def reference_logits(ids, w, *, names: dict, theta: float, eps: float) -> torch.Tensor:
    """Bidirectional pre-norm transformer in fp64 from the weights ``w`` named by ``names``."""
    w = {k: v.double() for k, v in w.items()}
    b, n = ids.shape
    x = w[names["embed"]][ids]
    for i in range(LAYERS):
        layer = {part: t for part, t in w.items() if part.startswith(names["block"].format(i=i, part=""))}

        def get(part, layer=layer, i=i):
            return layer.get(names["block"].format(i=i, part=part))

        h = _rms(x, get(names["attn_norm"]), eps)

        def proj(part, heads, h=h, get=get):
            y = h @ get(names[part] + ".weight").T
            bias = get(names[part] + ".bias")
            y = y if bias is None else y + bias
            return y.view(b, n, heads, HEAD_DIM).transpose(1, 2)

        q, k, v = proj("q", HEADS), proj("k", KV_HEADS), proj("v", KV_HEADS)
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM**0.5, -1) @ v
        x = x + att.transpose(1, 2).reshape(b, n, D_MODEL) @ get(names["o"] + ".weight").T
        h = _rms(x, get(names["ff_norm"]), eps)
        gate, up = h @ get(names["gate"] + ".weight").T, h @ get(names["up"] + ".weight").T
        x = x + (torch.nn.functional.silu(gate) * up) @ get(names["down"] + ".weight").T
    return _rms(x, w[names["final_norm"]], eps) @ w[names["head"]].T


LLADA_NAMES = {
    "embed": "model.transformer.wte.weight", "block": "model.transformer.blocks.{i}.{part}",
    "attn_norm": "attn_norm.weight", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
    "ff_norm": "ff_norm.weight", "gate": "ff_proj", "up": "up_proj", "down": "ff_out",
    "final_norm": "model.transformer.ln_f.weight", "head": "model.transformer.ff_out.weight",
}  # fmt: skip
DREAM_NAMES = {
    "embed": "model.embed_tokens.weight", "block": "model.layers.{i}.{part}",
    "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
    "v": "self_attn.v_proj", "o": "self_attn.o_proj", "ff_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "final_norm": "model.norm.weight", "head": "lm_head.weight",
}  # fmt: skip


def write_checkpoint(folder, config: dict, state: dict, shards: int = 1) -> None:
    """Write ``config.json`` and ``state`` as one safetensors file or ``shards`` indexed shards."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def logits_of(model, ids):
    n = ids.shape[1]
    mask = torch.zeros(ids.shape[0], 1, n, n)  # additive: every key visible (bidirectional)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(n)[None]).logits


def assert_matches_reference(model, weights, names, theta, eps):
    ids = torch.randint(4, VOCAB - 6, (2, 13), generator=torch.Generator().manual_seed(1))
    got = logits_of(model, ids).double()
    want = reference_logits(ids, weights, names=names, theta=theta, eps=eps)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    # the bound is tight enough to see a wrong RoPE base (transformers < 5 silently used 10000)
    wrong_theta = reference_logits(ids, weights, names=names, theta=10000.0, eps=eps)
    assert (wrong_theta - want).abs().max().item() > 1e-3 * scale


@pytest.mark.parametrize("shards", [1, 3])
def test_llada_checkpoint_loads_into_native_llama(tmp_path, shards):
    weights = llada_published_weights(seed=3)
    write_checkpoint(tmp_path / "llada", llada_published_config(), weights, shards=shards)
    build_char_tokenizer().save_pretrained(str(tmp_path / "llada"))
    model, tokenizer, mask_id = load_diffusion_lm(str(tmp_path / "llada"), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and mask_id == 3
    assert model.config.fastgen_family == "llada"
    assert tokenizer is not None and tokenizer.decode(tokenizer("hi")["input_ids"]) == "hi"
    assert_matches_reference(model, weights, LLADA_NAMES, theta=500000.0, eps=1e-5)
    pipe = DiffusionLMPipeline(model, tokenizer)
    assert pipe.mask_token_id == 3
    out = pipe(prompt="ab", gen_length=8, steps=2, block_length=8, progress=False)
    assert not (out.sequences == 3).any()


def test_llada_gate_and_up_are_not_swapped(tmp_path):
    """ff_proj is the gate (inside silu), up_proj the plain branch: swapping them must be seen."""
    weights = llada_published_weights(seed=3)
    swapped = dict(weights)
    for i in range(LAYERS):
        gate, up = (f"model.transformer.blocks.{i}.{p}.weight" for p in ("ff_proj", "up_proj"))
        swapped[gate], swapped[up] = weights[up], weights[gate]
    write_checkpoint(tmp_path / "swapped", llada_published_config(), swapped)
    model, _, _ = load_diffusion_lm(str(tmp_path / "swapped"), device="cpu")
    with pytest.raises(AssertionError):
        assert_matches_reference(model, weights, LLADA_NAMES, theta=500000.0, eps=1e-5)


def test_dream_checkpoint_loads_into_native_qwen2(tmp_path):
    weights = dream_published_weights(seed=5)
    write_checkpoint(tmp_path / "dream", dream_published_config(), weights, shards=2)
    model, tokenizer, mask_id = load_diffusion_lm(str(tmp_path / "dream"), device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and mask_id == 96 and tokenizer is None
    assert model.config.fastgen_family == "dream"
    assert_matches_reference(model, weights, DREAM_NAMES, theta=1e6, eps=1e-6)
    pipe = DiffusionLMPipeline(model)
    assert pipe.mask_token_id == 96
    ids = torch.randint(0, 90, (1, 11))
    out = pipe(input_ids=ids, gen_length=4, steps=2, block_length=4, progress=False)
    assert out.sequences.shape == (1, 15)


def test_loaded_dtype_is_the_one_asked_for(tmp_path):
    write_checkpoint(tmp_path / "dream", dream_published_config(), dream_published_weights())
    model, _, _ = load_diffusion_lm(str(tmp_path / "dream"), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_loader_refuses_a_config_whose_rope_theta_was_ignored(tmp_path, monkeypatch):
    """Older transformers drop ``rope_parameters=`` and fall back to theta 10000 without a word: the
    loader reads back what the built model uses and refuses it."""
    from transformers import LlamaConfig

    from fastgen.pipelines import lm_loaders

    real = lm_loaders.llada_to_llama_config

    def ignoring_rope(raw):
        config = real(raw)
        fresh = LlamaConfig(**{**config.to_dict(), "rope_parameters": None})  # theta back to default
        fresh.fastgen_family, fresh.fastgen_mask_token_id = (
            config.fastgen_family,
            config.fastgen_mask_token_id,
        )
        return fresh

    monkeypatch.setattr(lm_loaders, "llada_to_llama_config", ignoring_rope)
    write_checkpoint(tmp_path / "llada", llada_published_config(), llada_published_weights())
    with pytest.raises(RuntimeError, match="rope_theta"):
        load_diffusion_lm(str(tmp_path / "llada"), device="cpu")


def test_family_detection_and_errors(tmp_path):
    assert detect_family({"model_type": "LLaDA"}) == "llada"
    assert detect_family({"architectures": ["LLaDAModelLM"]}) == "llada"
    assert detect_family({"model_type": "Dream", "architectures": ["DreamModel"]}) == "dream"
    assert detect_family({"model_type": "gpt2"}) is None
    assert llada_key("model.transformer.blocks.7.ff_out.weight") == "model.layers.7.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="att_proj"):
        llada_key("model.transformer.blocks.0.att_proj.weight")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_diffusion_lm(str(tmp_path / "gpt"), device="cpu")
    bad = {"model_type": "llada", "block_type": "sequential", "d_model": 8, "n_heads": 2, "n_layers": 1}
    (tmp_path / "seq").mkdir()
    (tmp_path / "seq" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="block_type"):
        load_diffusion_lm(str(tmp_path / "seq"), device="cpu")


def test_string_dtype_is_checked(tmp_path):
    with pytest.raises(ValueError, match="dtype='float64' is not allowed"):
        load_diffusion_lm(str(tmp_path), device="cpu", dtype="float64")
