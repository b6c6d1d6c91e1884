"""The block rules two methods share (fastgen/attention/blocks.py), each against a loop statement written
here: GAPR (Rectified SpaAttn and Light Forcing) and the index table -> block mask helper."""

from __future__ import annotations

import torch

from fastgen.attention.blocks import gapr_compensated, tables_to_mask


def test_gapr_matches_its_statement_elementwise():
    g = torch.Generator().manual_seed(3)
    b, h, nq, nk, d = 2, 3, 4, 5, 8
    pooled_q, query_dev = torch.randn(b, h, nq, d, generator=g), torch.rand(b, h, nq, d, generator=g)
    pooled_k, key_dev = torch.randn(b, h, nk, d, generator=g), torch.rand(b, h, nk, d, generator=g)
    dropped = torch.rand(b, h, nq, nk, generator=g) < 0.6
    got = gapr_compensated(pooled_q, pooled_k, query_dev, key_dev, dropped)
    expected = torch.zeros_like(dropped)
    for i in range(b):
        for j in range(h):
            for qi in range(nq):
                for ki in range(nk):
                    gain = abs(float(pooled_q[i, j, qi] @ pooled_k[i, j, ki]))
                    error = abs(float(query_dev[i, j, qi] @ pooled_k[i, j, ki]))
                    error += abs(float(pooled_q[i, j, qi] @ key_dev[i, j, ki]))
                    expected[i, j, qi, ki] = bool(dropped[i, j, qi, ki]) and (gain > error or error <= 0)
    assert torch.equal(got, expected)
    assert got.any() and (dropped & ~got).any()  # both outcomes occur: the test can tell them apart


def test_tables_to_mask_marks_exactly_the_listed_blocks():
    indices = torch.tensor([[[2, 0, 7], [1, 1, 3], [0, 0, 0]]])  # slots past the count hold junk
    counts = torch.tensor([[2, 3, 0]])
    mask = tables_to_mask(indices, counts, 4)
    assert mask.tolist() == [[[True, False, True, False], [False, True, False, True], [False] * 4]]
