"""Train ``samples/tiny-llada-long``: a tiny LLaDA on the ledger task (long answers), on a CPU.

Run (the shipped checkpoint's command; seeded, one thread):

    nice -n 5 python -m fastgen.pipelines.training.long_lm --out samples/tiny-llada-long

The model is LLaDA's architecture (a Llama block run bidirectionally) saved in LLaDA's published layout
(``model_type: "llada"``, ``model.transformer.blocks.{i}.q_proj.weight`` ... keys, written by
:func:`fastgen.pipelines.training.common.llada_state_dict`), so
:func:`fastgen.pipelines.lm_loaders.load_diffusion_lm` loads it like a real LLaDA checkpoint.

Objective: LLaDA's SFT masked-diffusion loss. Per sequence ``t ~ U(eps, 1)`` (stratified over the batch);
each answer position (the 256 answer tokens and the EOS padding up to the sequence's generation length,
as LLaDA pads its SFT answers) is masked with probability ``t``; the loss is the cross-entropy on masked
positions weighted ``1/t`` and divided by the generation length. Each batch draws one generation length
(256, 512 or 1024 with probabilities ``--mix``) and as many rows as fit ``--batch-tokens``.

The log (``train_log.jsonl``) records every 25 steps the loss and the masked-token accuracy split into
line tokens, running totals and EOS, and every ``--eval-every`` steps two held-out proxies of dense
decoding (:func:`proxies`); the real held-out accuracy is measured by ``fastgen.bench.long_answers``.
"""

from __future__ import annotations

import random

import torch

from ..diffusion_lm import bidirectional_mask
from ..long_task import EOS_TOKEN_ID, LINE_TOKENS, MASK_TOKEN_ID, LedgerTask
from . import common

GEN_LENGTHS = (256, 512, 1024)
"""Generation lengths trained on (the answer is 256 tokens; the rest is EOS)."""


def make_batch(task: LedgerTask, tokenizer, rng: random.Random, rows: int, gen_length: int):
    """``(ids [B, L], gen [B, L] bool, kind [B, L] long)``: kind 0 prompt, 1 copied, 2 total, 3 EOS."""
    ids, kinds = [], []
    for _ in range(rows):
        prompt, answer = task.sample(rng)
        tail = [EOS_TOKEN_ID] * (gen_length - len(answer))
        ids.append(tokenizer.convert_tokens_to_ids(prompt) + tokenizer.convert_tokens_to_ids(answer) + tail)
        kind = [1 if (i % LINE_TOKENS) != LINE_TOKENS - 1 else 2 for i in range(len(answer))]
        kinds.append([0] * len(prompt) + kind + [3] * len(tail))
    kind = torch.tensor(kinds)
    return torch.tensor(ids), kind > 0, kind


def diffusion_loss(model, ids, gen, kind, gen_torch: torch.Generator, eps: float = 1e-3):
    """LLaDA's SFT masked-diffusion loss over the generation positions
    (:func:`~fastgen.pipelines.training.common.masked_diffusion_loss`); also the masked-token accuracy
    per kind as ``name -> (hits, count)``."""
    out = common.masked_diffusion_loss(model, ids, gen, gen_torch, MASK_TOKEN_ID, eps)
    hit = (out.logits.argmax(-1) == out.target) & out.masked
    kind = kind[:, out.first :]
    acc = {}
    for name, k in (("copy", 1), ("total", 2), ("eos", 3)):
        sel = out.masked & (kind == k)
        acc[name] = (float(hit[sel].sum()), float(sel.sum()))
    return out.loss, acc


@torch.no_grad()
def proxies(model, task: LedgerTask, tokenizer, count: int) -> dict:
    """Held-out proxies of dense decoding: one forward with the whole answer masked (accuracy of its first
    line, which follows from the prompt alone), and the next line's accuracy when the answer is revealed
    up to a random line ``k`` (the rest masked)."""
    model.eval()
    examples = task.held_out(count)
    prompt = torch.tensor([tokenizer.convert_tokens_to_ids(e.prompt.split()) for e in examples])
    answer = torch.tensor([tokenizer.convert_tokens_to_ids(e.answer.split()) for e in examples])
    p, a = prompt.shape[1], answer.shape[1]
    attn = bidirectional_mask(torch.ones(count, p + a, dtype=torch.bool), torch.float32)
    full = torch.cat([prompt, torch.full_like(answer, MASK_TOKEN_ID)], 1)
    pred = model(input_ids=full, attention_mask=attn, use_cache=False).logits[:, p:].argmax(-1)
    first_line = float((pred == answer)[:, :LINE_TOKENS].float().mean())
    gen = torch.Generator().manual_seed(0)
    k = torch.randint(0, task.num_lines, (count,), generator=gen)
    line = torch.arange(a) // LINE_TOKENS
    hide = line[None, :] >= k[:, None]
    chain = torch.cat([prompt, torch.where(hide, torch.full_like(answer, MASK_TOKEN_ID), answer)], 1)
    pred = model(input_ids=chain, attention_mask=attn, use_cache=False).logits[:, p:].argmax(-1)
    target = line[None, :] == k[:, None]
    next_line_acc = float(((pred == answer) & target).sum() / target.sum())
    model.train()
    return {"one_pass_first_line_acc": round(first_line, 4), "next_line_acc": round(next_line_acc, 4)}


def save_checkpoint(model, tokenizer, args, task: LedgerTask, folder: str) -> None:
    """``config.json`` (LLaDA fields + ``fastgen_task``), ``model.safetensors`` (LLaDA keys), tokenizer."""
    config = common.llada_config(
        args,
        len(tokenizer),
        float(model.config.rms_norm_eps),
        task_info={"name": "ledger", "num_lines": task.num_lines},
        mask_token_id=MASK_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    common.save_llada_checkpoint(model, tokenizer, folder, config)


def main(argv: list[str] | None = None) -> int:
    """Train (see the module docstring); ``argv`` as on the command line."""
    parser = common.training_parser(
        "python -m fastgen.pipelines.training.long_lm",
        __doc__.split("\n")[0],
        steps=3000,
        batch_tokens=3072,
        warmup=50,
        intermediate=384,
        max_positions=2048,
        eval_every=100,
        threads=1,
    )
    parser.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--mix", type=str, default="0.6,0.15,0.25", help="P(gen 256), P(512), P(1024)")
    parser.add_argument("--num-lines", type=int, default=32)
    args = common.parse_training_args(parser, argv)
    mix = [float(x) for x in args.mix.split(",")]
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        parser.error(f"--mix={args.mix!r} must be three non-negative weights")
    task = LedgerTask(num_lines=args.num_lines)
    tokenizer = task.build_tokenizer()
    model = common.build_model(args, len(tokenizer))
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def step_loss(step: int):
        gen_length = rng.choices(GEN_LENGTHS, weights=mix)[0]
        rows = max(1, round(args.batch_tokens / (task.prompt_length() + gen_length)))
        ids, is_gen, kind = make_batch(task, tokenizer, rng, rows, gen_length)
        loss, acc = diffusion_loss(model, ids, is_gen, kind, gen)
        return loss, {f"masked_acc_{name}": value for name, value in acc.items()}, {}

    def evaluate(model, final: bool) -> dict:
        return proxies(model, task, tokenizer, 64 if final else 32)

    def save(trained) -> None:
        save_checkpoint(trained, tokenizer, args, task, args.out)

    common.train(
        model, args, step_loss, lr_floor=0.05, evaluate=evaluate, save=save, time_limit=args.time_limit
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
