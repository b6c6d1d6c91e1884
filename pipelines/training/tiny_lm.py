"""Train the shipped tiny diffusion LM (``samples/tiny-llada-kv``) on key-value retrieval, on a CPU.

Run: ``python -m fastgen.pipelines.training.tiny_lm --out DIR`` (seeded; the same command gives the same
weights on the same torch build and thread count; the defaults are the shipped checkpoint's settings:
6000 steps, about 30 minutes on 2 CPU cores). The model is LLaDA's architecture (a Llama block
run bidirectionally; RMSNorm, SwiGLU, RoPE, untied output) and is saved in LLaDA's published layout
(:mod:`fastgen.pipelines.training.common`), so :func:`fastgen.pipelines.lm_loaders.load_diffusion_lm`
loads it exactly like a real LLaDA checkpoint.

Objective: LLaDA's SFT form of the masked-diffusion loss. Per sequence a ratio ``t ~ U(eps, 1)`` is drawn,
each answer token is replaced by the mask token with probability ``t`` (the prompt stays clean), and the
loss is the cross-entropy on the masked tokens weighted by ``1 / t``, divided by the answer length.
Prompts are drawn with a haystack (filler words) that grows from ``--min-scale`` of the full size to
the full size over the first ``--curriculum`` fraction of the steps (short prompts are cheap and teach
the retrieval first), then stays mixed up to full length.
"""

from __future__ import annotations

import random

import torch

from ..diffusion_lm import bidirectional_mask
from ..kv_task import MASK_TOKEN_ID, KVTask
from . import common


def _batch(task: KVTask, tokenizer, rng: random.Random, size: int, scale: float):
    """``(ids [B, L], answer [B, L] bool)`` for ``size`` fresh instances with ``scale`` of the filler."""
    num_filler = round(scale * task.num_filler)
    rows, answers = [], []
    for _ in range(size):
        words, answer_words = task.sample(rng, num_filler)
        rows.append(tokenizer.convert_tokens_to_ids(words + answer_words))
        answers.append([False] * len(words) + [True] * len(answer_words))
    return torch.tensor(rows), torch.tensor(answers)


def _scale_for_step(step: int, args, rng: random.Random) -> float:
    """Curriculum: the prompt size cap grows from ``--min-scale`` to 1 over the first ``--curriculum``
    fraction of the steps; each batch draws its scale uniformly between ``--min-scale`` and the cap."""
    ramp = min(1.0, step / max(1, args.curriculum * args.steps))
    cap = args.min_scale + ramp * (1 - args.min_scale)
    return rng.uniform(args.min_scale, cap)


def diffusion_loss(model, ids, answer, gen: torch.Generator, eps: float = 1e-3):
    """LLaDA's SFT masked-diffusion loss on the answer tokens (``answer`` ``[B, L]`` bool) of ``ids``
    (:func:`~fastgen.pipelines.training.common.masked_diffusion_loss`) and the accuracy on the masked
    tokens."""
    out = common.masked_diffusion_loss(model, ids, answer, gen, MASK_TOKEN_ID, eps)
    hits = (out.logits.argmax(-1) == out.target) & out.masked
    token_acc = hits.sum() / out.masked.sum().clamp(min=1)
    return out.loss, float(token_acc)


@torch.no_grad()
def one_pass_accuracy(model, task: KVTask, tokenizer, count: int) -> float:
    """Exact match when every answer token is predicted from one fully masked forward (a quick proxy)."""
    model.eval()
    examples = task.held_out(count)
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(e.prompt.split()) for e in examples])
    start = ids.shape[1]
    full = torch.cat([ids, torch.full((count, task.num_fields), MASK_TOKEN_ID)], 1)
    attn = bidirectional_mask(torch.ones(full.shape, dtype=torch.bool), torch.float32)
    hits = 0
    for lo in range(0, count, 16):
        logits = model(
            input_ids=full[lo : lo + 16], attention_mask=attn[lo : lo + 16], use_cache=False
        ).logits
        pred = logits[:, start:].argmax(-1)
        for row, e in zip(pred.tolist(), examples[lo : lo + 16]):
            hits += tokenizer.convert_ids_to_tokens(row) == e.answer.split()
    model.train()
    return hits / count


def save_checkpoint(model, tokenizer, args, task: KVTask, folder: str) -> None:
    """Write ``config.json``, ``model.safetensors`` (LLaDA layout) and the tokenizer files to ``folder``."""
    task_info = {
        "name": "field-value retrieval",
        "num_fields": task.num_fields,
        "num_codes": task.num_codes,
        "num_filler": task.num_filler,
    }
    eps = float(model.config.rms_norm_eps)
    config = common.llada_config(args, len(tokenizer), eps, task_info=task_info, mask_token_id=MASK_TOKEN_ID)
    common.save_llada_checkpoint(model, tokenizer, folder, config)


def main(argv: list[str] | None = None) -> int:
    """Train (see the module docstring); ``argv`` as on the command line."""
    parser = common.training_parser(
        "python -m fastgen.pipelines.training.tiny_lm",
        __doc__,
        steps=6000,
        batch_tokens=4096,
        warmup=30,
        intermediate=256,
        max_positions=1024,
        eval_every=250,
        threads=2,
    )
    parser.add_argument(
        "--min-scale", type=float, default=0.03, help="smallest prompt, as a fraction of full"
    )
    parser.add_argument(
        "--curriculum", type=float, default=0.5, help="fraction of steps to ramp prompt length"
    )
    args = common.parse_training_args(parser, argv)
    task = KVTask()
    tokenizer = task.build_tokenizer()
    model = common.build_model(args, len(tokenizer))
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def step_loss(step: int):
        scale = _scale_for_step(step, args, rng)
        batch = max(1, round(args.batch_tokens / (scale * task.num_filler + 2 * task.num_fields + 2)))
        ids, answer = _batch(task, tokenizer, rng, batch, scale)
        loss, acc = diffusion_loss(model, ids, answer, gen)
        return loss, {"masked_token_acc": (acc, 1.0)}, {"scale": round(scale, 3), "batch": batch}

    def evaluate(model, final: bool) -> dict:
        if final:
            return {"held_out_one_pass_exact_256": one_pass_accuracy(model, task, tokenizer, 256)}
        return {"held_out_one_pass_exact": one_pass_accuracy(model, task, tokenizer, 64)}

    def save(trained) -> None:
        save_checkpoint(trained, tokenizer, args, task, args.out)

    common.train(model, args, step_loss, lr_floor=0.1, evaluate=evaluate, save=save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
