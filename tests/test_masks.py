"""The forward contract: per-call token metadata and the one attention rule.

A hand-written mask, whole passes vs prefill blocks vs a decode step, and the kernels' planning
helpers against the rule on random layouts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.runtime import ForwardBatch, Keys, masks


def test_hand_computed_mask_left_padding_and_chunks():
    # one left-padded row: [pad, a, b, c, d, e]; positions of the real tokens 0..4; chunks of 2
    batch = ForwardBatch.build((1, 6), "cpu", torch.tensor([[0, 1, 1, 1, 1, 1]]))
    assert batch.positions.tolist() == [[0, 0, 1, 2, 3, 4]]
    o, x = 1, 0
    chunked = [[o, x, x, x, x, x],   # the padding query keeps itself only
               [x, o, x, x, x, x],   # a (pos 0, chunk 0)
               [x, o, o, x, x, x],   # b (pos 1, chunk 0)
               [x, x, x, o, x, x],   # c (pos 2, chunk 1)
               [x, x, x, o, o, x],   # d (pos 3, chunk 1)
               [x, x, x, x, x, o]]   # e (pos 4, chunk 2)
    global_ = [[o, x, x, x, x, x],
               [x, o, x, x, x, x],
               [x, o, o, x, x, x],
               [x, o, o, o, x, x],
               [x, o, o, o, o, x],
               [x, o, o, o, o, o]]
    assert batch.mask(2)[0, 0].int().tolist() == chunked
    assert batch.mask(None)[0, 0].int().tolist() == global_
    assert batch.mask(2) is batch.mask(2)  # built once per call and chunk size


def test_positions_without_a_mask_are_each_tokens_index_after_the_past():
    batch = ForwardBatch.build((2, 3), "cpu")
    assert batch.positions.tolist() == [[0, 1, 2], [0, 1, 2]] and batch.positions.dtype == torch.long
    assert batch.valid.dtype == torch.bool and batch.valid.all()
    batch.positions[0, 0] = 7  # one tensor per row (not a broadcast view): rows stay independent
    assert batch.positions[1, 0] == 0
    block = ForwardBatch.build((2, 3), "cpu", start=5, past_valid=torch.tensor([5, 2]))
    assert block.positions.tolist() == [[5, 6, 7], [2, 3, 4]]
    step = ForwardBatch.build((2, 1), "cpu", start=8, past_valid=torch.tensor([8, 5]))
    assert step.positions.tolist() == [[8], [5]]


def _brute_force(index, pos, valid, chunk):
    T = len(index)
    out = np.zeros((T, T), bool)
    for i in range(T):
        for j in range(T):
            same_chunk = chunk is None or pos[i] // chunk == pos[j] // chunk
            out[i, j] = (index[j] <= index[i] and valid[j] and same_chunk) or i == j
    return out


@pytest.mark.parametrize("seed", range(4))
def test_rule_on_random_padding_equals_the_spec_and_the_kernel_helpers(seed):
    g = np.random.default_rng(seed)
    B, T = 3, 23
    valid = np.ones((B, T), bool)
    valid[0, : g.integers(0, 8)] = False  # left padding
    valid[1, T - g.integers(1, 8):] = False  # right padding
    batch = ForwardBatch.build((B, T), "cpu", torch.from_numpy(valid))
    pos = batch.positions.numpy()
    for chunk in (None, 1, 4, 7):
        m = batch.mask(chunk)[:, 0].numpy()
        for b in range(B):
            np.testing.assert_array_equal(m[b], _brute_force(np.arange(T), pos[b], valid[b], chunk))
            # the kernels' work bounds never cut an allowed key
            q = np.flatnonzero(valid[b])
            lo = masks.key_lower_bounds(pos[b], valid[b], chunk, q)
            for i, qi in enumerate(q):
                assert not m[b, qi, : lo[i]].any()
            keys = np.flatnonzero(valid[b])[::3]
            rng = masks.column_ranges(pos[b], valid[b], chunk, q, keys)
            assert rng is not None
            for i, qi in enumerate(q):
                want = np.flatnonzero(m[b, qi, keys])
                got = np.arange(rng[0][i], rng[1][i])
                np.testing.assert_array_equal(got, want)


def test_prefill_blocks_and_a_decode_step_express_the_whole_pass():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    whole = ForwardBatch.build((2, 10), "cpu", valid)
    for chunk in (None, 3):
        full = whole.mask(chunk)
        # a block of tokens 4..8 continuing the first 4 (each row's real tokens so far counted)
        past = valid[:, :4].sum(1)
        block = ForwardBatch.build((2, 5), "cpu", valid[:, 4:9], start=4, past_valid=past)
        assert torch.equal(block.positions, whole.positions[:, 4:9])
        keys = Keys(torch.arange(9), whole.positions[:, :9], valid[:, :9])
        assert torch.equal(block.mask(chunk, keys), full[:, :, 4:9, :9])
        # a decode step: token 9 against the 9 tokens before it and itself
        step = ForwardBatch.build((2, 1), "cpu", valid[:, 9:], start=9, past_valid=valid[:, :9].sum(1))
        assert torch.equal(step.positions, whole.positions[:, 9:])
        assert torch.equal(step.mask(chunk, whole.keys()), full[:, :, 9:])


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), inputs have \(B, T\)=\(1, 4\)"):
        ForwardBatch.build((1, 4), "cpu", torch.ones(1, 3))
    with pytest.raises(ValueError, match="position_ids has shape"):
        ForwardBatch.build((1, 4), "cpu", None, torch.zeros(2, 4, dtype=torch.long))
