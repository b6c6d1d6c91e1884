"""torchrun worker of ``tests/test_context_parallel.py`` (a script, not a test module).

Run as ``python -m torch.distributed.run --standalone --nproc-per-node P tests/cp_worker.py SCENARIO...``:
every rank builds the same tiny model, computes the single-process reference itself (before
context parallelism is enabled, or on a copy), enables diffusers' context parallelism over gloo and
checks its output against the reference. A failed check raises (non-zero exit); each passed
scenario prints ``CP-OK <scenario> <details>`` on rank 0.

diffusers 0.42 resolves the parallel config with ``rank % torch.accelerator.device_count()``,
which is 0 with CPU-only torch (ZeroDivisionError): this worker (never the library) makes
``torch.accelerator.device_count`` return 1 before enabling, the one device of a CPU rank.
"""

from __future__ import annotations

import copy
import logging
import os
import sys

import torch
import torch.distributed as dist

TOL = 1e-5  # fp32 relative error (Frobenius norm)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the Frobenius norm."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> float:
    """Raise unless ``actual`` is ``expected`` within ``tol`` (relative)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g} (rank {dist.get_rank()})"
    return err


def report(scenario: str, details: str) -> None:
    """Print a scenario's success line on rank 0."""
    if dist.get_rank() == 0:
        print(f"CP-OK {scenario} {details}", flush=True)


# ----------------------------------------------------------------------------------- models


def tiny_wan(heads: int = 4, layers: int = 2):
    """A tiny WanTransformer3DModel (``heads`` x 32, 1x2x2 patches), same weights on every rank."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()


def wan_inputs(grid=(4, 6, 10), batch: int = 2):
    """Latent (``grid`` after 1x2x2 patches: 240 tokens, not a block multiple), timestep, text."""
    g = torch.Generator().manual_seed(2)
    f, h, w = grid
    x = torch.randn(batch, 4, f, 2 * h, 2 * w, generator=g)
    text = torch.randn(batch, 7, 16, generator=g)
    return {"hidden_states": x, "timestep": torch.full((batch,), 900.0), "encoder_hidden_states": text}


def tiny_hunyuan(heads: int = 4):
    """A tiny HunyuanVideoTransformer3DModel (``heads`` x 32, 2 double + 2 single blocks)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(1)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=32,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=16,
        rope_axes_dim=(8, 12, 12),
    ).eval()


