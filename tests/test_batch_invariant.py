"""tfgpt.batch_invariant: a row's numbers computed alone equal the same
row's numbers inside a batch, and the functions agree with NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfgpt.batch_invariant import PACKET, exp_rows, round_up, rsqrt_column


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
