"""Self-Forcing checkpoint loading: small ``.pt`` files written in the ORIGINAL Wan layout (names and shapes
stated here from Wan's own model definition, not from the loader's table), EMA fp32 vs plain bf16, errors."""

from __future__ import annotations

import logging

import pytest
import torch

from fastgen.pipelines import load_self_forcing_checkpoint

DIM, HEADS, FFN, TEXT, FREQ, CH, LAYERS = 48, 2, 40, 16, 32, 4, 2
PATCH = (1, 2, 2)


def tiny_wan(ffn_dim: int = FFN, layers: int = LAYERS):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=PATCH,
        num_attention_heads=HEADS,
        attention_head_dim=DIM // HEADS,
        in_channels=CH,
        out_channels=CH,
        text_dim=TEXT,
        freq_dim=FREQ,
        ffn_dim=ffn_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def original_layout(
    layers: int = LAYERS, *, dim=DIM, ffn=FFN, text=TEXT, freq=FREQ, ch=CH, patch=PATCH
) -> dict[str, tuple[int, ...]]:
    """Original Wan 2.1 (``wan/modules/model.py``) parameter names and shapes of a T2V WanModel."""
    DIM, FFN, TEXT, FREQ, CH, PATCH = dim, ffn, text, freq, ch, patch  # noqa: N806
    shapes = {
        "patch_embedding.weight": (DIM, CH, *PATCH),
        "patch_embedding.bias": (DIM,),
        "text_embedding.0.weight": (DIM, TEXT),  # Linear, GELU, Linear
        "text_embedding.0.bias": (DIM,),
        "text_embedding.2.weight": (DIM, DIM),
        "text_embedding.2.bias": (DIM,),
        "time_embedding.0.weight": (DIM, FREQ),  # Linear, SiLU, Linear
        "time_embedding.0.bias": (DIM,),
        "time_embedding.2.weight": (DIM, DIM),
        "time_embedding.2.bias": (DIM,),
        "time_projection.1.weight": (6 * DIM, DIM),  # SiLU, Linear
        "time_projection.1.bias": (6 * DIM,),
        "head.head.weight": (CH * PATCH[0] * PATCH[1] * PATCH[2], DIM),
        "head.head.bias": (CH * PATCH[0] * PATCH[1] * PATCH[2],),
        "head.modulation": (1, 2, DIM),
    }
    for i in range(layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}{attn}.{proj}.weight"] = (DIM, DIM)
                shapes[f"{b}{attn}.{proj}.bias"] = (DIM,)
            shapes[f"{b}{attn}.norm_q.weight"] = (DIM,)
            shapes[f"{b}{attn}.norm_k.weight"] = (DIM,)
        shapes[f"{b}norm3.weight"] = (DIM,)  # the cross-attention norm (affine with cross_attn_norm)
        shapes[f"{b}norm3.bias"] = (DIM,)
        shapes[f"{b}ffn.0.weight"] = (FFN, DIM)
        shapes[f"{b}ffn.0.bias"] = (FFN,)
        shapes[f"{b}ffn.2.weight"] = (DIM, FFN)
        shapes[f"{b}ffn.2.bias"] = (DIM,)
        shapes[f"{b}modulation"] = (1, 6, DIM)
    return shapes


def where_in_diffusers(model, original: str) -> torch.Tensor:
    """The diffusers parameter that must hold an original tensor (stated per name, independently)."""
    pairs = {
        "patch_embedding": model.patch_embedding,
        "text_embedding.0": model.condition_embedder.text_embedder.linear_1,
        "text_embedding.2": model.condition_embedder.text_embedder.linear_2,
        "time_embedding.0": model.condition_embedder.time_embedder.linear_1,
        "time_embedding.2": model.condition_embedder.time_embedder.linear_2,
        "time_projection.1": model.condition_embedder.time_proj,
        "head.head": model.proj_out,
    }
    if original == "head.modulation":
        return model.scale_shift_table
    if original.startswith("blocks."):
        _, i, rest = original.split(".", 2)
        block = model.blocks[int(i)]
        if rest == "modulation":
            return block.scale_shift_table
        module_path, param = rest.rsplit(".", 1)
        modules = {
            "norm3": block.norm2,
            "ffn.0": block.ffn.net[0].proj,
            "ffn.2": block.ffn.net[2],
        }
        for attn, target in (("self_attn", block.attn1), ("cross_attn", block.attn2)):
            modules.update(
                {
                    f"{attn}.q": target.to_q,
                    f"{attn}.k": target.to_k,
                    f"{attn}.v": target.to_v,
                    f"{attn}.o": target.to_out[0],
                    f"{attn}.norm_q": target.norm_q,
                    f"{attn}.norm_k": target.norm_k,
                }
            )
        return getattr(modules[module_path], param)
    module_path, param = original.rsplit(".", 1)
    return getattr(pairs[module_path], param)


def write_checkpoint(path, *, ema=True, plain=True, layers=LAYERS, edit=None):
    g = torch.Generator().manual_seed(1)
    data = {"step": 600}
    if plain:
        data["generator"] = {
            "model." + k: torch.randn(s, generator=g).to(torch.bfloat16)
            for k, s in original_layout(layers).items()
        }
    if ema:
        data["generator_ema"] = {
            "model." + k: torch.randn(s, generator=g) for k, s in original_layout(layers).items()
        }
    if edit is not None:
        edit(data)
    torch.save(data, path)
    return data