def hunyuan_inputs(grid=(4, 6, 10), text_len: int = 8, valid=(2, 7)):
    """Latent, 8 text tokens of which only ``valid[b]`` are real: batch 0's padding (6) is longer
    than one rank's text share (8/2 = 4, 8/4 = 2)."""
    g = torch.Generator().manual_seed(3)
    f, h, w = grid
    batch = len(valid)
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return {
        "hidden_states": torch.randn(batch, 4, f, 2 * h, 2 * w, generator=g),
        "timestep": torch.full((batch,), 900.0),
        "encoder_hidden_states": torch.randn(batch, text_len, 16, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "guidance": torch.full((batch,), 6000.0),
    }


def forward(model, inputs) -> torch.Tensor:
    """The model's output sample, no grad."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def sparse_config(**fields):
    """Rectified SpaAttn from the first step and layer, small blocks (many per row)."""
    from fastgen import RectifiedSpaAttnConfig

    base = dict(sparsity=0.6, block_size=16, dense_layers=0, warmup_steps=0, min_tokens=32)
    return RectifiedSpaAttnConfig(**{**base, **fields})


def enable(model, mode: str = "ulysses", **kwargs):
    """fastgen's ``enable_context_parallel`` over the whole world."""
    from fastgen.processors.context_parallel_plans import enable_context_parallel

    return enable_context_parallel(model, mode, **kwargs)


# -------------------------------------------------------------------------------- scenarios


def wan_dense() -> None:
    """Stock diffusers Wan under fastgen's enable_context_parallel equals the single process."""
    model, inputs = tiny_wan(), wan_inputs()
    expected = forward(model, inputs)
    enable(model)
    report("wan_dense", f"err={check('wan dense', forward(model, inputs), expected):.2e}")


def _masks(model) -> dict[int, torch.Tensor]:
    import fastgen

    return {row["layer"]: row["block_mask"] for row in fastgen.attention_stats(model)}


def _sparse_under_cp(model, inputs, name: str, mode: str = "ulysses", apply_after: bool = False) -> None:
    import fastgen
    from fastgen.processors.context_parallel import gathered_layer_stats
    from fastgen.tracking import reset_step_tracking

    fastgen.apply_sparse_attention(model, sparse_config())
    fastgen.record_attention_stats(model, "masks")
    expected = forward(model, inputs)
    dense = copy.deepcopy(model)
    fastgen.remove_sparse_attention(dense)
    assert rel_err(expected, forward(dense, inputs)) > 1e-3, (
        f"{name}: the sparse run is no different from dense"
    )
    expected_masks = _masks(model)
    expected_rows = {row["layer"]: row for row in fastgen.attention_stats(model)}
    reset_step_tracking(model)
    if apply_after:  # fastgen installed after enable_parallelism: the processors copy its config
        fastgen.remove_sparse_attention(model)
        (config,) = enable(model, mode)
        fastgen.apply_sparse_attention(model, sparse_config())
        fastgen.record_attention_stats(model, "masks")
    else:
        (config,) = enable(model, mode)
    err = check(f"{name} output", forward(model, inputs), expected)
    cp = config.context_parallel_config
    heads = model.config.num_attention_heads // cp.ulysses_degree
    first = cp._ulysses_local_rank * heads
    procs = {id(p): p for p in model.attn_processors.values() if hasattr(p, "_last")}
    seen = 0
    for proc in procs.values():
        for layer, stats in proc._last.items():
            assert stats is not None, f"{name}: layer {layer} did not run sparse under CP"
            assert stats["first_head"] == first, f"{name}: first_head {stats['first_head']} != {first}"
            local = stats["block_mask"][0].cpu()
            assert torch.equal(local, expected_masks[layer][first : first + heads]), (
                f"{name}: layer {layer} block masks of heads {first}..{first + heads - 1} differ"
            )
            seen += 1
    assert seen == len(expected_masks), f"{name}: {seen} sparse layers under CP, {len(expected_masks)} alone"
    for row in gathered_layer_stats(model):
        assert torch.equal(row["block_mask"], expected_masks[row["layer"]]), f"{name}: gathered masks differ"
        for stat in ("density", "keys_per_query", "compensated_fraction"):
            want = expected_rows[row["layer"]][stat]
            assert abs(row[stat] - want) <= 1e-6 * max(1.0, abs(want)), f"{name}: gathered {stat} differs"
    report(name, f"mode={mode} err={err:.2e} layers={len(expected_masks)}")


def wan_sparse() -> None:
    """Rectified SpaAttn on Wan under Ulysses: output, per-head masks, gathered statistics equal."""
    _sparse_under_cp(tiny_wan(), wan_inputs(), "wan_sparse")


def wan_sparse_bf16() -> None:
    """Rectified SpaAttn on a bf16 Wan under Ulysses: the exchange moves bf16 tensors untouched, so
    the output and the per-head masks are those of the single bf16 process."""
    model = tiny_wan().to(torch.bfloat16)
    inputs = {name: t.to(torch.bfloat16) for name, t in wan_inputs().items()}
    _sparse_under_cp(model, inputs, "wan_sparse_bf16")


def hunyuan_dense() -> None:
    """HunyuanVideo dense under CP with text padding longer than a rank's text share: wrong with the
    plain plan (the mask in [V; T] order against an interleaved sequence), exact with fastgen's."""
    from fastgen.processors.context_parallel_plans import hunyuan_video_cp_plan

    model, inputs = tiny_hunyuan(), hunyuan_inputs()
    expected = forward(model, inputs)
    plain = copy.deepcopy(model)
    plain.enable_parallelism(
        config=__import__("diffusers").ContextParallelConfig(ulysses_degree=dist.get_world_size()),
        cp_plan=hunyuan_video_cp_plan(plain),
    )
    wrong = rel_err(forward(plain, inputs), expected)
    assert wrong > 20 * TOL, f"hunyuan plain plan: expected the mask-order error, got {wrong:.2e}"
    enable(model)
    err = check("hunyuan dense", forward(model, inputs), expected)
    report("hunyuan_dense", f"err={err:.2e} plain-plan-err={wrong:.2e}")


def hunyuan_sparse() -> None:
    """Rectified SpaAttn on HunyuanVideo (padded text) under Ulysses: exact and same masks."""
    _sparse_under_cp(tiny_hunyuan(), hunyuan_inputs(), "hunyuan_sparse")


def wan_i2v_sparse() -> None:
    """Wan 2.1 I2V (image tokens before the 512 text tokens of the cross-attention context): the
    image tokens never enter self-attention, cross-attention stays local; sparse under CP exact,
    with fastgen applied after enable_parallelism."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        image_dim=16,
        added_kv_proj_dim=128,
        rope_max_seq_len=64,
    ).eval()
    inputs = wan_inputs()
    g = torch.Generator().manual_seed(5)
    inputs["encoder_hidden_states"] = torch.randn(2, 512, 16, generator=g)
    inputs["encoder_hidden_states_image"] = torch.randn(2, 6, 16, generator=g)
    _sparse_under_cp(model, inputs, "wan_i2v_sparse", apply_after=True)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


def _raises(fn, error: type, text: str) -> None:
    try:
        fn()
    except error as err:
        assert text in str(err), f"expected {text!r} in {err!r}"
        return
    raise AssertionError(f"no {error.__name__} ({text!r})")


def guards() -> None:
    """Clear errors (heads, token shares, HunyuanVideo token_replace) and a logged, correct dense
    fallback (processor set by hand after enabling: no tracker, so no global grid)."""
    import fastgen
    from fastgen.processors.wan import WanRectifiedProcessor

    world = dist.get_world_size()
    _raises(lambda: enable(tiny_wan(heads=2 * world - 1)), ValueError, "attention heads are not divisible")
    hunyuan_i2v = tiny_hunyuan()
    hunyuan_i2v.register_to_config(image_condition_type="token_replace")
    _raises(lambda: enable(hunyuan_i2v), ValueError, "token_replace")

    model = tiny_wan()
    odd = wan_inputs(grid=(3, 3, 5))  # 45 tokens
    inputs = wan_inputs()
    expected = forward(model, inputs)
    enable(model)
    _raises(lambda: forward(model, odd), ValueError, "45 tokens, not divisible by the context-parallel size")
    per_frame = dict(inputs, timestep=torch.full((2, 4), 900.0))  # [B, F]: would be split along frames
    _raises(lambda: forward(model, per_frame), ValueError, "would be split along dim 1")

    records = _Records()
    logging.getLogger("fastgen").addHandler(records)
    logging.getLogger("fastgen").setLevel(logging.INFO)
    model.set_attn_processor(WanRectifiedProcessor(sparse_config()))  # by hand, after enabling
    fastgen.record_attention_stats(model, "summary")  # statistics are opt-in
    err = check("wan hand-set processor (dense fallback)", forward(model, inputs), expected)
    assert any("was set after enable_parallelism" in m for m in records.messages), records.messages
    assert any("global video grid is unknown" in m for m in records.messages), records.messages
    assert fastgen.attention_stats(model) == []  # nothing ran sparse
    report("guards", f"fallback-err={err:.2e}")


def hunyuan_query_mask() -> None:
    """A mask that varies per query (not a key padding mask) under CP: HunyuanVideo's processor runs
    dense with the rows of its own queries; equal to the single-process call."""
    import fastgen

    model, inputs = tiny_hunyuan(), hunyuan_inputs()
    fastgen.apply_sparse_attention(model, sparse_config())
    world, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(9)
    video, text = torch.randn(2, 240, 128, generator=g), torch.randn(2, 8, 128, generator=g)
    n = video.shape[1] + text.shape[1]
    mask = torch.rand(2, 1, n, n, generator=g) > 0.3
    mask[..., :1] = True  # every row has a key
    cos, sin = model.rope(inputs["hidden_states"])
    attn = model.transformer_blocks[0].attn
    with torch.no_grad():
        expected = attn(
            hidden_states=video, encoder_hidden_states=text, attention_mask=mask, image_rotary_emb=(cos, sin)
        )
    enable(model)
    sv, st = video.shape[1] // world, text.shape[1] // world
    with torch.no_grad():
        out = attn(
            hidden_states=video[:, rank * sv : (rank + 1) * sv],
            encoder_hidden_states=text[:, rank * st : (rank + 1) * st],
            attention_mask=mask,
            image_rotary_emb=(cos[rank * sv : (rank + 1) * sv], sin[rank * sv : (rank + 1) * sv]),
        )
    err = check("hunyuan per-query mask video", out[0], expected[0][:, rank * sv : (rank + 1) * sv])
    check("hunyuan per-query mask text", out[1], expected[1][:, rank * st : (rank + 1) * st])
    report("hunyuan_query_mask", f"err={err:.2e}")


def _ring_mode() -> str:
    return "ring" if dist.get_world_size() == 2 else "unified"


def _ring_dense(model, inputs, name: str) -> None:
    import fastgen

    expected = forward(model, inputs)  # diffusers' own processors, one process
    fastgen.apply_sparse_attention(model, sparse_config(form="paper"))  # no ring form: dense, logged
    fastgen.record_attention_stats(model, "summary")  # statistics are opt-in
    records = _Records()
    logging.getLogger("fastgen").addHandler(records)
    logging.getLogger("fastgen").setLevel(logging.INFO)
    (config,) = enable(model, _ring_mode())
    cp = config.context_parallel_config
    err = check(f"{name} ({_ring_mode()})", forward(model, inputs), expected)
    assert any("this sparse call runs under Ulysses only" in m for m in records.messages), records.messages
    assert fastgen.attention_stats(model) == []
    logging.getLogger("fastgen").removeHandler(records)
    report(name, f"mode={_ring_mode()} ulysses={cp.ulysses_degree} ring={cp.ring_degree} err={err:.2e}")


def ring_dense() -> None:
    """Ring / unified where the sparse call has no ring form (``form="paper"``): the logged dense
    all-gather-K/V form (exact with any backend, no LSE needed; HunyuanVideo keys in [V; T] order for
    the model's mask) equals the single-process dense output, Wan and HunyuanVideo (padded text)."""
    _ring_dense(tiny_wan(), wan_inputs(), "ring_dense wan")
    _ring_dense(tiny_hunyuan(), hunyuan_inputs(), "ring_dense hunyuan")
    report("ring_dense", f"mode={_ring_mode()}")


def wan_ring() -> None:
    """Ring (2 ranks) / unified (4 ranks: 2x2): Rectified SpaAttn on Wan for the rank's query rows over
    all-gathered keys, no LSE merge; output, per-head masks and statistics equal the single process."""
    _sparse_under_cp(tiny_wan(), wan_inputs(), "wan_ring", _ring_mode())


def ring_two_grids() -> None:
    """Ring sparse on two grids of the same token count, one after the other (the cached query rows
    of one grid's tile order must not serve the other): both equal the single process."""
    import fastgen
    from fastgen.tracking import reset_step_tracking

    model = tiny_wan()
    fastgen.apply_sparse_attention(model, sparse_config())
    grids = [(4, 6, 10), (4, 10, 6)]
    expected = [forward(model, wan_inputs(grid=g)) for g in grids]
    reset_step_tracking(model)
    enable(model, _ring_mode())
    errs = [check(f"ring grid {g}", forward(model, wan_inputs(grid=g)), e) for g, e in zip(grids, expected)]
    report("ring_two_grids", f"mode={_ring_mode()} err={max(errs):.2e}")


def hunyuan_ring() -> None:
    """HunyuanVideo (padded text) under ring / unified: Rectified SpaAttn for the rank's video blocks
    and dense text rows over all-gathered keys in [V; T] order; output, masks, statistics equal."""
    _sparse_under_cp(tiny_hunyuan(), hunyuan_inputs(), "hunyuan_ring", _ring_mode())


def causal_pipe(heads: int = 4):
    """A ``CausalWanPipeline`` over a tiny 4-head Wan (32 tokens per latent frame), no VAE (latents out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from fastgen.pipelines.causal_wan import CausalWanPipeline

    torch.manual_seed(1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()
    return CausalWanPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def causal_generate(pipe, rope_positions: str) -> torch.Tensor:
    """8 latent frames in 4 chunks of 2, a rolling window of 5 frames with 1 sink (frames evicted)."""
    g = torch.Generator().manual_seed(4)
    text = torch.randn(1, 6, 16, generator=g)
    return pipe(
        prompt_embeds=text,
        num_frames=29,
        height=64,
        width=128,
        num_frames_per_chunk=2,
        denoising_timesteps=[1000.0, 500.0],
        local_attn_frames=5,
        sink_frames=1,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
        rope_positions=rope_positions,
    ).frames


def causal(mode: str = "ulysses", name: str = "causal") -> None:
    """Causal Wan (Self-Forcing) under ``mode``: latents over 4 chunks with a rolling window equal the
    single process, RoPE absolute and window, fastgen's causal processors installed before
    enable_parallelism or (the pipeline's own install) after it; each rank's cache holds its H/U heads
    over every token (under ring the whole chunk: no saving from the ring degree)."""
    from fastgen.processors.causal_wan import install_causal_processors

    errs = []
    for rope in ("absolute", "window"):
        for installed_first in (True, False):
            pipe = causal_pipe()
            expected = causal_generate(pipe, rope)
            if installed_first:
                install_causal_processors(pipe.transformer)
            (config,) = enable(pipe.transformer, mode)
            got = causal_generate(pipe, rope)
            errs.append(check(f"{name} {rope} installed_first={installed_first}", got, expected))
            u = config.context_parallel_config.ulysses_degree
            assert pipe.last_generation["cache_bytes"] * u == _single_cache_bytes(), (
                "cache not split by heads"
            )
    report(name, f"max-err={max(errs):.2e}")


def causal_ring() -> None:
    """Causal Wan (Self-Forcing) under ring (2 ranks) or unified 2x2 (4 ranks): as :func:`causal`."""
    causal(_ring_mode(), "causal_ring")


def _single_cache_bytes() -> int:
    # 2 layers x (K, V) x [1, 4 heads, 5 frames x 32 tokens, 32] fp32
    return 2 * 2 * 4 * 5 * 32 * 32 * 4


def causal_light_forcing(mode: str = "ulysses", name: str = "causal_light_forcing") -> None:
    """Light Forcing on the causal Wan under ``mode``: latents over 4 chunks with a rolling window equal
    the single process, sparse chunks ran (the output differs from dense), per-head masks of the rank's
    (Ulysses) heads equal."""
    import fastgen
    from fastgen import LightForcingConfig

    lf = LightForcingConfig(
        sparsity=0.6, sparsity_base=0.8, block_size=16, keep_frames=4, keep_sink=1, keep_near=1
    )
    pipe = causal_pipe()
    dense = causal_generate(pipe, "absolute")
    fastgen.apply_sparse_attention(pipe.transformer, lf)
    fastgen.record_attention_stats(pipe.transformer, "masks")
    expected = causal_generate(pipe, "absolute")
    assert rel_err(expected, dense) > 1e-3, "Light Forcing ran no sparse chunk"
    expected_masks = _masks(pipe.transformer)
    (config,) = enable(pipe.transformer, mode)
    err = check(name, causal_generate(pipe, "absolute"), expected)
    cp = config.context_parallel_config
    heads = pipe.transformer.config.num_attention_heads // cp.ulysses_degree
    first = cp._ulysses_local_rank * heads
    masks = _masks(pipe.transformer)
    assert masks.keys() == expected_masks.keys() and masks, f"{name}: layers {sorted(masks)}"
    for layer, mask in masks.items():
        assert torch.equal(mask, expected_masks[layer][first : first + heads]), (
            f"{name}: LF layer {layer} masks differ"
        )
    report(name, f"err={err:.2e}")


def causal_light_forcing_ring() -> None:
    """Light Forcing on the causal Wan under ring (2 ranks) or unified 2x2 (4 ranks)."""
    causal_light_forcing(_ring_mode(), "causal_light_forcing_ring")


SCENARIOS = {
    "causal": causal,
    "causal_light_forcing": causal_light_forcing,
    "causal_ring": causal_ring,
    "causal_light_forcing_ring": causal_light_forcing_ring,
    "wan_ring": wan_ring,
    "hunyuan_ring": hunyuan_ring,
    "ring_dense": ring_dense,
    "ring_two_grids": ring_two_grids,
    "wan_i2v_sparse": wan_i2v_sparse,
    "guards": guards,
    "hunyuan_query_mask": hunyuan_query_mask,
    "wan_dense": wan_dense,
    "wan_sparse": wan_sparse,
    "wan_sparse_bf16": wan_sparse_bf16,
    "hunyuan_dense": hunyuan_dense,
    "hunyuan_sparse": hunyuan_sparse,
}


def main(argv: list[str]) -> int:
    """Run the named scenarios (all when none) on this rank."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.accelerator.device_count = lambda: 1  # test-only: diffusers 0.42 divides by it (module docstring)
    try:
        for name in argv or list(SCENARIOS):
            SCENARIOS[name]()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
