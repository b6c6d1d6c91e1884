"""Train ``samples/tiny-llada-long``: a tiny LLaDA on the ledger task (long answers), on a CPU.

Run (the shipped checkpoint's command; seeded, one thread):

    nice -n 5 python scripts/train_long_lm.py --out samples/tiny-llada-long

The model is LLaDA's architecture (a Llama block run bidirectionally) saved in LLaDA's published layout
(``model_type: "llada"``, ``model.transformer.blocks.{i}.q_proj.weight`` ... keys, written by
:func:`fastgen.pipelines.train_tiny_lm.llada_state_dict`), so
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

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import torch
from fastgen.pipelines.diffusion_lm import bidirectional_mask
from fastgen.pipelines.long_task import EOS_TOKEN_ID, LINE_TOKENS, MASK_TOKEN_ID, LedgerTask
from fastgen.pipelines.tiny_lm import build_tiny_llama
from fastgen.pipelines.train_tiny_lm import llada_config, llada_state_dict

logger = logging.getLogger("train_long_lm")

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
    """LLaDA's SFT masked-diffusion loss over the generation positions; also accuracies per kind."""
    b, n = ids.shape
    t = ((torch.arange(b) + torch.rand(b, generator=gen_torch)) / b)[torch.randperm(b, generator=gen_torch)]
    t = ((1 - eps) * t + eps)[:, None]
    masked = (torch.rand(b, n, generator=gen_torch) < t) & gen
    noisy = torch.where(masked, torch.full_like(ids, MASK_TOKEN_ID), ids)
    attn = bidirectional_mask(torch.ones(b, n, dtype=torch.bool), torch.float32)
    first = int(torch.nonzero(gen.any(0)).min())
    logits = model(input_ids=noisy, attention_mask=attn, use_cache=False).logits[:, first:]
    target, masked, kind = ids[:, first:], masked[:, first:], kind[:, first:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    loss = (ce * masked / t / gen[:, first:].sum(1, keepdim=True).clamp(min=1)).sum() / b
    hit = (logits.argmax(-1) == target) & masked
    acc = {}
    for name, k in (("copy", 1), ("total", 2), ("eos", 3)):
        sel = masked & (kind == k)
        acc[name] = (float(hit[sel].sum()), float(sel.sum()))
    return loss, acc


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
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    shim = SimpleNamespace(num_fields=0, num_codes=0, num_filler=0)
    config = llada_config(args, len(tokenizer), shim, float(model.config.rms_norm_eps))
    config["fastgen_task"] = {"name": "ledger", "num_lines": task.num_lines}
    config["eos_token_id"] = EOS_TOKEN_ID
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(llada_state_dict(model), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/train_long_lm.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (checkpoint, train_log.jsonl)")
    parser.add_argument(
        "--steps", type=int, default=3000, help="length of the learning-rate schedule (cosine)"
    )
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--batch-tokens", type=int, default=3072, help="tokens per batch")
    parser.add_argument("--mix", type=str, default="0.6,0.15,0.25", help="P(gen 256), P(512), P(1024)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--max-positions", type=int, default=2048)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--num-lines", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    mix = [float(x) for x in args.mix.split(",")]
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        parser.error(f"--mix={args.mix!r} must be three non-negative weights")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    task = LedgerTask(num_lines=args.num_lines)
    tokenizer = task.build_tokenizer()
    model = build_tiny_llama(
        len(tokenizer),
        hidden=args.hidden,
        heads=args.heads,
        layers=args.layers,
        intermediate=args.intermediate,
        max_positions=args.max_positions,
        seed=args.seed,
        initializer_range=args.init_std,
    )
    if args.rope_theta != 10000.0:  # build_tiny_llama's default base; rebuild the rotary table
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        model.config.rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
        model.model.rotary_emb = LlamaRotaryEmbedding(model.config)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "train_log.jsonl"), "w")
    params = sum(p.numel() for p in model.parameters())
    log.write(json.dumps({"event": "start", "args": vars(args), "parameters": params}) + "\n")
    logger.info("training %d parameters for %d steps -> %s", params, args.steps, args.out)
    start = time.perf_counter()
    window_loss, sums = [], {}
    run_steps = min(args.steps, args.stop_after or args.steps)
    step = 0
    for step in range(run_steps):
        gen_length = rng.choices(GEN_LENGTHS, weights=mix)[0]
        rows = max(1, round(args.batch_tokens / (task.prompt_length() + gen_length)))
        ids, is_gen, kind = make_batch(task, tokenizer, rng, rows, gen_length)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, acc = diffusion_loss(model, ids, is_gen, kind, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window_loss.append(float(loss.detach()))
        for name, (h, c) in acc.items():
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] += h
            s[1] += c
        if (step + 1) % 25 == 0 or step + 1 == run_steps:
            record = {
                "step": step + 1,
                "loss": round(sum(window_loss) / len(window_loss), 4),
                **{f"masked_acc_{k}": round(h / max(c, 1), 4) for k, (h, c) in sums.items()},
                "lr": round(lr_at(step), 6),
                "wall_s": round(time.perf_counter() - start, 1),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
            window_loss, sums = [], {}
            if (step + 1) % args.eval_every == 0 or step + 1 == run_steps:
                record.update(proxies(model, task, tokenizer, 32))
                save_checkpoint(model.eval(), tokenizer, args, task, args.out)
                model.train()
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("%s", record)
        if args.time_limit and time.perf_counter() - start > args.time_limit:
            logger.info("time limit reached at step %d", step + 1)
            break
    model.eval()
    save_checkpoint(model, tokenizer, args, task, args.out)
    final = {"event": "done", "steps": step + 1, "wall_s": round(time.perf_counter() - start, 1)}
    final.update(proxies(model, task, tokenizer, 64))
    log.write(json.dumps(final) + "\n")
    log.close()
    logger.info("%s", final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
