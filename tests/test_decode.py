"""The decode step (tfgpt.decode) against the full model: the prefill and
one-token steps give the hidden states the model gives for the whole
sequence, in float32 and bfloat16, with in-place and scatter cache writes;
and the window pass. The attention kernels themselves are
tests/test_attention.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfgpt import decode
from tfgpt.config import GPTConfig
from tfgpt.model import GPT

CONFIG = GPTConfig(vocab_size=40, maxlen=8, embed_dim=16, num_heads=2, ff_dim=32, num_layers=2, dropout=0.0, head_dim=8)


def model_of(dtype=tf.float32) -> GPT:
    model = GPT(CONFIG, seed=3, compute_dtype=dtype)
    for v in model.trainable_variables:
        v.assign(v * 3.0)
    return model


@tf.function
def run_decode(model, prompts, lengths, steps_tokens, in_place):
    """Prefill right-padded prompts, then decode the given tokens one step at
    a time; returns the hidden state after each step, [steps, B, D]."""
    slots = tf.constant(CONFIG.maxlen)
    hidden, caches = decode.prefill(model, prompts, lengths, slots)
    setup = decode.decode_setup(model, tf.shape(prompts)[0], slots)
    out = [hidden]
    n = lengths
    for token in tf.unstack(steps_tokens):
        n = n + 1
        hidden, caches = decode.decode_hidden(model, token, n - 1, caches, setup, in_place=in_place)
        out.append(hidden)
    return tf.stack(out)


# bfloat16: the model's attention multiplies bfloat16 keys and values, the
# decode step float32 ones (attend_one), and its query weights carry the
# 1 / sqrt(K) before their rounding to bfloat16; hidden states are layer-normed
# (entries up to ~6), and the bfloat16 model itself is about 0.01-0.03 per
# entry from float32.
@pytest.mark.parametrize(
    "dtype, in_place, tol, mean_tol",
    [(tf.float32, True, 1e-5, 5e-6), (tf.float32, False, 1e-5, 5e-6), (tf.bfloat16, True, 0.15, 0.05)],
)
def test_prefill_and_decode_steps_equal_the_full_model(dtype, in_place, tol, mean_tol):
    model = model_of(dtype)
    rows = [[5, 9, 2], [7], [3, 4, 5, 6, 8]]  # different lengths: right-padded
    extra = [[11, 12, 13], [14, 15, 16], [17, 18, 19]]  # three decoded tokens per row
    width = max(map(len, rows))
    prompts = tf.constant([r + [0] * (width - len(r)) for r in rows])
    got = run_decode(
        model, prompts, tf.constant([len(r) for r in rows]), tf.constant(np.array(extra).T, tf.int32), in_place
    ).numpy()  # [4, B, D]
    for b, (row, more) in enumerate(zip(rows, extra)):
        for step in range(4):
            seq = row + more[:step]
            want = model.hidden(tf.constant([seq]))[0, -1].numpy()
            np.testing.assert_allclose(got[step, b], want, rtol=tol, atol=tol)
            assert np.mean(np.abs(got[step, b] - want)) < mean_tol


def test_window_hidden_reads_each_rows_last_maxlen_tokens():
    model = model_of()
    history = np.arange(2, 2 + 2 * 14).reshape(2, 14) % 38 + 2  # [B, W]
    n = np.array([5, 12], np.int32)  # the second row slides: its window is tokens 4..11
    got = decode.window_hidden(model, tf.constant(history, tf.int32), tf.constant(n)).numpy()
    for b in range(2):
        window = history[b, max(0, n[b] - CONFIG.maxlen) : n[b]]
        want = model.hidden(tf.constant([window], tf.int32))[0, -1].numpy()
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
