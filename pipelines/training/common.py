"""What the tiny diffusion-LM trainers share (training code; the library never imports it).

- LLaDA's SFT masked-diffusion loss (:func:`masked_diffusion_loss`): per sequence a ratio ``t ~ U(eps, 1)``
  (stratified over the batch), each generation position masked with probability ``t``, the cross-entropy on
  the masked positions weighted ``1/t`` and divided by the sequence's generation length.
- The model (:func:`build_model`: LLaDA's architecture, a Llama block run bidirectionally), AdamW with
  decoupled weight decay on the matrices, a warm-up then cosine schedule (:func:`cosine_lr`).
- The loop (:func:`train`): steps, a ``train_log.jsonl`` record every 25 steps, an evaluation and a
  checkpoint every ``--eval-every`` steps, then a final checkpoint and evaluation.
- LLaDA's published checkpoint layout (:func:`llada_config`, :func:`llada_state_dict`,
  :func:`save_llada_checkpoint`): ``config.json`` with ``model_type: "llada"`` and OLMo-style fields,
  ``model.safetensors`` with ``model.transformer.blocks.{i}.q_proj.weight`` ... keys, so
  :func:`fastgen.pipelines.lm_loaders.load_diffusion_lm` loads it exactly like a real LLaDA checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..diffusion_lm import bidirectional_mask
from ..tiny_lm import build_tiny_llama

logger = logging.getLogger(__name__)

LOG_EVERY = 25
"""Steps per ``train_log.jsonl`` record (losses and accuracies averaged over them)."""

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


def llada_config(
    args, vocab_size: int, rms_norm_eps: float, *, task_info: dict, mask_token_id: int, eos_token_id: int = 2
) -> dict:
    """``config.json`` in LLaDA's published field names (``LLaDAModelLM``, OLMo-style) for the model sizes
    in ``args`` (``hidden``, ``heads``, ``layers``, ``intermediate``, ``max_positions``, ``rope_theta``);
    ``task_info`` is stored as ``fastgen_task`` (what the presets read back)."""
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
        "eos_token_id": eos_token_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": mask_token_id,
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
        "fastgen_task": task_info,
    }


def save_llada_checkpoint(model, tokenizer, folder: str, config: dict) -> None:
    """Write ``config`` as ``config.json``, the weights as ``model.safetensors`` (LLaDA's key names) and
    the tokenizer files to ``folder``."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(llada_state_dict(model), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


class MaskedDiffusionLoss(NamedTuple):
    """One batch's loss and what the trainers' accuracies are computed from (from the first generation
    position on: ``[:, first:]``)."""

    loss: torch.Tensor
    """Scalar loss (differentiable)."""
    logits: torch.Tensor
    """``[B, L - first, V]`` logits of the noisy input."""
    target: torch.Tensor
    """``[B, L - first]`` clean token ids."""
    masked: torch.Tensor
    """bool ``[B, L - first]`` positions that were masked."""
    first: int
    """First generation position of any row."""


def masked_diffusion_loss(
    model, ids, positions, gen: torch.Generator, mask_token_id: int, eps: float = 1e-3
) -> MaskedDiffusionLoss:
    """LLaDA's SFT masked-diffusion loss on the generation ``positions`` (bool ``[B, L]``) of ``ids``.

    ``t`` is drawn stratified over the batch (row ``i`` in ``[i/B, (i+1)/B)``), which lowers the variance
    of the ``1/t``-weighted loss without changing its expectation. A row may get no masked token (small
    ``t``); it then adds nothing, which keeps the estimate unbiased (forcing one mask would weight it ``1/t``
    times too much). The prompt (``positions`` False) stays clean.
    """
    b, n = ids.shape
    t = ((torch.arange(b) + torch.rand(b, generator=gen)) / b)[torch.randperm(b, generator=gen)]
    t = ((1 - eps) * t + eps)[:, None]
    masked = (torch.rand(b, n, generator=gen) < t) & positions
    noisy = torch.where(masked, torch.full_like(ids, mask_token_id), ids)
    attn = bidirectional_mask(torch.ones(b, n, dtype=torch.bool), torch.float32)
    first = int(torch.nonzero(positions.any(0)).min())
    logits = model(input_ids=noisy, attention_mask=attn, use_cache=False).logits[:, first:]
    target, masked = ids[:, first:], masked[:, first:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    length = positions.sum(1, keepdim=True).clamp(min=1)
    loss = (ce * masked / t / length).sum() / b
    return MaskedDiffusionLoss(loss, logits, target, masked, first)


def training_parser(
    prog: str,
    description: str,
    *,
    steps: int,
    batch_tokens: int,
    warmup: int,
    intermediate: int,
    max_positions: int,
    eval_every: int,
    threads: int,
) -> argparse.ArgumentParser:
    """The options both trainers take (model sizes, schedule, loop, seed), with the given defaults; a
    trainer adds its task's own."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="output folder (checkpoint, train_log.jsonl)")
    parser.add_argument("--steps", type=int, default=steps, help="length of the learning-rate schedule")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps (the schedule stays --steps)"
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=batch_tokens, help="tokens per batch (rows vary with length)"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=intermediate)
    parser.add_argument("--max-positions", type=int, default=max_positions)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the initial weights")
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check ``argv`` (sizes and counts >= 1, else the parser's error), then set up the run:
    logging to stdout, ``--threads`` torch threads, ``--seed``."""
    args = parser.parse_args(argv)
    for name in (
        "steps",
        "batch_tokens",
        "hidden",
        "heads",
        "layers",
        "intermediate",
        "eval_every",
        "threads",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def build_model(args: argparse.Namespace, vocab_size: int):
    """The tiny Llama (LLaDA's block) of the sizes in ``args``, seeded with ``--seed``, in train mode;
    a ``--rope-theta`` other than 10000 rebuilds its rotary table."""
    sizes = {
        name: getattr(args, name) for name in ("hidden", "heads", "layers", "intermediate", "max_positions")
    }
    model = build_tiny_llama(vocab_size, **sizes, seed=args.seed, initializer_range=args.init_std)
    if args.rope_theta != 10000.0:  # build_tiny_llama's default base; rebuild the rotary table
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        model.config.rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
        model.model.rotary_emb = LlamaRotaryEmbedding(model.config)
    return model.train()


def adamw(model, lr: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.98) with weight decay 0.01 on the matrices and none on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )


def cosine_lr(step: int, args: argparse.Namespace, floor: float) -> float:
    """Learning rate of ``step``: linear warm-up over ``--warmup`` steps, then a cosine from ``--lr`` down
    to ``floor * --lr`` at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


StepLoss = Callable[[int], tuple[torch.Tensor, dict[str, tuple[float, float]], dict]]
"""``step -> (loss, ratios, last)``: the batch's loss, accuracies as ``name -> (hits, count)`` (summed
over a record's steps, logged as ``hits / count``) and values logged as they are at the record's step."""


class _Window:
    """Losses and accuracy sums of the steps since the last record."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sums: dict[str, list[float]] = {}

    def add(self, loss: float, ratios: dict[str, tuple[float, float]]) -> None:
        self.losses.append(loss)
        for name, (hits, count) in ratios.items():
            total = self.sums.setdefault(name, [0.0, 0.0])
            total[0] += hits
            total[1] += count

    def flush(self) -> dict:
        out = {"loss": round(sum(self.losses) / len(self.losses), 4)}
        out.update({name: round(h / max(c, 1), 4) for name, (h, c) in self.sums.items()})
        self.losses, self.sums = [], {}
        return out


def train(
    model,
    args: argparse.Namespace,
    step_loss: StepLoss,
    *,
    lr_floor: float,
    evaluate: Callable[[object, bool], dict],
    save: Callable[[object], None],
    time_limit: float | None = None,
) -> dict:
    """Train ``model`` for ``min(--steps, --stop-after)`` steps (or until ``time_limit`` seconds) with
    :func:`adamw`, :func:`cosine_lr` and gradients clipped to norm 1, writing ``train_log.jsonl`` in
    ``--out``: a start line, a record every :data:`LOG_EVERY` steps and at the last one (with
    ``evaluate(model, False)`` and a checkpoint by ``save`` every ``--eval-every`` steps and at the
    last), and a done line with ``evaluate(model, True)`` after the final ``save``. Returns that line."""
    opt = adamw(model, args.lr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_log.jsonl"), "w") as log:
        params = sum(p.numel() for p in model.parameters())
        log.write(json.dumps({"event": "start", "args": vars(args), "parameters": params}) + "\n")
        logger.info("training %d parameters for %d steps -> %s", params, args.steps, args.out)
        start = time.perf_counter()
        window = _Window()
        run_steps = min(args.steps, args.stop_after or args.steps)
        done = 0
        for step in range(run_steps):
            lr = cosine_lr(step, args, lr_floor)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, ratios, last = step_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done = step + 1
            window.add(float(loss.detach()), ratios)
            if done % LOG_EVERY == 0 or done == run_steps:
                record = {"step": done, **window.flush(), **last, "lr": round(lr, 6)}
                record["wall_s"] = round(time.perf_counter() - start, 1)
                record["loadavg"] = [round(x, 2) for x in os.getloadavg()]
                if done % args.eval_every == 0 or done == run_steps:
                    record.update(evaluate(model, False))
                    save(model.eval())
                    model.train()
                log.write(json.dumps(record) + "\n")
                log.flush()
                logger.info("%s", record)
            if time_limit and time.perf_counter() - start > time_limit:
                logger.info("time limit reached at step %d", done)
                break
        model.eval()
        save(model)
        final = {"event": "done", "steps": done, "wall_s": round(time.perf_counter() - start, 1)}
        final.update(evaluate(model, True))
        log.write(json.dumps(final) + "\n")
    logger.info("%s", final)
    return final
