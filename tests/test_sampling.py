"""Choosing the next token (tfgpt.serving.sampling) against a NumPy reference: the
per-row random numbers, the repetition penalty, top-k, top-p and
temperature, and each row alone against the same row in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfgpt.serving import sampling
from tfgpt.serving.sampling import CANDIDATES, top_k_logits

V = 20000  # the default vocabulary


@tf.function
def pick(logits, top_k, top_p, temperature, u):
    return sampling.pick(logits, sampling.plan(top_k, top_p, temperature, logits.shape[-1]), u[:, None])


def reference_pick(logits, k, p, t, u, tol=1e-4):
    """(token, nucleus, ambiguous) for one row, in float64, from the
    definitions in tfgpt/serving/sampling.py. The nucleus also holds the tokens
    within `tol` of its end; ambiguous: the draw or the nucleus's end lies
    within `tol` of a boundary, where float32 sums (over up to 20,000
    probabilities) may decide the other way."""
    logits = logits.astype(np.float64)
    order = np.lexsort((np.arange(len(logits)), -logits))  # largest first, ties to the lower id
    if t <= 0:
        return int(order[0]), {int(order[0])}, False
    k = min(max(k, 1), len(logits))
    if k >= len(logits) and p >= 1:
        order = np.arange(len(logits))  # the whole vocabulary: drawn in vocabulary order
    top = order[:k]
    z = np.exp((logits[top] - logits[top].max()) / t)
    probs = z / z.sum()
    cum = np.cumsum(probs)
    before = cum - probs
    keep = k if p >= 1 else max(1, int(np.sum(before < p)))
    loose = k if p >= 1 else max(1, int(np.sum(before < p + tol)))
    target = u * cum[keep - 1]
    j = min(int(np.sum(cum[:keep] <= target)), keep - 1)
    ambiguous = (
        bool(np.min(np.abs(cum[:keep] - target)) < tol)
        or (keep != loose)
        or (p < 1 and keep > 1 and p - before[keep - 1] < tol)
    )
    return int(top[j]), {int(i) for i in top[:loose]}, ambiguous


SETTINGS = [  # (top_k, top_p, temperature): every way `plan` sorts a row
    (1, 1.0, 1.0),
    (5, 1.0, 1.0),
    (10, 0.9, 1.0),
    (10, 0.5, 2.0),
    (CANDIDATES, 0.95, 0.7),
    (CANDIDATES + 1, 1.0, 1.0),
    (300, 0.9, 1.0),
    (V, 1.0, 1.0),
    (10**9, 1.0, 0.5),
    (V, 0.9, 1.0),
    (V, 0.3, 1.0),
    (10**9, 0.99, 1.5),
    (20, 0.0, 1.0),
    (20, -1.0, 1.0),
    (7, 2.0, 1.0),
    (10, 0.9, 0.0),
    (V, 0.9, -1.0),
    (0, 1.0, 1.0),
    (-5, 0.5, 1.0),
    (50, 0.9, 1e-4),
]


def _batch(seed, sharpness):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((len(SETTINGS), V)) * sharpness).astype(np.float32)
    # A few rows peaked: their nucleus over the whole vocabulary closes
    # within the fast candidates.
    logits[::3, rng.integers(0, V, 5)] += 12.0
    k, p, t = (np.array(c) for c in zip(*SETTINGS))
    u = rng.random(len(SETTINGS)).astype(np.float32)
    return logits, k.astype(np.int32), p.astype(np.float32), t.astype(np.float32), u


@pytest.mark.parametrize("seed, sharpness", [(0, 1.0), (1, 3.0), (2, 0.3)])
def test_pick_equals_the_reference_for_every_kind_of_row(seed, sharpness):
    logits, k, p, t, u = _batch(seed, sharpness)
    got = pick(tf.constant(logits), k, p, t, u).numpy()
    checked = 0
    for i in range(len(SETTINGS)):
        want, nucleus, ambiguous = reference_pick(logits[i], k[i], p[i], t[i], u[i])
        assert got[i] in nucleus, (SETTINGS[i], got[i])
        if not ambiguous:
            assert got[i] == want, (SETTINGS[i], got[i], want)
            checked += 1
    assert checked >= len(SETTINGS) - 4


def test_each_row_picks_as_it_would_alone():
    # The batch's other rows change which paths run (a full sort, the whole
    # vocabulary, how many candidates); a row's token must not change.
    logits, k, p, t, u = _batch(3, 1.0)
    batch = pick(tf.constant(logits), k, p, t, u).numpy()
    for i in range(len(SETTINGS)):
        alone = pick(tf.constant(logits[i : i + 1]), k[i : i + 1], p[i : i + 1], t[i : i + 1], u[i : i + 1]).numpy()
        assert alone[0] == batch[i], SETTINGS[i]


def test_draws_follow_the_renormalised_nucleus():
    # Fixed logits, many uniforms: the frequencies of the drawn tokens are
    # the nucleus's probabilities, renormalised; nothing outside it is drawn.
    logits = np.full(V, -4.0, np.float32)
    top = [11, 5000, 17, 19999, 3]
    logits[top] = [3.0, 2.5, 2.0, 1.0, 0.5]
    draws = 4000
    u = (np.arange(draws, dtype=np.float32) + 0.5) / draws  # evenly spread: frequencies exact to 1/draws
    for top_k, top_p, t in [(10, 0.8, 1.0), (V, 0.9, 1.0), (3, 0.99, 2.0), (V, 1.0, 1.0)]:
        rows = np.broadcast_to(logits, (draws, V))
        got = pick(
            tf.constant(rows),
            np.full(draws, top_k, np.int32),
            np.full(draws, top_p, np.float32),
            np.full(draws, t, np.float32),
            u,
        ).numpy()
        _, nucleus, _ = reference_pick(logits, top_k, top_p, t, 0.5)
        assert set(np.unique(got)) <= nucleus
        ids = sorted(nucleus)
        z = np.exp(logits[ids].astype(np.float64) / t)
        np.testing.assert_allclose([np.mean(got == i) for i in ids], z / z.sum(), atol=2.0 / draws + 1e-3)


def test_row_uniforms_depend_on_the_seed_and_the_step_only():
    seeds = tf.constant([0, 1, -1, 2**62, 7, 7], tf.int64)
    long = sampling.row_uniforms(seeds, 50).numpy()
    short = sampling.row_uniforms(seeds[2:3], 13).numpy()
    np.testing.assert_array_equal(short, long[2:3, :13])  # the same stream, whatever the batch and length
    np.testing.assert_array_equal(long[4], long[5])  # the same seed
    assert len({tuple(r) for r in long[:5]}) == 5  # different seeds
    assert long.min() >= 0.0 and long.max() < 1.0
    many = sampling.row_uniforms(tf.range(200, dtype=tf.int64), 500).numpy().ravel()
    # 100,000 numbers: ten equal bins hold 10% each (std. error 0.1%), and
    # neighbours (consecutive steps, consecutive seeds) are uncorrelated.
    np.testing.assert_allclose(np.histogram(many, bins=10, range=(0, 1))[0] / many.size, 0.1, atol=0.006)
    grid = many.reshape(200, 500)
    assert abs(np.corrcoef(grid[:, :-1].ravel(), grid[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(grid[:-1].ravel(), grid[1:].ravel())[0, 1]) < 0.02


def test_penalty_changes_exactly_the_seen_tokens():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
    logits[0, 4] = 0.0
    seen = np.array([[4, 9, 9, 30, 4], [1, 1, 1, 1, 1], [2, 3, 49, 0, 2]], np.int32)  # repeats allowed
    penalty = np.array([1.5, 0.5, 1.0], np.float32)
    offsets = np.broadcast_to(np.arange(3)[:, None] * 50, seen.shape).astype(np.int32)
    got = sampling.penalize(tf.constant(logits), tf.constant(seen), tf.constant(penalty), tf.constant(offsets)).numpy()
    want = logits.copy()
    for b in range(3):
        for token in set(seen[b].tolist()):
            x = logits[b, token]
            want[b, token] = x / penalty[b] if x > 0 else x * penalty[b]
    np.testing.assert_array_equal(got, want)
    changed = {(b, j) for b, j in zip(*np.nonzero(got != logits))}
    assert changed == {(b, j) for b in (0, 1) for j in set(seen[b].tolist()) if logits[b, j] != 0}


def test_top_k_logits_matches_tf_top_k():
    logits = tf.random.stateless_normal([3, 20000], seed=[1, 2])
    padded_vocab = tf.random.stateless_normal([2, 20011], seed=[3, 4])  # not a multiple of a group size
    ties = tf.round(tf.random.stateless_normal([4, 20000], seed=[5, 6]) * 2.0)  # ~10 distinct values
    for x in (logits, padded_vocab, ties):
        for k in (1, 10, 64, 65, 1000, x.shape[1]):
            values, indices = top_k_logits(x, tf.constant(k))
            want = tf.math.top_k(x, k)
            np.testing.assert_array_equal(values.numpy(), want.values.numpy())
            np.testing.assert_array_equal(indices.numpy(), want.indices.numpy())
