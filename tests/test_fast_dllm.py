"""Fast-dLLM (``FastDLLMConfig``) checked against a slow plain-PyTorch statement of its rules.

The statement is written here from Fast-dLLM's code (``llada/generate.py``: ``generate``,
``generate_with_prefix_cache``, ``generate_with_dual_cache``, ``get_transfer_index``,
``get_transfer_index_dynamic``; ``dream/model/generation_utils_block.py``: ``_sample``), one unpadded row
at a time, greedy:

- blocks of ``block`` positions, left to right; a block's loop runs until it has no mask;
- every block starts with a full forward whose logits commit at once (the refresh is fused with a commit);
  under Dream's rules that commit is exactly the block's first position (its greedy token);
- later steps: PrefixCache recomputes the block and every position after it, the positions before the
  block keep the keys/values of the block-start forward; DualCache recomputes the block only, the rest
  keeps the block-start keys/values; no cache recomputes everything;
- candidates are the masks of the current block only; threshold rule: the most confident always, the
  others when confidence >= threshold; factor rule: the longest prefix of the ranking whose n-th token has
  confidence >= 1 - f/(n+1) (the first always; a first failure at the last rank commits all);
- LLaDA's confidence is the float64 softmax probability of the argmax; Dream shifts logits right by one.

"Keep the keys/values" is stated the slow way: every step is a FULL forward through an attention function
that swaps in kept copies of the keys/values at the positions not recomputed (as
tests/test_window_dream_reference.py does for Window-Diffusion).
"""

from __future__ import annotations

import math

import pytest
import torch
from fastgen.pipelines.diffusion_lm import DiffusionLMPipeline
from fastgen.pipelines.fast_dllm import factor_commit, threshold_commit
from fastgen.pipelines.tiny_lm import build_tiny_llama

from fastgen.configs import FastDLLMConfig

MASK = 61
VOCAB = 64


def tiny_pipe(family="llada", layers=2, seed=0, dtype=torch.float32) -> DiffusionLMPipeline:
    """A tiny bidirectional Llama (LLaDA-shaped) or Qwen2 (Dream-shaped, GQA)."""
    if family == "dream":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
            use_cache=False, initializer_range=0.1, tie_word_embeddings=False,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    else:
        model = build_tiny_llama(VOCAB, hidden=64, heads=4, layers=layers, max_positions=512, seed=seed)
    with torch.no_grad():  # peaked predictions: confidences spread over (0, 1), several tokens per step
        model.lm_head.weight.mul_(4.0)
    model.config.fastgen_family = family
    model.config.fastgen_mask_token_id = MASK
    return DiffusionLMPipeline(model.to(dtype), mask_token_id=MASK)


def prompt_rows(lengths=(11, 6), seed=3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, MASK, (n,), generator=g) for n in lengths]


def left_padded(rows):
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - row.numel() :] = row
        attn[b, width - row.numel() :] = 1
    return ids, attn


class StaleKeysValues:
    """Attention of the statement: a full forward whose keys/values are fresh only at ``fresh``
    positions (all when ``fresh`` is None) and the kept copies elsewhere; the result is kept."""

    def __init__(self):
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh: torch.Tensor | None = None

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = module.layer_idx
        if self.fresh is not None:
            old_key, old_value = self.kept[layer]
            f = self.fresh[None, None, :, None]
            key, value = torch.where(f, key, old_key), torch.where(f, value, old_value)
        self.kept[layer] = (key.clone(), value.clone())
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        probs = torch.softmax((query.float() @ key.float().transpose(-1, -2)) * scaling, dim=-1)
        return (probs @ value.float()).to(query.dtype).transpose(1, 2), None


def statement_commit(conf: list[float], threshold=None, factor=None) -> int:
    """How many of the ranked candidates ``conf`` (descending) the rule commits."""
    n = len(conf)
    if threshold is not None:
        return 1 + sum(1 for c in conf[1:] if c >= threshold)
    top = 0
    for top in range(n):
        limit = -1.0 if top == 0 else 1 - factor / (top + 2)
        if conf[top] < limit:
            break
    return top + 1 if top in (0, n - 1) else top  # the reference's "if top_i == 0 or top_i == len - 1"


