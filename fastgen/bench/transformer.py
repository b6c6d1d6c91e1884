"""Speed benchmark of Rectified SpaAttn inside a real (tiny, attention-bound) diffusers video transformer.

One forward pass of a 2-block transformer with 12 heads x head_dim 128 over a latent grid of
9 x 30 x 52 = 14,040 video tokens (patch 1x2x2), in the same run, fp32, ``torch.no_grad``. The
model is ``WanTransformer3DModel`` (``--model wan``, 512 text tokens of cross-attention) or
``HunyuanVideoTransformer3DModel`` (``--model hunyuan``: one double- and one single-stream block,
MLP ratio 1, joint attention over the video and 256 text tokens of which 56 are padding). Variants:

- ``dense``: the model as diffusers builds it (its own attention processors);
- ``fastgen_dense``: fastgen's processors with every layer dense (``dense_layers=layers``): the same
  attention as ``dense``, with fastgen's leaner QK-norm / RoPE around it;
- ``sparse``: Rectified SpaAttn on every layer and step (``dense_layers=0, warmup_steps=0``);
- ``no_self_attention``: fastgen's processors with self-attention (HunyuanVideo: the joint
  attention) skipped, its value input passed on: everything in the forward except that attention.

After a warm-up, ``repeats`` rounds in which they take turns (so load changes on a shared machine
hit all of them); the best of each is kept and the median of the per-round ratios is reported too.
``speedup`` is sparse against ``dense`` (what a user switching processors gets);
``speedup_from_sparsity`` is sparse against ``fastgen_dense`` (what the sparse attention alone
gives), and ``fraction_of_ideal`` compares that with Amdahl's ideal: the self-attention part of
``fastgen_dense`` (its time minus ``no_self_attention``'s) sped up by 1 / kept block fraction, the
rest unchanged. Also the relative L2 error of the output against ``dense``. The latent is smooth (upsampled noise) so the attention is not uniform. Random weights:
a speed test, not a quality one.

Run: ``python -m fastgen.bench.transformer [--model hunyuan]`` (a few minutes on a CPU; the time is shared with
anything else running on the machine, so compare ratios from one run only).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch
import torch.nn.functional as F

from fastgen.bench._timing import time_call, timed
from fastgen.processors.hunyuan_video import HunyuanVideoRectifiedProcessor
from fastgen.processors.wan import WanRectifiedProcessor

logger = logging.getLogger(__name__)


class _WanWithoutSelfAttention(WanRectifiedProcessor):
    """fastgen's Wan processor with self-attention skipped (its value input is passed on)."""

    def _self_attention(self, attn, query, key, value, rotary_emb):
        return value


class _HunyuanWithoutJointAttention(HunyuanVideoRectifiedProcessor):
    """fastgen's HunyuanVideo processor with the joint attention skipped (its value input is passed on)."""

    def _joint_attention(self, attn, query, key, value, attention_mask, n_text, rotary):
        return value


