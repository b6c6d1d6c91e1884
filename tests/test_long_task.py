"""The ledger task (long answers) and the ``tiny-llada-long`` checkpoint's loading path."""

from __future__ import annotations

import json
import random

import pytest
import torch
from fastgen.pipelines.long_task import (
    EOS_TOKEN_ID,
    LINE_TOKENS,
    MASK_TOKEN_ID,
    LedgerTask,
    next_line,
)


def test_lines_follow_the_rule_stated_independently():
    task = LedgerTask()
    prompt, answer = task.sample(random.Random(5))
    body = prompt[-task.num_lines * LINE_TOKENS :] + answer
    lines = [body[i : i + LINE_TOKENS] for i in range(0, len(body), LINE_TOKENS)]
    assert [ln[0] for ln in lines] == [f"L{i:02d}" for i in range(64)]
    for before, after in zip(lines, lines[1:]):
        words = before[1:6]
        assert after[1:6] == words[1:] + words[:1]  # rotate left by one
        assert int(after[6]) == (int(before[6]) + 1) % 10  # count + 1
        assert int(after[7]) == (int(before[7]) + int(after[6])) % 10  # total + new count


def test_sizes_and_answer_of():
    task = LedgerTask()
    ex = task.example(11)
    assert len(ex.answer.split()) == 256 == task.answer_length
    assert len(ex.prompt.split()) == task.prompt_length()
    assert 512 <= task.prompt_length() + 256 and task.prompt_length() + 1024 <= 1536
    assert task.answer_of(ex.prompt) == ex.answer
    assert task.answer_of("hello world") is None
    assert task.score(ex.answer, ex.answer) == (True, 1.0)
    wrong = ex.answer.split()
    wrong[7] = str((int(wrong[7]) + 1) % 10)
    exact, frac = task.score(" ".join(wrong), ex.answer)
    assert not exact and frac == pytest.approx(255 / 256)
    assert task.score("", ex.answer) == (False, 0.0)
    assert next_line(["L05", "a", "b", "c", "d", "e", "9", "3"]) == ["L06", "b", "c", "d", "e", "a", "0", "3"]


def test_held_out_is_fixed_and_disjoint_from_training_stream():
    task = LedgerTask()
    assert task.held_out(3) == task.held_out(3)
    train = {" ".join(task.sample(random.Random(0))[0]) for _ in range(1)}
    assert not train & {e.prompt for e in task.held_out(20)}


def test_tokenizer_round_trips_and_specials():
    task = LedgerTask()
    tok = task.build_tokenizer()
    ex = task.example(2)
    ids = tok(ex.prompt + " " + ex.answer)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == ex.prompt + " " + ex.answer
    assert tok.mask_token_id == MASK_TOKEN_ID and tok.eos_token_id == EOS_TOKEN_ID


@pytest.mark.parametrize("bad", [0, 65, 1.5, True])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="num_lines"):
        LedgerTask(num_lines=bad)


def test_checkpoint_in_llada_layout_loads_and_decodes(tmp_path):
    """A (tiny, untrained) checkpoint written by the training script's saver loads through
    load_diffusion_lm as a LLaDA checkpoint and runs at gen 256 through the preset builder."""
    import argparse

    from fastgen.pipelines.tiny_lm import build_tiny_llama
    from fastgen.pipelines.training import long_lm as script

    from fastgen.pipelines import tiny_llada_long

    task = LedgerTask()
    tok = task.build_tokenizer()
    args = argparse.Namespace(
        hidden=32, heads=2, layers=1, intermediate=64, max_positions=2048, rope_theta=10000.0
    )
    model = build_tiny_llama(len(tok), hidden=32, heads=2, layers=1, intermediate=64, max_positions=2048)
    script.save_checkpoint(model, tok, args, task, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llada" and config["fastgen_task"] == {"name": "ledger", "num_lines": 32}
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "model.safetensors"))
    assert "model.transformer.blocks.0.q_proj.weight" in keys and "model.transformer.ff_out.weight" in keys
    import os

    os.environ[tiny_llada_long.CHECKPOINT_ENV] = str(tmp_path)
    try:
        pipe = tiny_llada_long.build_tiny_llada_long()
    finally:
        del os.environ[tiny_llada_long.CHECKPOINT_ENV]
    assert pipe.fastgen_task == task
    ex = task.example(0)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([tok(ex.prompt)["input_ids"]])).logits
        want = pipe.model(input_ids=torch.tensor([tok(ex.prompt)["input_ids"]])).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_shipped_checkpoint_writes_correct_long_answers():
    """samples/tiny-llada-long answers held-out prompts exactly (Fast-dLLM dual cache + 0.9: ~11 steps,
    cheap; dense accuracy is in the model card), batch of two."""
    from fastgen.pipelines.tiny_llada_long import build_tiny_llada_long

    from fastgen.configs import FastDLLMConfig

    pipe = build_tiny_llada_long()
    task = pipe.fastgen_task
    examples = task.held_out(2)
    out = pipe(prompt=[e.prompt for e in examples], gen_length=256, acceleration=FastDLLMConfig(cache="dual"),
               progress=False)  # fmt: skip
    for text, e in zip(out.texts, examples):
        assert task.answer_of(e.prompt) == e.answer
        assert task.score(text, e.answer) == (True, 1.0)
    assert out.steps_run < 64
