"""tfgpt.model.batch_invariant: a row's numbers computed alone equal the same
row's numbers inside a batch, and the functions agree with NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfgpt.model.batch_invariant import PACKET, exp_rows, round_up, row_sum, rsqrt_column

# Every test here depends on the CPU's kernels (`make test-isa`).
pytestmark = pytest.mark.kernels


def test_round_up_to_the_packet():
    assert [round_up(n) for n in (1, 15, 16, 17, 80)] == [16, 16, 16, 32, 80]
    assert int(round_up(tf.constant(43))) == 48 and PACKET == 16


def test_rsqrt_column_is_the_same_for_a_row_alone_and_batched():
    x = np.random.default_rng(0).uniform(0.01, 50.0, size=(64, 1)).astype(np.float32)
    f = tf.function(rsqrt_column, input_signature=[tf.TensorSpec([None, 1])])
    batch = f(x).numpy()
    np.testing.assert_allclose(batch, 1.0 / np.sqrt(x.astype(np.float64)), rtol=3e-7)
    for i in range(64):
        np.testing.assert_array_equal(f(x[i : i + 1]).numpy()[0], batch[i])


@pytest.mark.parametrize("width", [10, 43, 64])
def test_exp_rows_is_the_same_for_a_row_alone_and_batched(width):
    x = np.random.default_rng(width).normal(scale=4.0, size=(64, width)).astype(np.float32)
    f = tf.function(exp_rows, input_signature=[tf.TensorSpec([None, None])])
    batch = f(x).numpy()
    np.testing.assert_allclose(batch, np.exp(x.astype(np.float64)), rtol=3e-7)
    for i in range(64):
        np.testing.assert_array_equal(f(x[i : i + 1]).numpy()[0], batch[i])


def test_row_sum_adds_in_order_so_trailing_zeros_and_other_rows_change_nothing():
    """Rows of 1-80 numbers, zeros after them up to 16, 32, ... 80 columns,
    summed alone and in batches of 64: the same bits as NumPy's float32
    cumulative sum, which adds from the first number to the last."""
    rng = np.random.default_rng(1)
    rows = rng.uniform(0.0, 1.0, size=(64, 80)).astype(np.float32)
    length = rng.integers(1, 81, 64)
    rows[np.arange(80)[None, :] >= length[:, None]] = 0.0
    f = tf.function(row_sum, input_signature=[tf.TensorSpec([None, 2, None])])
    want = np.cumsum(rows, axis=-1, dtype=np.float32)[:, -1:]
    for width in (16, 32, 48, 64, 80):
        fits = length <= width
        x = np.stack([rows[:, :width]] * 2, 1)  # [64, 2, width]: two heads
        batch = f(x).numpy()
        np.testing.assert_array_equal(batch[fits, 0], want[fits])
        np.testing.assert_array_equal(batch[fits, 1], want[fits])
        for i in np.flatnonzero(fits)[:8]:
            np.testing.assert_array_equal(f(x[i : i + 1]).numpy()[0], batch[i])
