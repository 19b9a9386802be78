"""AdapN's NN_nb schedule (`nn_schedule`, the paper's Algorithm 1, epoch from 0)."""
from __future__ import annotations

import pytest

from hpcbrain.methods.contrastive import nn_schedule


# Paper setting: batch 32, NN_final 14, step 1, 50 epochs → total_steps 50,
# decrement (32 − 14) / (50 − 1) = 18/49 = 0.367346…
@pytest.mark.parametrize("epoch, expected", [
    (0, 32),    # 32 − 0
    (1, 31),    # 32 − 0.3673 = 31.63 → truncated to 31
    (10, 28),   # 32 − 3.673  = 28.33 → 28
    (25, 22),   # 32 − 9.184  = 22.82 → 22
    (48, 14),   # 32 − 17.63  = 14.37 → 14
    (49, 14),   # 32 − 18     = 14 (the last epoch reaches NN_final)
    (500, 14),  # 32 − 183.7 < 14 → clamped to NN_final
])
def test_paper_setting(epoch, expected):
    assert nn_schedule(epoch, 50, 32, 14, 1) == expected


# step 10 over 50 epochs: total_steps 5, decrement 18 / 4 = 4.5 per 10 epochs
@pytest.mark.parametrize("epoch, expected", [
    (0, 32), (9, 32),      # 0 steps completed
    (10, 27), (19, 27),    # 32 − 4.5  = 27.5 → 27
    (20, 23),              # 32 − 9    = 23
    (30, 18),              # 32 − 13.5 = 18.5 → 18
    (40, 14), (49, 14),    # 32 − 18   = 14
    (60, 14),              # 32 − 27   = 5 → never below 14
])
def test_step_size_ten(epoch, expected):
    assert nn_schedule(epoch, 50, 32, 14, 10) == expected


def test_truncation_not_rounding():
    # batch 10, final 3, 4 epochs, step 1: decrement 7/3 = 2.333…
    assert nn_schedule(1, 4, 10, 3, 1) == 7    # 7.667 → 7 (rounding would give 8)
    assert nn_schedule(2, 4, 10, 3, 1) == 5    # 5.333 → 5
    assert nn_schedule(3, 4, 10, 3, 1) == 3


def test_returns_python_int():
    assert type(nn_schedule(3, 50, 32, 14, 1)) is int


@pytest.mark.parametrize("step_size", [0, -1])
def test_step_size_zero_or_negative_means_no_schedule(step_size):
    # the official code's NN_nb_step_size = 0: the whole batch, no division by zero
    for epoch in (0, 1, 10, 49):
        assert nn_schedule(epoch, 50, 32, 14, step_size) == 32


@pytest.mark.parametrize("max_epochs, step_size", [(1, 1), (0, 1), (3, 5), (1, 10), (0, 0)])
def test_tiny_max_epochs_never_divides_by_zero(max_epochs, step_size):
    # total_steps = ⌊max_epochs / step⌋ ∈ {0, 1}: the denominator total_steps − 1 is taken as 1,
    # so the first step keeps the batch size and any later one is NN_final
    assert nn_schedule(0, max_epochs, 32, 14, step_size) == 32
    later = nn_schedule(max(step_size, 1), max_epochs, 32, 14, step_size)
    assert later == (32 if step_size == 0 else 14)


def test_two_epochs_go_straight_to_final():
    # total_steps 2, decrement 18/1 = 18: epoch 0 → 32, epoch 1 → 14
    assert [nn_schedule(e, 2, 32, 14, 1) for e in range(3)] == [32, 14, 14]


def test_never_below_nn_final_even_when_the_batch_is_smaller():
    # batch 8 < NN_final 14: Algorithm 1's max(·, NN_final) wins from epoch 0
    assert [nn_schedule(e, 10, 8, 14, 1) for e in range(10)] == [14] * 10


def test_monotone_non_increasing():
    values = [nn_schedule(e, 37, 64, 5, 3) for e in range(60)]
    assert values[0] == 64 and values[-1] == 5
    assert all(a >= b for a, b in zip(values, values[1:]))