def reference_fast_dllm(pipe, prompt, *, gen_length, block, cache, threshold=None, factor=None, rules="llada",
                        shift=False, perturb=None):  # fmt: skip
    """Fast-dLLM's rules for one unpadded row; returns the final sequence and the steps run.

    ``perturb`` breaks one rule (for the test proving the comparison can fail): ``"suffix-candidates"``
    (masks after the block are candidates too), ``"no-fused-commit"`` (the block-start forward commits
    nothing), ``"dual-recomputes-suffix"`` (DualCache recomputes the suffix as PrefixCache does).
    """
    from transformers import AttentionInterface

    model = pipe.model
    attention = StaleKeysValues()
    AttentionInterface.register("test_fast_dllm_stale_kv", attention)
    saved = model.config._attn_implementation
    model.set_attn_implementation("test_fast_dllm_stale_kv")
    plen = prompt.numel()
    total = plen + gen_length
    x = torch.cat([prompt, torch.full((gen_length,), MASK)])
    positions = torch.arange(total)
    steps = 0

    def predictions():
        out = model(input_ids=x[None], attention_mask=torch.zeros(1, 1, total, total, dtype=pipe.dtype),
                    position_ids=positions[None]).logits[0]  # fmt: skip
        if shift:
            out = torch.cat([out[:1], out[:-1]])
        out = out.clone()
        out[:, MASK] = -math.inf
        if rules == "dream":
            probs = torch.softmax(out, -1)
            conf, tok = probs.max(-1)
            return tok, conf.double()
        tok = out.argmax(-1)
        probs = torch.softmax(out.double(), -1)
        return tok, probs.gather(-1, tok[:, None])[:, 0]

    try:
        with torch.no_grad():
            for start in range(plen, total, block):
                end = start + block
                first = True
                while bool((x[start:end] == MASK).any()):
                    if first or cache == "none":
                        attention.fresh = None
                    elif cache == "prefix" or perturb == "dual-recomputes-suffix":
                        attention.fresh = positions >= start
                    else:
                        attention.fresh = (positions >= start) & (positions < end)
                    tok, conf = predictions()
                    steps += 1
                    hi = total if perturb == "suffix-candidates" else end
                    cands = [p for p in range(start, hi) if int(x[p]) == MASK]
                    if first and rules == "dream":
                        x[start] = tok[start]
                    elif not (first and perturb == "no-fused-commit"):
                        ranked = sorted(cands, key=lambda p: -float(conf[p]))
                        take = statement_commit([float(conf[p]) for p in ranked], threshold, factor)
                        for p in ranked[:take]:
                            x[p] = tok[p]
                    first = False
    finally:
        model.set_attn_implementation(saved)
        attention.fresh = None
    return x, steps


# ----------------------------------------------------------------------------------------- commit rules
def test_commit_rules_equal_the_statement_on_random_confidences():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        batch, length = 3, int(torch.randint(1, 12, (), generator=g))
        conf = torch.rand(batch, length, generator=g, dtype=torch.float64)
        if trial % 4 == 0:
            conf = 0.85 + 0.15 * conf  # many candidates near the thresholds
        cand = torch.rand(batch, length, generator=g) < 0.7
        cand[0] = False  # a row without candidates commits nothing
        for rule in ({"threshold": 0.9}, {"threshold": 0.5}, {"factor": 1.0}, {"factor": 0.3}):
            got = (
                threshold_commit(conf, cand, rule["threshold"])
                if "threshold" in rule
                else factor_commit(conf, cand, rule["factor"])
            )
            for b in range(batch):
                idx = sorted(cand[b].nonzero().flatten().tolist(), key=lambda p: -float(conf[b, p]))
                take = statement_commit([float(conf[b, p]) for p in idx], **rule) if idx else 0
                assert sorted(got[b].nonzero().flatten().tolist()) == sorted(idx[:take]), (trial, rule, b)


def test_factor_rule_quirk_and_thresholds():
    cand = torch.ones(1, 4, dtype=torch.bool)
    # f = 1: rank 2 needs 2/3, rank 3 needs 3/4, rank 4 needs 4/5
    conf = torch.tensor([[0.9, 0.8, 0.76, 0.1]], dtype=torch.float64)  # fails only at the last rank
    assert factor_commit(conf, cand, 1.0).tolist() == [[True, True, True, True]]
    conf = torch.tensor([[0.9, 0.8, 0.85, 0.99]], dtype=torch.float64)  # .99 .9 .85 .8: all pass
    assert factor_commit(conf, cand, 1.0).all()
    conf = torch.tensor([[0.9, 0.6, 0.5, 0.2]], dtype=torch.float64)  # rank 2 fails -> only the top
    assert factor_commit(conf, cand, 1.0).tolist() == [[True, False, False, False]]


