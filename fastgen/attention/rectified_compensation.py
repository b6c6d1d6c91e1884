"""Rectified SpaAttn's compensation (:mod:`fastgen.attention.rectified` describes the method): the
extra keys a plan carries beside the selected blocks (the text keys, one pooled key per compensated
block in the exact form, the isolated outlier keys) and the paper form's rectification of the
sparse output, ``R_I·SparseAttn_i + Σ_{J comp} P_IJ v̄_J``."""

from __future__ import annotations

import torch

from .rectified_selection import BlockStatistics, RectifiedSelection


def extra_keys(kp, vp, text_k, text_v, text_valid, stats, sel: RectifiedSelection, form, block_size):
    """The extra keys of one call's plan as lists of parts ``(keys, values, log_weights, visible)``:
    the text keys (weight 1, padded: absent), in the exact form one pooled key per compensated block
    (log-weight ``log n_J``), and the isolated keys (weight 1, seen where their block is not
    selected; removed from their block's pool)."""
    b, h, n_pad, d = kp.shape
    nb = stats.counts.shape[-1]
    device = kp.device
    n_text = text_k.shape[2]
    keys, values, log_weights, visible = [], [], [], []
    if n_text:
        keys.append(text_k)
        values.append(text_v)
        weight = torch.zeros(b, 1, n_text, device=device)
        if text_valid is not None:
            weight = weight.masked_fill(~text_valid[:, None, :], float("-inf"))
        log_weights.append(weight.expand(b, h, n_text))
        visible.append(torch.ones(1, 1, 1, n_text, dtype=torch.bool, device=device).expand(b, h, nb, n_text))
    pool_counts = stats.counts[:, None, :].expand(b, h, nb)
    k_sums, v_sums = stats.key_sums, stats.value_sums
    iso_k = iso_v = None
    if sel.isolated is not None:  # isolated keys leave their block's pool and become keys of their own
        owner = sel.isolated // block_size  # [B, H, r]
        rows = sel.isolated[..., None].expand(-1, -1, -1, d)
        iso_k, iso_v = torch.gather(kp, 2, rows), torch.gather(vp, 2, rows)
        idx = owner[..., None].expand(-1, -1, -1, d)
        k_sums = k_sums.scatter_add(2, idx, -iso_k.float())
        v_sums = v_sums.scatter_add(2, idx, -iso_v.float())
        pool_counts = pool_counts.scatter_add(2, owner, -torch.ones_like(owner, dtype=torch.float32))
    if form == "exact":
        denom = pool_counts.clamp_min(1.0)[..., None]
        keys.append(k_sums / denom)
        values.append(v_sums / denom)
        log_weights.append(torch.log(pool_counts))  # -inf for an empty pool
        visible.append(sel.compensated.expand(b, h, -1, -1))
    if iso_k is not None:
        owner_rows = (sel.isolated // block_size)[:, :, None, :].expand(-1, -1, nb, -1)
        keys.append(iso_k)
        values.append(iso_v)
        log_weights.append(torch.zeros(iso_k.shape[:3], device=device))
        visible.append(~torch.gather(sel.critical.expand(b, -1, -1, -1), -1, owner_rows))
    return keys, values, log_weights, visible


def place_extra_keys(keys, values, dtype, kp_extra, vp_extra):
    """Write the extra keys/values into the buffers after k/v (``kp_extra`` given; rows past the
    last extra key zeroed) or concatenate them (in ``dtype``)."""
    if not keys:
        return None, None
    p = sum(x.shape[2] for x in keys)
    if kp_extra is None:
        return torch.cat([x.to(dtype) for x in keys], 2), torch.cat([x.to(dtype) for x in values], 2)
    start = 0
    for key, value in zip(keys, values):
        end = start + key.shape[2]
        kp_extra[:, :, start:end] = key
        vp_extra[:, :, start:end] = value
        start = end
    kp_extra[:, :, p:] = 0
    vp_extra[:, :, p:] = 0
    return kp_extra, vp_extra


def paper_rectification(sparse_out, probs, stats: BlockStatistics, compensated, block_size) -> torch.Tensor:
    """Paper form ``R_I·SparseAttn_i + Σ_{J comp} P_IJ v̄_J`` on block-padded rows (fp32 out, q dtype)."""
    comp = probs * compensated
    retained = 1.0 - comp.sum(-1)  # [B, H, nqb]
    pooled_term = torch.matmul(comp, stats.pooled_v)  # [B, H, nqb, D]
    b, h, n_pad, d = sparse_out.shape
    blocks = (
        sparse_out.float().view(b, h, -1, block_size, d) * retained[..., None, None]
        + pooled_term[:, :, :, None]
    )
    return blocks.view(b, h, n_pad, d).to(sparse_out.dtype)
