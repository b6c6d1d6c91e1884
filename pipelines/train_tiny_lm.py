"""Train the shipped tiny diffusion LM (``samples/tiny-llada-kv``) on key-value retrieval, on a CPU.

Run: ``python -m fastgen.pipelines.train_tiny_lm --out DIR`` (seeded; the same command gives the same
weights on the same torch build and thread count; the defaults are the shipped checkpoint's settings:
6000 steps, about 30 minutes on 2 CPU cores). The model is LLaDA's architecture (a Llama block
run bidirectionally; RMSNorm, SwiGLU, RoPE, untied output) and is saved in LLaDA's published layout
(``config.json`` with ``model_type: "llada"`` and OLMo-style fields, ``model.safetensors`` with
``model.transformer.blocks.{i}.q_proj.weight`` ... keys), so :func:`fastgen.pipelines.lm_loaders.load_diffusion_lm`
loads it exactly like a real LLaDA checkpoint.

Objective: LLaDA's SFT form of the masked-diffusion loss. Per sequence a ratio ``t ~ U(eps, 1)`` is drawn,
each answer token is replaced by the mask token with probability ``t`` (the prompt stays clean), and the
loss is the cross-entropy on the masked tokens weighted by ``1 / t``, divided by the answer length.
Prompts are drawn with a haystack (filler words) that grows from ``--min-scale`` of the full size to
the full size over the first ``--curriculum`` fraction of the steps (short prompts are cheap and teach
the retrieval first), then stays mixed up to full length.
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

import torch

from .diffusion_lm import bidirectional_mask
from .kv_task import MASK_TOKEN_ID, KVTask

logger = logging.getLogger(__name__)

# Official LLaDA weight names, stated here from the published checkpoint (GSAI-ML/LLaDA-8B-*), independent
# of the loader's own table: native Llama name -> LLaDA name.
_LLAMA_TO_LLADA_BLOCK = {
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
_LLAMA_TO_LLADA_TOP = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
}


def llada_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights of a native ``LlamaForCausalLM`` under LLaDA's published key names."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name in _LLAMA_TO_LLADA_TOP:
            out[_LLAMA_TO_LLADA_TOP[name]] = tensor
            continue
        parts = name.split(".")  # model.layers.{i}.{module}.{sub}.weight
        if parts[:2] != ["model", "layers"]:
            raise ValueError(f"unexpected weight {name!r}")
        module = ".".join(parts[3:-1])
        out[f"model.transformer.blocks.{parts[2]}.{_LLAMA_TO_LLADA_BLOCK[module]}.{parts[-1]}"] = tensor
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def llada_config(args, vocab_size: int, task: KVTask, rms_norm_eps: float) -> dict:
    """``config.json`` in LLaDA's published field names (``LLaDAModelLM``, OLMo-style)."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": args.hidden,
        "embedding_dropout": 0.0,
        "embedding_size": vocab_size,
        "eos_token_id": 2,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": MASK_TOKEN_ID,
        "max_sequence_length": args.max_positions,
        "mlp_hidden_size": args.intermediate,
        "mlp_ratio": args.intermediate // args.hidden,
        "multi_query_attention": None,
        "n_heads": args.heads,
        "n_kv_heads": args.heads,
        "n_layers": args.layers,
        "pad_token_id": 0,
        "precision": "fp32",
        "residual_dropout": 0.0,
        "rms_norm_eps": rms_norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": args.rope_theta,
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": vocab_size,
        "weight_tying": False,
        "fastgen_task": {
            "name": "field-value retrieval",
            "num_fields": task.num_fields,
            "num_codes": task.num_codes,
            "num_filler": task.num_filler,
        },
    }


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
    """LLaDA's SFT masked-diffusion loss on the answer tokens (``answer`` ``[B, L]`` bool) of ``ids``.

    ``t`` is drawn stratified over the batch (row ``i`` in ``[i/B, (i+1)/B)``), which lowers the variance
    of the ``1/t``-weighted loss without changing its expectation. A row may get no masked token (small
    ``t``); it then adds nothing, which keeps the estimate unbiased (forcing one mask would weight it ``1/t``
    times too much).
    """
    b, n = ids.shape
    t = ((torch.arange(b) + torch.rand(b, generator=gen)) / b)[torch.randperm(b, generator=gen)]
    t = ((1 - eps) * t + eps)[:, None]
    masked = (torch.rand(b, n, generator=gen) < t) & answer
    noisy = torch.where(masked, torch.full_like(ids, MASK_TOKEN_ID), ids)
    attn = bidirectional_mask(torch.ones(b, n, dtype=torch.bool), torch.float32)
    first = int(torch.nonzero(answer.any(0)).min())
    logits = model(input_ids=noisy, attention_mask=attn, use_cache=False).logits[:, first:]
    target, masked = ids[:, first:], masked[:, first:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    answer_len = answer.sum(1, keepdim=True).clamp(min=1)
    loss = (ce * masked / t / answer_len).sum() / b
    token_acc = ((logits.argmax(-1) == target) & masked).sum() / masked.sum().clamp(min=1)
    return loss, float(token_acc)


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
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        config = llada_config(args, len(tokenizer), task, float(model.config.rms_norm_eps))
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(llada_state_dict(model), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen.pipelines.train_tiny_lm", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (checkpoint, train_log.jsonl)")
    parser.add_argument("--steps", type=int, default=6000, help="length of the learning-rate schedule")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps (the schedule stays --steps)"
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=4096, help="tokens per batch (rows vary with length)"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the initial weights")
    parser.add_argument(
        "--min-scale", type=float, default=0.03, help="smallest prompt, as a fraction of full"
    )
    parser.add_argument(
        "--curriculum", type=float, default=0.5, help="fraction of steps to ramp prompt length"
    )
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_tokens", "hidden", "heads", "layers", "intermediate", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from .tiny_lm import build_tiny_llama

    task = KVTask()
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
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "train_log.jsonl")
    log = open(log_path, "w")
    params = sum(p.numel() for p in model.parameters())
    log.write(json.dumps({"event": "start", "args": vars(args), "parameters": params}) + "\n")
    logger.info("training %d parameters for %d steps -> %s", params, args.steps, args.out)
    start = time.perf_counter()
    window = []
    run_steps = min(args.steps, args.stop_after or args.steps)
    for step in range(run_steps):
        scale = _scale_for_step(step, args, rng)
        batch = max(1, round(args.batch_tokens / (scale * task.num_filler + 2 * task.num_fields + 2)))
        ids, answer = _batch(task, tokenizer, rng, batch, scale)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, acc = diffusion_loss(model, ids, answer, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append((float(loss.detach()), acc))
        if (step + 1) % 25 == 0:
            mean_loss = sum(w[0] for w in window) / len(window)
            mean_acc = sum(w[1] for w in window) / len(window)
            window = []
            record = {
                "step": step + 1,
                "loss": round(mean_loss, 4),
                "masked_token_acc": round(mean_acc, 4),
                "scale": round(scale, 3),
                "batch": batch,
                "lr": round(lr_at(step), 6),
                "wall_s": round(time.perf_counter() - start, 1),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
            if (step + 1) % args.eval_every == 0 or step + 1 == run_steps:
                record["held_out_one_pass_exact"] = one_pass_accuracy(model, task, tokenizer, 64)
                save_checkpoint(model.eval(), tokenizer, args, task, args.out)
                model.train()
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("%s", record)
    model.eval()
    save_checkpoint(model, tokenizer, args, task, args.out)
    final = {
        "event": "done",
        "steps": run_steps,
        "wall_s": round(time.perf_counter() - start, 1),
        "held_out_one_pass_exact_256": one_pass_accuracy(model, task, tokenizer, 256),
    }
    log.write(json.dumps(final) + "\n")
    log.close()
    logger.info("%s", final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
