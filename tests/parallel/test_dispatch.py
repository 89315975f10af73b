"""The token dispatchers' pure parts, without processes: reordering, permutation, combining."""

from __future__ import annotations

import torch

from d2m_dist.parallel.dispatch import LocalDispatcher, chunk_permutation, permute_local


def test_chunk_permutation_lists_chunks_column_major():
    # chunks [r][c] of sizes [[2, 0, 1], [1, 3, 0]]: rows 0-1 (0,0), 2 (0,2), 3 (1,0), 4-6 (1,1)
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])
    # column-major: (0,0) (1,0) (0,1) (1,1) (0,2) (1,2)
    assert chunk_permutation(counts).tolist() == [0, 1, 3, 4, 5, 6, 2]


def test_chunk_permutation_inverse_is_the_transposed_counts():
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (2, 3), (4, 2), (3, 5)]:
        counts = torch.randint(0, 4, shape, generator=g)
        rows = torch.arange(int(counts.sum()))
        there = rows[chunk_permutation(counts)]
        back = there[chunk_permutation(counts.t())]
        assert torch.equal(back, rows)


def test_chunk_permutation_of_all_empty_chunks():
    assert chunk_permutation(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


def test_permute_local_orders_assignments_expert_major_tokens_ascending():
    x = torch.arange(4.0).unsqueeze(1) * 10  # token t has value 10 t
    routing_map = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    probs = torch.tensor([[0.5, 0, 0.25], [0, 0.75, 0.125], [0.875, 0.0625, 0], [0, 0, 1.0]])
    rows, gates, counts, token_index = permute_local(x, routing_map, probs, assignments=7)
    # expert 0: tokens 0, 2; expert 1: tokens 1, 2; expert 2: tokens 0, 1, 3
    assert token_index.tolist() == [0, 2, 1, 2, 0, 1, 3]
    assert rows.squeeze(1).tolist() == [0, 20, 10, 20, 0, 10, 30]
    assert gates.tolist() == [0.5, 0.875, 0.75, 0.0625, 0.25, 0.125, 1.0]
    assert counts.tolist() == [2, 2, 3]
    # the count found on the device equals the one given
    assert torch.equal(permute_local(x, routing_map, probs, assignments=None)[3], token_index)


def test_local_dispatch_then_combine_sums_each_token_s_gated_rows():
    g = torch.Generator().manual_seed(1)
    T, E, D = 6, 4, 3
    x = torch.randn(T, D, generator=g)
    routing_map = torch.rand(T, E, generator=g) > 0.5
    probs = torch.rand(T, E, generator=g) * routing_map
    d = LocalDispatcher().dispatch(x, routing_map, probs, assignments=None)
    y = LocalDispatcher().combine(d.rows * d.gates.unsqueeze(1) * 2, d)
    # by hand: each token gets 2 * (sum of its gates) * itself
    want = 2 * probs.sum(1, keepdim=True) * x
    torch.testing.assert_close(y, want)