# ------------------------------------------------------------------------------- pipeline vs statement
CASES = {  # family, cache, rule, block, gen_length
    "llada-prefix-threshold": ("llada", "prefix", {"threshold": 0.5}, 16, 48),
    "llada-dual-threshold": ("llada", "dual", {"threshold": 0.5}, 16, 48),
    "llada-none-threshold": ("llada", "none", {"threshold": 0.5}, 16, 48),
    "llada-dual-factor": ("llada", "dual", {"factor": 1.5}, 16, 48),
    "llada-prefix-factor": ("llada", "prefix", {"factor": 1.5}, 8, 40),
    "dream-prefix-threshold": ("dream", "prefix", {"threshold": 0.5}, 16, 48),
    "dream-dual-threshold": ("dream", "dual", {"threshold": 0.5}, 16, 48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_the_slow_statement(case):
    family, cache, rule, block, gen_length = CASES[case]
    pipe = tiny_pipe(family)
    prompt = prompt_rows()[0]
    cfg = FastDLLMConfig(
        cache=cache, block_length=block, threshold=rule.get("threshold"), factor=rule.get("factor")
    )
    got = pipe(input_ids=prompt[None], gen_length=gen_length, acceleration=[cfg], progress=False)
    want, steps = reference_fast_dllm(
        pipe, prompt, gen_length=gen_length, block=block, cache=cache, rules=family,
        shift=family == "dream", **rule,
    )  # fmt: skip
    assert got.sequences[0].tolist() == want.tolist()
    assert got.steps_run == steps
    assert not (want == MASK).any()
    assert gen_length // block <= steps < gen_length  # parallel: fewer steps than tokens


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_caches_are_really_stale(family):
    """With two layers the cached keys/values differ from fresh ones: on some prompt the prefix and the
    dual results differ from the no-cache result (they are not it in disguise)."""
    pipe = tiny_pipe(family)
    differs = {"prefix": False, "dual": False}
    for seed in range(3, 7):
        prompt = prompt_rows(seed=seed)[0][None]
        seqs = {}
        for c in ("none", "prefix", "dual"):
            cfg = FastDLLMConfig(cache=c, block_length=16, threshold=0.5)
            seqs[c] = pipe(input_ids=prompt, gen_length=48, acceleration=cfg, progress=False).sequences
        for c in differs:
            differs[c] |= not torch.equal(seqs[c], seqs["none"])
    assert differs == {"prefix": True, "dual": True}


@pytest.mark.parametrize(
    "perturb, cache",
    [("suffix-candidates", "dual"), ("no-fused-commit", "prefix"), ("dual-recomputes-suffix", "dual")],
)
def test_the_statement_fails_on_a_perturbed_rule(perturb, cache):
    """The check has teeth: each perturbed statement disagrees with the pipeline (tokens or steps; without
    the fused commit the tokens can stay the same, one step later per block)."""
    pipe = tiny_pipe("llada")
    prompt = prompt_rows()[0]
    cfg = FastDLLMConfig(cache=cache, block_length=16, threshold=0.5)
    out = pipe(input_ids=prompt[None], gen_length=48, acceleration=cfg, progress=False)
    got = (out.sequences[0].tolist(), out.steps_run)
    kw = dict(gen_length=48, block=16, cache=cache, threshold=0.5)
    want, steps = reference_fast_dllm(pipe, prompt, **kw)
    assert (want.tolist(), steps) == got
    other, other_steps = reference_fast_dllm(pipe, prompt, perturb=perturb, **kw)
    assert (other.tolist(), other_steps) != got


def test_dual_cache_refreshed_every_step_is_no_cache_decoding_bit_for_bit():
    pipe = tiny_pipe("llada")
    ids, attn = left_padded(prompt_rows())
    kw = dict(input_ids=ids, attention_mask=attn, gen_length=48, progress=False)
    none = pipe(acceleration=FastDLLMConfig(cache="none", block_length=16, threshold=0.5), **kw)
    dual1 = pipe(
        acceleration=FastDLLMConfig(cache="dual", block_length=16, threshold=0.5, refresh_interval=1), **kw
    )
    dual = pipe(acceleration=FastDLLMConfig(cache="dual", block_length=16, threshold=0.5), **kw)
    assert torch.equal(none.sequences, dual1.sequences)
    assert not torch.equal(none.sequences, dual.sequences)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_layer_caches_are_exact(family, dtype):
    """With one layer a position's keys/values depend on its token only: the prefix (unchanged inside a
    block) and the suffix (masks) are exact in the cache, so every mode decodes the same tokens; batch of
    two with left padding."""
    pipe = tiny_pipe(family, layers=1, dtype=dtype)
    ids, attn = left_padded(prompt_rows())
    kw = dict(input_ids=ids, attention_mask=attn, gen_length=48, progress=False)
    out = {
        c: pipe(acceleration=FastDLLMConfig(cache=c, block_length=16, threshold=0.5), **kw).sequences
        for c in ("none", "prefix", "dual")
    }
    assert torch.equal(out["none"], out["prefix"])
    assert torch.equal(out["none"], out["dual"])
    assert not (out["dual"][:, ids.shape[1] :] == MASK).any()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_batch_of_two_with_left_padding_equals_rows_alone_and_the_statement(family, cache):
    pipe = tiny_pipe(family, seed=1)
    rows = prompt_rows((11, 6), seed=5)
    ids, attn = left_padded(rows)
    width = ids.shape[1]
    cfg = FastDLLMConfig(cache=cache, block_length=16, threshold=0.5)
    kw = dict(gen_length=48, acceleration=cfg, progress=False)
    batch = pipe(input_ids=ids, attention_mask=attn, **kw)
    for b, row in enumerate(rows):
        alone = pipe(input_ids=row[None], **kw)
        assert batch.sequences[b, width:].tolist() == alone.sequences[0, row.numel() :].tolist()
        want, _ = reference_fast_dllm(
            pipe,
            row,
            gen_length=48,
            block=16,
            cache=cache,
            threshold=0.5,
            rules=family,
            shift=family == "dream",
        )
        assert alone.sequences[0].tolist() == want.tolist()


def test_bf16_batch_with_padding_runs_every_mode():
    pipe = tiny_pipe("llada", dtype=torch.bfloat16)
    ids, attn = left_padded(prompt_rows())
    for cache in ("none", "prefix", "dual"):
        out = pipe(input_ids=ids, attention_mask=attn, gen_length=48, progress=False,
                   acceleration=FastDLLMConfig(cache=cache, block_length=16, factor=1.0))  # fmt: skip
        assert not (out.sequences[:, ids.shape[1] :] == MASK).any()
        assert out.steps_run >= 3


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"cache": "triple"}, "cache"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 0.5, "factor": 1.0}, "threshold"),
        ({"threshold": None, "factor": -1.0}, "factor"),
        ({"block_length": 0}, "block_length"),
        ({"refresh_interval": 0}, "refresh_interval"),
        ({"rules": "gpt"}, "rules"),
    ],
)
def test_config_rejects_bad_values_in_one_line(kwargs, field):
    assert FastDLLMConfig().threshold == 0.9 and FastDLLMConfig(factor=1.0).threshold is None
    with pytest.raises(ValueError, match=field) as err:
        FastDLLMConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_pipeline_rejects_bad_combinations():
    from fastgen import SparseDConfig, WindowDiffusionConfig

    pipe = tiny_pipe("llada")
    prompt = prompt_rows()[0][None]
    cfg = FastDLLMConfig()
    with pytest.raises(ValueError, match="confidence_threshold"):
        pipe(input_ids=prompt, gen_length=32, acceleration=cfg, confidence_threshold=0.9, progress=False)
    with pytest.raises(ValueError, match="FastDLLMConfig"):
        pipe(input_ids=prompt, gen_length=32, acceleration=[cfg, SparseDConfig()], progress=False)
    with pytest.raises(ValueError, match="FastDLLMConfig"):
        pipe(input_ids=prompt, gen_length=32, acceleration=[cfg, WindowDiffusionConfig()], progress=False)
    with pytest.raises(ValueError, match="block_length"):
        pipe(input_ids=prompt, gen_length=40, acceleration=cfg, steps=40, block_length=40, progress=False)
