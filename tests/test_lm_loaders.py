"""Tests of the LLaDA / Dream checkpoint loaders on tiny checkpoints written in the official layouts."""

from __future__ import annotations

import json

import pytest
import torch
from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline
from fastgen.pipelines.lm_loaders import detect_family, llada_key, load_diffusion_lm
from fastgen.pipelines.tiny_lm import build_char_tokenizer, build_tiny_llama
from safetensors.torch import save_file

LLAMA_TO_LLADA = {
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ff_norm",
}


def to_llada_name(name: str) -> str:
    top = {
        "model.embed_tokens.weight": "model.transformer.wte.weight",
        "model.norm.weight": "model.transformer.ln_f.weight",
        "lm_head.weight": "model.transformer.ff_out.weight",
    }
    if name in top:
        return top[name]
    _, _, layer, rest = name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"model.transformer.blocks.{layer}.{LLAMA_TO_LLADA[part]}.{kind}"


def llada_config(llama) -> dict:
    """config.json in LLaDA's format for the tiny Llama ``llama``."""
    c = llama.config
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": c.hidden_size,
        "embedding_size": c.vocab_size,
        "vocab_size": c.vocab_size,
        "include_bias": False,
        "include_qkv_bias": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": 3,
        "max_sequence_length": c.max_position_embeddings,
        "mlp_hidden_size": c.intermediate_size,
        "mlp_ratio": 4,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "n_layers": c.num_hidden_layers,
        "rms_norm_eps": c.rms_norm_eps,
        "rope": True,
        "rope_theta": c.rope_parameters["rope_theta"],
        "scale_logits": False,
        "weight_tying": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def write_checkpoint(folder, config: dict, state: dict, shards: int = 1) -> None:
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


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny_llama(
        101, hidden=32, heads=4, kv_heads=2, layers=2, intermediate=48, max_positions=128, seed=3
    )


def logits_of(model, ids):
    n = ids.shape[1]
    mask = torch.zeros(ids.shape[0], 1, n, n)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(n)[None]).logits


@pytest.mark.parametrize("shards", [1, 3])
def test_llada_checkpoint_loads_into_native_llama(tmp_path, tiny_llama, shards):
    state = {to_llada_name(k): v for k, v in tiny_llama.state_dict().items()}
    assert "model.transformer.blocks.1.ff_proj.weight" in state
    write_checkpoint(tmp_path / "llada", llada_config(tiny_llama), state, shards=shards)
    build_char_tokenizer().save_pretrained(str(tmp_path / "llada"))
    model, tokenizer, mask_id = load_diffusion_lm(str(tmp_path / "llada"), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and mask_id == 3
    assert tokenizer is not None and tokenizer.decode(tokenizer("hi")["input_ids"]) == "hi"
    ids = torch.randint(4, 100, (2, 13))
    torch.testing.assert_close(logits_of(model, ids), logits_of(tiny_llama, ids), rtol=0, atol=0)
    pipe = DiffusionLMPipeline(model, tokenizer)
    assert pipe.mask_token_id == 3
    out = pipe(prompt="ab", gen_length=8, steps=2, block_length=8, progress=False)
    assert not (out.sequences == 3).any()


def test_llada_gate_and_up_are_not_swapped(tmp_path, tiny_llama):
    state = {to_llada_name(k): v for k, v in tiny_llama.state_dict().items()}
    swapped = dict(state)
    for i in range(2):
        gate, up = (
            f"model.transformer.blocks.{i}.ff_proj.weight",
            f"model.transformer.blocks.{i}.up_proj.weight",
        )
        swapped[gate], swapped[up] = state[up], state[gate]
    write_checkpoint(tmp_path / "swapped", llada_config(tiny_llama), swapped)
    model, _, _ = load_diffusion_lm(str(tmp_path / "swapped"), device="cpu")
    ids = torch.randint(4, 100, (1, 9))
    assert not torch.allclose(logits_of(model, ids), logits_of(tiny_llama, ids))


def test_dream_checkpoint_loads_into_native_qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(5)
    qwen = Qwen2ForCausalLM(config).eval()
    dream_config = {
        "architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": 97, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "rope_scaling": None, "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
        "mask_token_id": 96, "pad_token_id": 95, "bos_token_id": 94, "eos_token_id": 93,
    }  # fmt: skip
    write_checkpoint(tmp_path / "dream", dream_config, qwen.state_dict(), shards=2)
    model, tokenizer, mask_id = load_diffusion_lm(str(tmp_path / "dream"), device="cpu")
    assert type(model).__name__ == "Qwen2ForCausalLM" and mask_id == 96 and tokenizer is None
    ids = torch.randint(0, 90, (2, 11))
    torch.testing.assert_close(logits_of(model, ids), logits_of(qwen, ids), rtol=0, atol=0)
    pipe = DiffusionLMPipeline(model)
    assert pipe.mask_token_id == 96
    out = pipe(input_ids=ids[:1], gen_length=4, steps=2, block_length=4, progress=False)
    assert out.sequences.shape == (1, 15)


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
    from fastgen.pipelines.lm_loaders import load_diffusion_lm

    with pytest.raises(ValueError, match="dtype='float64' is not allowed"):
        load_diffusion_lm(str(tmp_path), device="cpu", dtype="float64")
