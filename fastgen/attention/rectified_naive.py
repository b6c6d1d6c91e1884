"""Plain-PyTorch ground truth of Rectified SpaAttn (fla's ``naive.py``): the method of
:mod:`fastgen.attention.rectified` written out one (batch, head) at a time in fp64, with explicit
per-block means, explicit sorts and one dense softmax over the listed keys. Slow (``O(N^2)``
memory per head); for tests at small shapes only. It shares only the token layout
(:func:`~fastgen.attention.blocks.tile_permutation`) with the fast path.
"""

from __future__ import annotations

import math

import torch

from fastgen.configs import RectifiedSpaAttnConfig

from .blocks import default_tile, tile_permutation


def _blocks(n: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(n, s + size)) for s in range(0, n, size)]


def _mean(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x[rows].mean(0) if rows.numel() else torch.zeros(x.shape[-1], dtype=x.dtype)


def _mass(qbar, kbar, counts, text_k, scale):
    """IPAR for pooled queries ``[nq, D]`` over pooled keys ``[nk, D]`` with weights ``counts`` and
    text keys ``[T, D]``: block mass ``[nq, nk]`` and text mass ``[nq]``."""
    video = qbar @ kbar.T * scale + torch.log(counts)[None, :]
    text = qbar @ text_k.T * scale
    norm = torch.logsumexp(torch.cat([video, text], -1), -1, keepdim=True)
    return torch.exp(video - norm), torch.exp(text - norm).sum(-1)


def rectified_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: RectifiedSpaAttnConfig,
    *,
    num_text_tokens: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    grid: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Rectified SpaAttn on ``[B, H, N, D]`` (text last); returns ``(out in q's dtype, info)`` with
    ``info["block_mask"]`` / ``info["compensated_mask"]`` bool ``[B, H, nb, nb]``."""
    b, h, n, d = q.shape
    bs = config.block_size
    n_video = n - num_text_tokens
    scale = 1.0 / math.sqrt(d)
    valid_all = torch.ones(b, n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.cpu()
    if grid is not None and config.reorder:
        perm = tile_permutation(tuple(grid), default_tile(bs))
    else:
        perm = torch.arange(n_video)
    blocks = _blocks(n_video, bs)
    nb = len(blocks)
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    critical_all = torch.zeros(b, h, nb, nb, dtype=torch.bool)
    compensated_all = torch.zeros_like(critical_all)
    rate = config.resolved_isolated_keys
    fewest = int(valid_all[:, :n_video].sum(-1).min())
    n_isolated = min(round(rate * nb), fewest) if rate > 0 else 0
    neighbours = _neighbours(grid, perm, blocks) if config.selection == "paper" and grid is not None else None

    for bi in range(b):
        valid = valid_all[bi, :n_video][perm]
        text_valid = valid_all[bi, n_video:]
        for hi in range(h):
            Q = q[bi, hi, :n_video].double()[perm]
            K = k[bi, hi, :n_video].double()[perm]
            V = v[bi, hi, :n_video].double()[perm]
            Kt = k[bi, hi, n_video:].double()[text_valid]
            Vt = v[bi, hi, n_video:].double()[text_valid]
            real = [blk[valid[blk]] for blk in blocks]  # valid tokens of each block
            counts = torch.tensor([float(r.numel()) for r in real], dtype=torch.float64)
            qbar = torch.stack([_mean(Q, r) for r in real])
            kbar = torch.stack([_mean(K, r) for r in real])
            vbar = torch.stack([_mean(V, r) for r in real])

            # estimate
            if config.selection == "subblock":
                sub = bs // config.pool_splits
                subs = [blk[(blk - blk[0]) // sub == s] for blk in blocks for s in range(config.pool_splits)]
                sub_real = [s[valid[s]] if s.numel() else s for s in subs]
                sub_counts = torch.tensor([float(r.numel()) for r in sub_real], dtype=torch.float64)
                sq = torch.stack([_mean(Q, r) for r in sub_real])
                sk = torch.stack([_mean(K, r) for r in sub_real])
                p_sub, t_sub = _mass(sq, sk, sub_counts, Kt, scale)
                s = config.pool_splits
                probs = torch.zeros(nb, nb, dtype=torch.float64)
                text_mass = torch.zeros(nb, dtype=torch.float64)
                for i in range(nb):
                    w = sub_counts[i * s : (i + 1) * s]
                    per_key = p_sub[i * s : (i + 1) * s].view(s, nb, s).sum(-1)  # [s, nb]
                    probs[i] = (w[:, None] * per_key).sum(0) / w.sum().clamp_min(1.0)
                    text_mass[i] = (w * t_sub[i * s : (i + 1) * s]).sum() / w.sum().clamp_min(1.0)
            else:
                probs, text_mass = _mass(qbar, kbar, counts, Kt, scale)
            block_ok = counts > 0

            # critical blocks
            critical = torch.zeros(nb, nb, dtype=torch.bool)
            for i in range(nb):
                if config.selection == "paper":
                    entries = [(float(probs[i, j]) if block_ok[j] else 0.0, j) for j in range(nb)]
                    if num_text_tokens:
                        entries.append((float(text_mass[i]), -1))
                    entries.sort(key=lambda e: -e[0])
                    threshold = 0.3 if config.mass_threshold is None else config.mass_threshold
                    cumulative, below = 0.0, 0
                    for mass, _ in entries:
                        cumulative += mass
                        below += cumulative <= threshold
                    keep = max(below + 1, max(1, int((1.0 - config.sparsity) * len(entries))))
                    for _, j in entries[:keep]:
                        if j >= 0:
                            critical[i, j] = True
                    if neighbours is not None:
                        critical[i] |= neighbours[i]
                else:
                    topk = max(1, min(nb, math.ceil((1.0 - config.sparsity) * nb - 1e-9)))
                    order = sorted(range(nb), key=lambda j: -(float(probs[i, j]) if block_ok[j] else -1.0))
                    for j in order[:topk]:
                        critical[i, j] = True
                    if config.mass_threshold is not None:
                        before = float(text_mass[i])
                        for j in sorted(
                            range(nb), key=lambda j: -(float(probs[i, j]) if block_ok[j] else 0.0)
                        ):
                            if before < config.mass_threshold:
                                critical[i, j] = True
                            before += float(probs[i, j]) if block_ok[j] else 0.0
                critical[i] &= block_ok
            dropped = block_ok[None, :] & ~critical

            # GAPR
            if config.form == "none":
                compensated = torch.zeros_like(dropped)
            elif config.gapr:
                a = torch.stack(
                    [(Q[r] - qbar[i]).abs().mean(0) if r.numel() else qbar[i] * 0 for i, r in enumerate(real)]
                )
                bdev = torch.stack(
                    [(K[r] - kbar[j]).abs().mean(0) if r.numel() else kbar[j] * 0 for j, r in enumerate(real)]
                )
                gain = (qbar @ kbar.T).abs()
                error = (a @ kbar.T).abs() + (qbar @ bdev.T).abs()
                compensated = dropped & ((gain > error) | (error <= 0))
            else:
                compensated = dropped.clone()

            # isolated keys: farthest from their block's mean
            isolated = torch.zeros(n_video, dtype=torch.bool)
            if n_isolated:
                owner_mean = torch.stack([kbar[j // bs] for j in range(n_video)])
                distance = (K - owner_mean).norm(dim=-1).masked_fill(~valid, float("-inf"))
                isolated[distance.topk(n_isolated).indices] = True

            # outputs of the video queries, one query block at a time
            for i, blk in enumerate(blocks):
                logits, values = [], []
                for j, kblk in enumerate(real):
                    if critical[i, j]:
                        logits.append(Q[blk] @ K[kblk].T * scale)
                        values.append(V[kblk])
                logits.append(Q[blk] @ Kt.T * scale)
                values.append(Vt)
                if config.form != "paper":
                    for j, kblk in enumerate(real):
                        if critical[i, j]:
                            continue
                        iso = kblk[isolated[kblk]]
                        if iso.numel():
                            logits.append(Q[blk] @ K[iso].T * scale)
                            values.append(V[iso])
                        pool = kblk[~isolated[kblk]]
                        if config.form == "exact" and compensated[i, j] and pool.numel():
                            mk, mv = K[pool].mean(0), V[pool].mean(0)
                            logits.append((Q[blk] @ mk * scale + math.log(pool.numel()))[:, None])
                            values.append(mv[None])
                scores = torch.cat(logits, -1)
                weights = torch.softmax(scores, -1) if scores.shape[-1] else scores
                result = (
                    weights @ torch.cat(values, 0)
                    if scores.shape[-1]
                    else torch.zeros(len(blk), d, dtype=torch.float64)
                )
                if config.form == "paper":
                    comp = probs[i] * compensated[i]
                    result = (1.0 - comp.sum()) * result + comp @ vbar
                out[bi, hi, perm[blk]] = result
            critical_all[bi, hi], compensated_all[bi, hi] = critical, compensated

        # text queries: dense over every valid key
        if num_text_tokens:
            keys = valid_all[bi]
            for hi in range(h):
                scores = q[bi, hi, n_video:].double() @ k[bi, hi, keys].double().T * scale
                out[bi, hi, n_video:] = torch.softmax(scores, -1) @ v[bi, hi, keys].double()
    info = {"block_mask": critical_all, "compensated_mask": compensated_all}
    return out.to(q.dtype), info


def _neighbours(grid, perm: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Blocks holding a token 3D-adjacent (26-neighbourhood, itself included) to a token of the
    query block; and every pair of blocks holding first-frame tokens."""
    t, h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)[perm]  # coordinates of the reordered tokens
    nb = len(blocks)
    pairs = torch.zeros(nb, nb, dtype=torch.bool)
    for i, bi in enumerate(blocks):
        for j, bj in enumerate(blocks):
            gap = (coords[bi][:, None, :] - coords[bj][None, :, :]).abs().amax(-1)
            pairs[i, j] = bool((gap <= 1).any())
    first = [i for i, blk in enumerate(blocks) if bool((coords[blk][:, 0] == 0).any())]
    for i in first:
        pairs[i, first] = True
    return pairs
