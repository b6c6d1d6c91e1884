"""Tests of the diffusion-LM pipeline (LLaDA-style sampler) on the tiny preset and on toy models."""

from __future__ import annotations

import types

import pytest
import torch
from fastgen.pipelines.diffusion_lm import (
    DiffusionLMPipeline,
    bidirectional_mask,
    num_transfer_tokens,
    resolve_mask_token_id,
)
from fastgen.pipelines.tiny_lm import TINY_MASK_TOKEN_ID, build_tiny_llada

import fastgen

FAST = dict(gen_length=24, steps=6, block_length=8, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_llada(device="cpu", dtype=torch.float32)


class PositionLM(torch.nn.Module):
    """Toy LM whose logits at absolute position j favour token ``j % (vocab - 1)`` (never the mask)."""

    def __init__(self, vocab: int = 50, model_type: str = "toy", eos: int | None = None):
        super().__init__()
        self.config = types.SimpleNamespace(
            model_type=model_type, max_position_embeddings=512, mask_token_id=vocab - 1
        )
        self.vocab, self.eos = vocab, eos
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls.append(input_ids.shape)
        b, n = input_ids.shape
        target = torch.arange(n) % (self.vocab - 1) if self.eos is None else torch.full((n,), self.eos)
        logits = torch.nn.functional.one_hot(target, self.vocab).float() * 5.0 + self.anchor
        return types.SimpleNamespace(logits=logits.expand(b, n, self.vocab))


def llada_num_transfer(mask_count: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens, written as a loop."""
    out = [mask_count // steps] * steps
    for i in range(mask_count % steps):
        out[i] += 1
    return out


@pytest.mark.parametrize(("count", "steps"), [(8, 3), (32, 32), (5, 8), (17, 4)])
def test_num_transfer_tokens_matches_llada(count, steps):
    got = num_transfer_tokens(torch.tensor([count, count]), steps)
    assert got.tolist() == [llada_num_transfer(count, steps)] * 2


def test_all_masks_resolved_prompt_kept(pipe):
    out = pipe(prompt=["Hello there", "Hi"], generator=0, **FAST)
    p = out.prompt_length
    assert out.sequences.shape == (2, p + 24)
    assert not (out.sequences == TINY_MASK_TOKEN_ID).any()
    alone = pipe.tokenizer("Hi")["input_ids"]
    assert out.sequences[1, p - len(alone) : p].tolist() == alone
    assert out.steps_run == 6 and out.nfe == 6
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)


def test_commits_only_inside_current_block_with_schedule(pipe):
    history = []
    out = pipe(prompt="abc", generator=0, callback=lambda s, seq: history.append((s, seq)), **FAST)
    p = out.prompt_length
    steps_per_block, block = 2, 8
    previous = torch.full((24,), TINY_MASK_TOKEN_ID)
    for s, seq in history:
        gen = seq[0, p:]
        b = s // steps_per_block
        newly = (previous == TINY_MASK_TOKEN_ID) & (gen != TINY_MASK_TOKEN_ID)
        assert newly.nonzero().flatten().tolist() == [i for i in range(24) if newly[i]]
        assert all(b * block <= i < (b + 1) * block for i in newly.nonzero().flatten().tolist())
        assert int(newly.sum()) == llada_num_transfer(block, steps_per_block)[s % steps_per_block]
        assert (gen[(b + 1) * block :] == TINY_MASK_TOKEN_ID).all()
        previous = gen
    assert [s for s, _ in history] == list(range(6))


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "entropy", "margin"])
def test_remasking_modes_resolve(pipe, remasking):
    out = pipe(prompt="xyz", remasking=remasking, generator=3, **FAST)
    assert not (out.sequences == TINY_MASK_TOKEN_ID).any()


def test_greedy_deterministic_and_seeded_sampling(pipe):
    a = pipe(prompt="abc", generator=0, **FAST).sequences
    b = pipe(prompt="abc", generator=123, **FAST).sequences
    assert torch.equal(a, b)
    s1 = pipe(prompt="abc", temperature=1.0, generator=7, **FAST).sequences
    s2 = pipe(prompt="abc", temperature=1.0, generator=7, **FAST).sequences
    s3 = pipe(prompt="abc", temperature=1.0, generator=8, **FAST).sequences
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_batch_with_left_padding_equals_each_prompt_alone(pipe, cfg_scale):
    prompts = ["The quick brown fox", "Hi", "jumps over"]
    kw = dict(FAST, temperature=0.8, remasking="random", cfg_scale=cfg_scale)
    batch = pipe(prompt=prompts, generator=10, **kw)
    for b, text in enumerate(prompts):
        alone = pipe(prompt=text, generator=10 + b, **kw)
        assert torch.equal(batch.sequences[b, -alone.sequences.shape[1] :], alone.sequences[0])
        assert batch.texts[b] == alone.texts[0]


def test_input_ids_with_right_padding_are_left_padded(pipe):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = pipe(input_ids=ids, attention_mask=mask, generator=[4, 4], temperature=0.5, **FAST)
    alone = pipe(input_ids=torch.tensor([9, 10]), generator=4, temperature=0.5, **FAST)
    assert torch.equal(batch.sequences[1, 2:], alone.sequences[0])


def test_cfg_single_batched_forward_and_differs(pipe):
    calls = []
    handle = pipe.model.register_forward_pre_hook(
        lambda m, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        guided = pipe(prompt=["abc", "de"], cfg_scale=2.0, generator=0, **FAST)
    finally:
        handle.remove()
    plain = pipe(prompt=["abc", "de"], generator=0, **FAST)
    assert len(calls) == 6 and all(shape[0] == 4 for shape in calls)
    assert guided.nfe == 12
    assert not torch.equal(guided.sequences, plain.sequences)


def test_dream_logits_shift():
    model = PositionLM()
    pipe = DiffusionLMPipeline(model)
    ids = torch.tensor([[3, 4, 5]])
    plain = pipe(input_ids=ids, gen_length=8, steps=4, block_length=4, progress=False, logits_shift=False)
    shifted = pipe(input_ids=ids, gen_length=8, steps=4, block_length=4, progress=False, logits_shift=True)
    assert plain.sequences[0, 3:].tolist() == list(range(3, 11))
    assert shifted.sequences[0, 3:].tolist() == list(range(2, 10))
    dream = DiffusionLMPipeline(PositionLM(model_type="dream"))
    auto = dream(input_ids=ids, gen_length=8, steps=4, block_length=4, progress=False)
    assert torch.equal(auto.sequences, shifted.sequences)


def test_native_llama_runs_bidirectionally(pipe):
    ids = torch.randint(4, 90, (1, 12))
    changed = ids.clone()
    changed[0, -1] = 91
    valid = torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(12)[None]
    mask = bidirectional_mask(valid, pipe.dtype)
    with torch.no_grad():
        before = pipe.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        after = pipe.model(input_ids=changed, attention_mask=mask, position_ids=positions).logits
        causal_before = pipe.model(input_ids=ids).logits
        causal_after = pipe.model(input_ids=changed).logits
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4
    torch.testing.assert_close(causal_before[0, 0], causal_after[0, 0])


def test_bidirectional_mask_hides_padding_keys():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    mask = bidirectional_mask(valid, torch.bfloat16)
    assert mask.shape == (2, 1, 3, 3)
    assert (mask[0, 0, :, 0] == torch.finfo(torch.bfloat16).min).all()
    assert (mask[0, 0, :, 1:] == 0).all() and (mask[1] == 0).all()


def test_confidence_threshold_ends_blocks_early(pipe):
    # a probability is > 1e-9 (every candidate commits) and never > 1.0 (only the schedule commits)
    low = pipe(prompt="abc", confidence_threshold=1e-9, generator=0, **FAST)
    assert low.steps_run == 3 and not (low.sequences == TINY_MASK_TOKEN_ID).any()
    high = pipe(prompt="abc", confidence_threshold=1.0, generator=0, **FAST)
    plain = pipe(prompt="abc", generator=0, **FAST)
    assert torch.equal(high.sequences, plain.sequences) and high.steps_run == 6


def test_eos_early_stop_fills_rest():
    model = PositionLM(eos=7)
    pipe = DiffusionLMPipeline(model)
    out = pipe(
        input_ids=torch.tensor([[1, 2]]),
        gen_length=12,
        steps=6,
        block_length=4,
        eos_token_id=7,
        progress=False,
    )
    assert out.steps_run == 2 and out.sequences[0, 2:].tolist() == [7] * 12


def test_bf16_runs():
    pipe = build_tiny_llada(device="cpu", dtype=torch.bfloat16)
    out = pipe(prompt=["a", "bcd"], generator=0, temperature=1.0, **FAST)
    assert not (out.sequences == TINY_MASK_TOKEN_ID).any()


def test_acceleration_applied_and_removed_with_step_hooks(pipe, monkeypatch):
    from fastgen.processors import transformers_lm as fake

    events = []
    monkeypatch.setattr(
        fake, "begin_generation", lambda model, total_steps, **kw: events.append(("begin", total_steps))
    )
    monkeypatch.setattr(fake, "set_step", lambda model, step: events.append(("step", step)))
    monkeypatch.setattr(fake, "end_generation", lambda model: events.append(("end",)))

    def apply(model, config):
        events.append(("apply", config))
        model._fastgen_adapter = fake.__name__

    def remove(model):
        events.append(("remove",))
        model._fastgen_adapter = None

    monkeypatch.setattr(fastgen.api, "apply_sparse_attention", apply)
    monkeypatch.setattr(fastgen.api, "remove_sparse_attention", remove)
    config = fastgen.SparseDConfig(block_size=16)
    pipe(prompt="abc", acceleration=[config], generator=0, **FAST)
    assert events == [
        ("apply", config),
        ("begin", 6),
        *[("step", s) for s in range(6)],
        ("end",),
        ("remove",),
    ]

    events.clear()

    def boom(step, seq):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        pipe(prompt="abc", acceleration=config, generator=0, callback=boom, **FAST)
    assert events[-2:] == [("end",), ("remove",)] and pipe.model._fastgen_adapter is None

    events.clear()
    pipe.model._fastgen_adapter = fake.__name__  # applied by the user: left alone
    try:
        pipe(prompt="abc", acceleration=[config], generator=0, **FAST)
    finally:
        pipe.model._fastgen_adapter = None
    assert ("apply", config) not in events and ("remove",) not in events and events[0] == ("begin", 6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(gen_length=24, block_length=7), "block_length"),
        (dict(gen_length=24, block_length=8, steps=5), "steps"),
        (dict(gen_length=2048, block_length=32, steps=64), "max_position_embeddings"),
        (dict(remasking="top_p"), "remasking"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(temperature=-0.5), "temperature"),
        (dict(gen_length=0), "gen_length"),
        (dict(generator="seed"), "generator"),
    ],
)
def test_bad_values_raise_naming_parameter(pipe, kwargs, name):
    args = dict(gen_length=24, steps=6, block_length=8, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        pipe(prompt="abc", **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(confidence_threshold=2.0), r"confidence_threshold=2.0 is out of range; allowed: \(0.0, 1.0\]"),
        (dict(confidence_threshold=0.0), r"confidence_threshold=0.0 is out of range"),
        (dict(steps=48), r"steps=48 is more than gen_length=24.*allowed: 1 <= steps <= 24"),
        (
            dict(acceleration=[fastgen.SparseDConfig(), fastgen.SparseDConfig(select=0.5)]),
            "acceleration holds 2 SparseDConfig; allowed: at most one config per method",
        ),
        (
            dict(acceleration=[fastgen.WindowDiffusionConfig(), fastgen.WindowDiffusionConfig()]),
            "acceleration holds 2 WindowDiffusionConfig",
        ),
        (dict(sampler="dream", remasking="entropy"), "remasking='entropy' is an option of LLaDA's sampler"),
    ],
)
def test_bad_calls_fail_before_any_model_call(kwargs, message):
    """Issue 21: each mistake is one line naming the parameter, the value and what is allowed, and the
    model never runs."""
    model = PositionLM()
    pipe = DiffusionLMPipeline(model)
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), gen_length=24, steps=6, block_length=8, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pipe(**args)
    assert model.calls == [] and model.__dict__.get("_fastgen_adapter") is None


def test_remasking_is_honoured_by_llada_and_refused_by_dream_but_default_fine():
    model = PositionLM()
    pipe = DiffusionLMPipeline(model)
    ids = torch.tensor([[1, 2, 3]])
    dream = pipe(input_ids=ids, gen_length=8, steps=4, block_length=8, sampler="dream", progress=False)
    llada = pipe(input_ids=ids, gen_length=8, steps=4, block_length=8, remasking="margin", progress=False)
    assert not (dream.sequences == 49).any() and not (llada.sequences == 49).any()


def test_mask_token_id_outside_the_vocabulary_is_refused_up_front():
    model = PositionLM()
    model.config.vocab_size = 50
    with pytest.raises(ValueError, match=r"mask_token_id=50 is outside the model's vocabulary of 50 tokens"):
        DiffusionLMPipeline(model, mask_token_id=50)
    with pytest.raises(ValueError, match="mask_token_id=-1"):
        DiffusionLMPipeline(model, mask_token_id=-1)
    assert DiffusionLMPipeline(model, mask_token_id=49).mask_token_id == 49


def test_apply_sparse_attention_on_the_pipeline_points_to_acceleration(pipe):
    with pytest.raises(ValueError, match=r"acceleration=") as err:
        fastgen.apply_sparse_attention(pipe, fastgen.SparseDConfig())
    assert "DiffusionLMPipeline" in str(err.value) and "pipe.model" in str(err.value)


def test_prompt_needs_tokenizer_and_mask_id_inferred():
    with pytest.raises(ValueError, match="tokenizer"):
        DiffusionLMPipeline(PositionLM())(prompt="abc", progress=False)
    llada = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llada"))
    dream = types.SimpleNamespace(config=types.SimpleNamespace(model_type="Dream"))
    assert resolve_mask_token_id(llada) == 126336 and resolve_mask_token_id(dream) == 151666
    with pytest.raises(ValueError, match="mask_token_id"):
        resolve_mask_token_id(types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2")))
