"""Attention (tfgpt.model.attention) against a NumPy softmax attention: the
causal mask, full causal attention in float32 and bfloat16, causality, one
query against a cache equal to the full pass, and the cache row writes."""

import numpy as np
import pytest
import tensorflow as tf

from tfgpt.model.attention import attend, attend_one, causal_mask, write_rows

# Every test here depends on the CPU's kernels (`make test-isa`).
pytestmark = pytest.mark.kernels


def np_attention(q, k, v, visible):
    """q [B, H, Tq, K], k/v [B, H, Tk, K], visible bool [B or 1, 1, Tq, Tk]
    -> softmax(q k^T / sqrt(K)) v over the visible keys only, in float64."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = np.flatnonzero(visible[min(b, visible.shape[0] - 1), 0, i])
                s = k[b, h, keys] @ q[b, h, i] / np.sqrt(q.shape[-1])
                p = np.exp(s - s.max())
                out[b, h, i] = (p / p.sum()) @ v[b, h, keys]
    return out


def _qkv(b=2, h=3, t=5, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(b, h, t, k)).astype(np.float32) for _ in range(3)]


def test_causal_mask_is_lower_triangle():
    """causal_mask(4) is the lower triangle of ones, diagonal included; with
    more keys than queries, the keys past the last query are hidden."""
    np.testing.assert_array_equal(causal_mask(4).numpy(), np.tril(np.ones((4, 4))))
    np.testing.assert_array_equal(causal_mask(3, 5).numpy(), np.tril(np.ones((3, 5))))


@pytest.mark.parametrize("dtype, tol", [(tf.float32, 1e-5), (tf.bfloat16, 5e-2)])
def test_causal_attention_matches_numpy(dtype, tol):
    """Full causal attention equals the NumPy reference; in bfloat16 the two
    products round their inputs to 8 significant bits, the softmax does not."""
    q, k, v = _qkv()
    got = attend(tf.constant(q), tf.constant(k), tf.constant(v), causal_mask(5), dtype)
    assert got.dtype == tf.float32
    want = np_attention(q, k, v, np.tril(np.ones((5, 5), bool))[None, None])
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=tol)
    if dtype == tf.bfloat16:
        assert np.abs(got.numpy() - want).max() > 1e-4  # the products did run in bfloat16


def test_changing_a_later_position_leaves_earlier_outputs_unchanged():
    """Keys and values after position t change no output at positions <= t,
    and do change the later ones."""
    q, k, v = _qkv(seed=1)
    t = 2
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t + 1 :] += 3.0
    v2[:, :, t + 1 :] -= 2.0
    a = attend(tf.constant(q), tf.constant(k), tf.constant(v), causal_mask(5)).numpy()
    b = attend(tf.constant(q), tf.constant(k2), tf.constant(v2), causal_mask(5)).numpy()
    np.testing.assert_array_equal(a[:, :, : t + 1], b[:, :, : t + 1])
    assert np.abs(a[:, :, t + 1 :] - b[:, :, t + 1 :]).min() > 1e-3


def test_one_query_against_a_cache_equals_the_full_pass():
    """The decode step's attention: the query at position pos[b] against a
    cache of S slots whose slots past pos[b] hold other numbers gives the
    full causal pass's output at that position, and NumPy's."""
    q, k, v = _qkv(b=3, t=6, seed=2)
    full = attend(tf.constant(q), tf.constant(k), tf.constant(v), causal_mask(6)).numpy()  # [B, H, T, K]
    pos = np.array([0, 5, 3], np.int32)
    slots = 8
    rng = np.random.default_rng(3)
    k_cache = rng.normal(size=(3, 3, slots, 4)).astype(np.float32) * 10.0
    v_cache = rng.normal(size=(3, 3, slots, 4)).astype(np.float32) * 10.0
    for b, p in enumerate(pos):
        k_cache[b, :, : p + 1], v_cache[b, :, : p + 1] = k[b, :, : p + 1], v[b, :, : p + 1]
    q_one = q[np.arange(3), :, pos][:, :, None, :]  # [B, H, 1, K]
    blocked = np.where(np.arange(slots)[None, :] <= pos[:, None], 0.0, -1e9).astype(np.float32)  # [B, S]
    q_scaled = tf.constant((q_one[:, :, 0] / np.sqrt(4.0)).astype(np.float32))  # [B, H, K]
    got = attend_one(q_scaled, tf.constant(k_cache), tf.constant(v_cache), tf.constant(blocked)).numpy()
    np.testing.assert_allclose(got, full[np.arange(3), :, pos], rtol=1e-5, atol=1e-5)
    visible = (np.arange(slots)[None, :] <= pos[:, None])[:, None, None, :]
    want = np_attention(q_one, k_cache, v_cache, visible)[:, :, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_query_gives_a_row_the_same_bits_in_any_batch():
    """A row's attention output does not depend on the rows batched with it
    (a kernel chosen by the batch's size would add in another order), at
    the example's key size and a slot count the sampler uses (a multiple of
    16, `tfgpt.serving.decode.cache_slots`)."""
    rng = np.random.default_rng(4)
    s = 48
    q = rng.normal(size=(64, 2, 256)).astype(np.float32)
    k = rng.normal(size=(64, 2, s, 256)).astype(np.float32)
    v = rng.normal(size=(64, 2, s, 256)).astype(np.float32)
    blocked = np.where(np.arange(s)[None, :] <= rng.integers(0, s, 64)[:, None], 0.0, -1e9).astype(np.float32)
    one = tf.function(attend_one)
    batch = one(q, k, v, blocked).numpy()
    for b in range(64):
        np.testing.assert_array_equal(
            one(q[b : b + 1], k[b : b + 1], v[b : b + 1], blocked[b : b + 1]).numpy()[0], batch[b]
        )


def test_one_query_gives_a_row_the_same_bits_with_more_cache_slots():
    """The batch's longest request sets the cache's slot count; a row's
    output must not change when slots past its position (zero keys and
    values, blocked) are added: 48 slots against 64 and 80, as when the row
    is served alone and with a longer request."""
    rng = np.random.default_rng(5)
    rows, s = 64, 48
    q = (rng.normal(size=(rows, 2, 256)) / 16.0).astype(np.float32)  # already times 1 / sqrt(K)
    k = rng.normal(size=(rows, 2, s, 256)).astype(np.float32)
    v = rng.normal(size=(rows, 2, s, 256)).astype(np.float32)
    last = rng.integers(0, s, rows)  # each row's position
    blocked = np.where(np.arange(s)[None, :] <= last[:, None], 0.0, -1e9).astype(np.float32)
    written = (np.arange(s)[None, None, :, None] <= last[:, None, None, None]).astype(np.float32)
    k, v = k * written, v * written  # slots past a row's position are never written
    one = tf.function(attend_one)
    base = one(q, k, v, blocked).numpy()
    want = np_attention(q[:, :, None] * 16.0, k, v, blocked[:, None, None] == 0)[:, :, 0]
    np.testing.assert_allclose(base, want, rtol=1e-5, atol=1e-5)
    for more in (16, 32):
        pad = [[0, 0], [0, 0], [0, more], [0, 0]]
        wider = one(q, np.pad(k, pad), np.pad(v, pad), np.pad(blocked, [[0, 0], [0, more]], constant_values=-1e9))
        np.testing.assert_array_equal(wider.numpy(), base)


def test_write_rows_puts_each_new_row_at_its_cache_row():
    """New [B, H, K] rows land at the given rows of a [B * H * S, K] cache,
    the other rows unchanged."""
    cache = np.arange(2 * 2 * 3 * 4, dtype=np.float32).reshape(12, 4) * -1.0  # [B * H * S, K]
    new = tf.reshape(tf.range(16, dtype=tf.float32), [2, 2, 4]) + 1.0  # [B, H, K]
    rows = tf.constant([1, 4, 8, 11])  # (b, h, slot): (0,0,1) (0,1,1) (1,0,2) (1,1,2)
    want = cache.copy()
    want[[1, 4, 8, 11]] = new.numpy().reshape(4, 4)
    got = write_rows(tf.identity(tf.constant(cache)), rows, new)
    np.testing.assert_array_equal(got.numpy(), want)