def _latent(grid: tuple[int, int, int], g: torch.Generator) -> torch.Tensor:
    """Smooth ``[1, 16, f, 2h, 2w]`` latent (upsampled noise plus a little fine noise)."""
    f, h, w = grid
    coarse = torch.randn(1, 16, f, max(1, h // 4), max(1, w // 4), generator=g)
    latent = F.interpolate(coarse, size=(f, 2 * h, 2 * w), mode="trilinear", align_corners=False)
    return latent + 0.1 * torch.randn(latent.shape, generator=g)


def _wan(grid, heads, head_dim, layers):
    """Model, forward kwargs, the names of its sparse processors, and the skipping processor class."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=256,
        ffn_dim=heads * head_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    ).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = {
        "hidden_states": _latent(grid, g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 512, 64, generator=g),
    }
    names = [f"blocks.{i}.attn1.processor" for i in range(layers)]
    return model, kwargs, names, _WanWithoutSelfAttention


def _hunyuan(grid, heads, head_dim, layers):
    """As :func:`_wan`, for HunyuanVideo (``layers // 2`` double- and the rest single-stream blocks)."""
    from diffusers import HunyuanVideoTransformer3DModel

    from fastgen.processors.hunyuan_video import _target_names

    torch.manual_seed(0)
    axes = head_dim // 8 * 2  # frame axis; height and width share the rest (even sizes)
    model = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers // 2,
        num_single_layers=layers - layers // 2,
        num_refiner_layers=1,
        mlp_ratio=1.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=64,
        pooled_projection_dim=32,
        rope_axes_dim=(axes, (head_dim - axes) // 2, (head_dim - axes) // 2),
    ).eval()
    g = torch.Generator().manual_seed(1)
    text_mask = torch.zeros(1, 256, dtype=torch.long)
    text_mask[:, :200] = 1
    kwargs = {
        "hidden_states": _latent(grid, g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 256, 64, generator=g),
        "encoder_attention_mask": text_mask,
        "pooled_projections": torch.randn(1, 32, generator=g),
        "guidance": torch.tensor([6000.0]),
    }
    return model, kwargs, _target_names(model), _HunyuanWithoutJointAttention


MODELS = {"wan": _wan, "hunyuan": _hunyuan}


def _variant_runs(model, kwargs: dict, sparse_names, skipping, config, all_dense) -> tuple:
    """The four forwards the bench times: plain, Rectified SpaAttn (``config``, with its statistics), fastgen's
    processors all dense (``all_dense``) and without self-attention (a fresh ``skipping(all_dense)`` processor
    in the ``sparse_names``)."""
    from fastgen import apply_sparse_attention, record_attention_stats, remove_sparse_attention
    from fastgen.processors.rectified_base import collect_stats

    def forward():
        with torch.no_grad():
            return model(**kwargs, return_dict=False)[0]

    def no_self_attention():
        saved = dict(model.attn_processors)
        skip = skipping(all_dense)
        model.set_attn_processor(
            {name: skip if name in sparse_names else proc for name, proc in saved.items()}
        )
        try:
            return forward()
        finally:
            model.set_attn_processor(saved)

    def with_processors(cfg):
        def run():
            apply_sparse_attention(model, cfg)
            record_attention_stats(model, "summary")  # statistics are opt-in; the bench reads them
            try:
                return forward(), collect_stats(model)
            finally:
                remove_sparse_attention(model)

        return run

    return forward, with_processors(config), with_processors(all_dense), no_self_attention


def _timed_turns(forward, sparse_forward, fastgen_dense_forward, no_self_attention, repeats: int) -> tuple:
    """The variants take turns, so a change of load on the machine hits all of them: the times of plain, fastgen
    dense, sparse and no-self-attention forwards per turn, the last plain output and sparse ``(output, stats)``."""
    dense_t, fastgen_dense_t, sparse_t, rest_t = [], [], [], []
    for _ in range(repeats):
        dense_out, t = timed(forward)
        dense_t.append(t)
        fastgen_dense_t.append(time_call(fastgen_dense_forward))
        sparse, t = timed(sparse_forward)
        sparse_t.append(t)
        rest_t.append(time_call(no_self_attention))
    return dense_t, fastgen_dense_t, sparse_t, rest_t, dense_out, sparse


def run_transformer_bench(
    model: str = "wan",
    grid: tuple[int, int, int] = (9, 30, 52),
    heads: int = 12,
    head_dim: int = 128,
    layers: int = 2,
    sparsity: float = 0.85,
    block_size: int = 128,
    form: str = "exact",
    repeats: int = 3,
    device: str | None = None,
) -> dict:
    """Dense vs Rectified SpaAttn forward of a tiny Wan or HunyuanVideo transformer (``model``);
    returns a dict of times, ratios and errors."""
    from fastgen import RectifiedSpaAttnConfig

    if model not in MODELS:
        raise ValueError(f"model={model!r} is not allowed; allowed: {', '.join(map(repr, MODELS))}")
    family = model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, kwargs, sparse_names, skipping = MODELS[family](grid, heads, head_dim, layers)
    model = model.to(device)
    kwargs = {key: value.to(device) for key, value in kwargs.items()}

    config = RectifiedSpaAttnConfig(
        sparsity=sparsity, block_size=block_size, dense_layers=0, warmup_steps=0, form=form, min_tokens=0
    )
    all_dense = RectifiedSpaAttnConfig(dense_layers=layers, min_tokens=0)
    runs = _variant_runs(model, kwargs, sparse_names, skipping, config, all_dense)
    for run in runs:  # warm-up (caches, the kernel's build)
        run()
    dense_t, fastgen_dense_t, sparse_t, rest_t, dense_out, (sparse_out, rows) = _timed_turns(*runs, repeats)
    dense_s, fastgen_dense_s, sparse_s, rest_s = (
        min(dense_t),
        min(fastgen_dense_t),
        min(sparse_t),
        min(rest_t),
    )
    density = sum(r["density"] for r in rows) / len(rows) if rows else 1.0  # no sparse call: dense
    speedup = dense_s / sparse_s
    from_sparsity = fastgen_dense_s / sparse_s
    share = min(1.0, max(0.0, 1.0 - rest_s / fastgen_dense_s))
    ideal = 1.0 / ((1.0 - share) + share * density)  # attention at 1/density, the rest unchanged
    rel_l2 = float((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm())
    return {
        "model": family,
        "tokens": grid[0] * grid[1] * grid[2],
        "grid": list(grid),
        "heads": heads,
        "head_dim": head_dim,
        "layers": layers,
        "sparsity": sparsity,
        "block_size": block_size,
        "form": form,
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "dense_seconds": dense_s,
        "fastgen_dense_seconds": fastgen_dense_s,
        "sparse_seconds": sparse_s,
        "no_self_attention_seconds": rest_s,
        "speedup": speedup,
        "median_speedup": statistics.median(d / s for d, s in zip(dense_t, sparse_t)),
        "speedup_from_sparsity": from_sparsity,
        "median_speedup_from_sparsity": statistics.median(d / s for d, s in zip(fastgen_dense_t, sparse_t)),
        "density": density,
        "compensated_fraction": sum(r["compensated_fraction"] for r in rows) / max(1, len(rows)),
        "attention_share_of_fastgen_dense": share,
        "ideal_speedup_from_sparsity": ideal,
        "fraction_of_ideal": from_sparsity / ideal,
        "rel_l2_error": rel_l2,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmark and print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="wan", help="transformer family (default wan)")
    p.add_argument("--sparsity", type=float, default=0.85, help="fraction of key blocks dropped")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block")
    p.add_argument("--form", default="exact", help="exact | paper | none")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed rounds of the variants in turn, after a warm-up (best is kept)",
    )
    p.add_argument("--grid", type=int, nargs=3, default=(9, 30, 52), help="latent token grid f h w")
    p.add_argument("--device", default=None, help="cpu | cuda")
    args = p.parse_args(argv)
    result = run_transformer_bench(
        model=args.model,
        grid=tuple(args.grid),
        sparsity=args.sparsity,
        block_size=args.block_size,
        form=args.form,
        repeats=args.repeats,
        device=args.device,
    )
    print(json.dumps(result, indent=2))  # the command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