def test_layout_has_one_tensor_per_diffusers_parameter():
    model = tiny_wan()
    assert len(original_layout()) == len(model.state_dict()) == 15 + 27 * LAYERS


@pytest.mark.parametrize("use_ema", [True, False])
def test_loads_every_tensor_in_place(tmp_path, use_ema):
    path = tmp_path / "self_forcing_dmd.pt"
    data = write_checkpoint(path)
    model = tiny_wan()
    params_before = {n: p for n, p in model.named_parameters()}
    out = load_self_forcing_checkpoint(model, path, use_ema=use_ema)
    assert out is model
    assert all(p is params_before[n] for n, p in model.named_parameters())  # in place
    source = data["generator_ema" if use_ema else "generator"]
    for name, tensor in source.items():
        target = where_in_diffusers(model, name[len("model.") :])
        assert target.dtype == torch.float32
        assert torch.equal(target, tensor.float()), name


def test_ema_missing_falls_back_to_generator_with_a_warning(tmp_path, caplog):
    path = tmp_path / "early.pt"
    data = write_checkpoint(path, ema=False)
    model = tiny_wan()
    with caplog.at_level(logging.WARNING):
        load_self_forcing_checkpoint(model, path)
    assert "no generator_ema" in caplog.text
    assert torch.equal(model.proj_out.weight, data["generator"]["model.head.head.weight"].float())


def test_bf16_transformer_keeps_its_fp32_modules(tmp_path):
    path = tmp_path / "ckpt.pt"
    data = write_checkpoint(path)
    model = tiny_wan().to(torch.bfloat16)
    load_self_forcing_checkpoint(model, path)
    want = data["generator_ema"]["model.blocks.1.ffn.2.weight"].to(torch.bfloat16)
    assert torch.equal(model.blocks[1].ffn.net[2].weight, want)


def _drop(name):
    def edit(data):
        del data["generator_ema"][name]

    return edit


def _add(name):
    def edit(data):
        data["generator_ema"][name] = torch.zeros(3)

    return edit


@pytest.mark.parametrize(
    ("kwargs", "model_kwargs", "match"),
    [
        ({"edit": _drop("model.blocks.1.norm3.bias")}, {}, r"missing keys.*blocks\.1\.norm2\.bias"),
        ({"edit": _add("model.blocks.0.extra.weight")}, {}, r"unexpected keys.*blocks\.0\.extra\.weight"),
        ({"edit": _add("blocks.0.self_attn.q.weight")}, {}, "without the 'model.' prefix"),
        ({}, {"ffn_dim": 24}, r"shapes differ, wrong config.*ffn_dim=24"),
        ({}, {"layers": 1}, r"unexpected keys.*blocks\.1\..*num_layers=1"),
        ({"ema": False, "plain": False}, {}, "neither 'generator_ema' nor 'generator'.*found: step"),
    ],
    ids=["missing", "unexpected", "unprefixed", "wrong-shape", "wrong-layers", "no-generator"],
)
def test_bad_checkpoints(tmp_path, kwargs, model_kwargs, match):
    path = tmp_path / "bad.pt"
    write_checkpoint(path, **kwargs)
    model = tiny_wan(**model_kwargs)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_self_forcing_checkpoint(model, path)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing half-loaded


def test_not_a_wan_or_not_a_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path)
    with pytest.raises(ValueError, match="transformer=Linear is not supported"):
        load_self_forcing_checkpoint(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="is not a file"):
        load_self_forcing_checkpoint(tiny_wan(), tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        load_self_forcing_checkpoint(tiny_wan(), tmp_path / "list.pt")


def test_cli_generate_with_a_self_forcing_checkpoint(tmp_path, capsys):
    """``fastgen generate --model <Wan folder> --self-forcing-checkpoint <file> --method dense``."""
    from fastgen.pipelines.tiny_video import build_tiny_wan

    from fastgen.cli import main

    wan = build_tiny_wan(num_layers=1)  # patch 1, 2 heads x 32, ffn 128, text 32, freq 64, 16 channels
    wan.save_pretrained(tmp_path / "wan")
    layout = original_layout(1, dim=64, ffn=128, text=32, freq=64, ch=16, patch=(1, 1, 1))
    g = torch.Generator().manual_seed(4)
    weights = {"model." + k: 0.05 * torch.randn(s, generator=g) for k, s in layout.items()}
    torch.save({"generator_ema": weights}, tmp_path / "sf.pt")
    out = tmp_path / "video.mp4"
    args = [
        "generate",
        "--model",
        str(tmp_path / "wan"),
        "--self-forcing-checkpoint",
        str(tmp_path / "sf.pt"),
    ]
    size = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu"]
    assert main([*args, *size, "--method", "dense", "--prompt", "a kite", "--out", str(out)]) == 0
    assert out.exists() and "(dense)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main([*args, *size, "--method", "rectified", "--prompt", "a kite"])
    assert err.value.code == 2 and "not allowed for a causal Wan" in capsys.readouterr().err


def test_real_1p3b_layout_maps_825_tensors_one_to_one():
    """Wan2.1-T2V-1.3B (30 layers, dim 1536, 12 heads, ffn 8960, text 4096, freq 256), on the meta device."""
    from diffusers import WanTransformer3DModel
    from fastgen.pipelines.self_forcing import convert_state_dict

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
        layout = original_layout(30, dim=1536, ffn=8960, text=4096, freq=256, ch=16, patch=(1, 2, 2))
        state = {"model." + k: torch.empty(s) for k, s in layout.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in convert_state_dict(state).items()}
    assert len(layout) == 825 and converted == expected
