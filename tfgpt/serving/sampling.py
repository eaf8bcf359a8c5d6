"""Choosing each row's next token from its logits, with the row's own
settings and its own random numbers, inside the graph.

For one row with logits l over the vocabulary, in this order:

  1. repetition penalty r (CTRL, Keskar et al. 2019): the logit of every
     token already in the row (`penalize`) becomes l / r where it is
     positive and l * r where it is negative; r = 1 changes nothing.
  2. temperature t: t <= 0 takes the largest logit (greedy, steps 3-5 do
     not apply); else the distribution is softmax(l / t).
  3. top-k: only the k largest logits stay (ties go to the lower id), and
     their probabilities are renormalised; k >= V keeps the vocabulary.
  4. top-p (nucleus): of those, ordered by probability, the shortest
     prefix whose probability reaches p stays, renormalised; p >= 1 keeps
     them all, p <= 0 keeps the most likely token.
  5. a draw: the row's uniform number u in [0, 1) picks the first token of
     that ordered list whose cumulative probability exceeds u times the
     list's total (the inverse of the cumulative distribution). A row that
     keeps the whole vocabulary (k >= V, p >= 1) draws in vocabulary
     order instead, which needs no sort and samples the same distribution.

Each row's result depends on its own logits, settings and u alone, never
on the other rows of the batch: the candidate lists are prefixes of one
sorted order, and only prefix sums over them decide (see `_from_sorted`).

The random numbers come from `row_uniforms`, a counter-based generator
keyed by each row's seed (TensorFlow's stateless generators take one seed
per call, not one per row).

Shapes: B = batch, V = vocabulary, M = candidates per row, W = history width.
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.model.batch_invariant import exp_rows

# How many candidates the fast path keeps per row: the two-stage top-k
# (`top_k_logits`) is exact and cheap up to here. A row with a larger top_k,
# or a nucleus over the whole vocabulary that the first CANDIDATES tokens
# do not close, is sampled from a full sort of its logits instead.
CANDIDATES = 64


# --- random numbers ------------------------------------------------------------

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the counter's stride
_SEED_SALT = 0x5DEECE66D3A5C2B1  # separates the seed's mixing from the counter's


def _u64(value):
    return tf.constant(value, tf.uint64)


def _mix(z):
    """A 64-bit finalizer (SplitMix64's): every output bit depends on every
    input bit. z uint64 [...] -> uint64 [...]."""
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(30))) * _u64(0xBF58476D1CE4E5B9)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(27))) * _u64(0x94D049BB133111EB)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(31)))


def row_uniforms(seed, steps):
    """seed int64 [B], steps int32 [] -> float32 [B, steps] in [0, 1).

    Entry [b, i] is a function of (seed[b], i) alone: a row draws the same
    numbers whatever else is in the batch and however many steps the batch
    runs (TensorFlow's stateless_uniform gives different first values for
    different shapes). The seed is mixed before the counter is added, so
    that nearby seeds give unrelated streams.
    """
    key = _mix(tf.bitwise.bitwise_xor(tf.bitcast(seed, tf.uint64), _u64(_SEED_SALT)))  # [B]
    counter = tf.cast(tf.range(1, steps + 1), tf.uint64) * _u64(_GOLDEN)  # [steps]
    bits = _mix(key[:, None] + counter[None, :])  # [B, steps]
    # The top 24 bits: a float32 holds them exactly, so u < 1 always.
    return tf.cast(tf.bitwise.right_shift(bits, _u64(40)), tf.float32) * (1.0 / (1 << 24))


# --- repetition penalty ---------------------------------------------------------


def penalize(logits, seen, penalty, offsets):
    """The CTRL repetition penalty, written into the logits' own buffer.

    logits float32 [B, V], which nothing else may read afterwards; seen
    int32 [B, W]: the ids already in each row (repeats allowed: they write
    the same value); penalty float32 [B] (> 0); offsets int32 [B, W]: each
    entry's row times V -> [B, V].

    Only the W entries per row are read and written: the cost does not grow
    with the vocabulary. A scatter would copy the whole [B, V] logits at
    every step; InplaceUpdate over the logits seen as [B * V, 1] writes the
    entries where they are.
    """
    v = logits.shape[-1]
    flat = tf.reshape(logits, [-1, 1])  # [B * V, 1]
    at = tf.reshape(seen + offsets, [-1])  # [B * W]
    old = tf.gather(flat, at)  # [B * W, 1]
    r = tf.reshape(tf.broadcast_to(penalty[:, None], tf.shape(seen)), [-1, 1])  # [B * W, 1]
    new = tf.where(old > 0, old / r, old * r)
    return tf.reshape(tf.raw_ops.InplaceUpdate(x=flat, i=at, v=new), [-1, v])


# --- the choice -------------------------------------------------------------------


def plan(top_k, top_p, temperature, vocab_size: int) -> dict:
    """What `pick` needs from the rows' settings, worked out once per call
    (the per-row numbers as [B, 1] columns, which broadcast against the
    [B, M] candidates with no reshape at every step).

    top_k int32 [B] (clamped to [1, V]), top_p float32 [B], temperature
    float32 [B]. Every row goes one of four ways, by its settings alone:

      greedy: temperature <= 0
      short: top_k <= CANDIDATES: its candidates are the fast path's
      whole: top_k >= V and top_p >= 1: a draw from the full softmax, in
        vocabulary order (no sort needed)
      wide: the rest (a nucleus over the whole vocabulary, or a top_k
        between CANDIDATES and V): the fast candidates if the nucleus
        closes within them, else a full sort
    """
    k = tf.clip_by_value(top_k, 1, vocab_size)
    sample = temperature > 0
    short = sample & (k <= CANDIDATES)
    whole = sample & ~short & (k >= vocab_size) & (top_p >= 1.0)
    wide = sample & ~short & ~whole
    # Nucleus rows over the whole vocabulary can use the fast candidates
    # when their nucleus closes within them (decided per step).
    nucleus_all = wide & (k >= vocab_size)
    longest = tf.reduce_max(tf.concat([tf.where(short, k, 1), tf.where(wide, CANDIDATES, 1), [1]], 0))
    candidates = tf.minimum(longest, vocab_size)
    return {
        "k": k[:, None],
        "top_p": top_p[:, None],
        "t": tf.where(sample, temperature, 1.0)[:, None],
        "short": short,
        "whole": whole,
        "wide": wide,
        "nucleus_all": nucleus_all,
        "candidates": candidates,
        "k_short": tf.minimum(k, candidates)[:, None],
        "any_whole": tf.reduce_any(whole),
        "any_wide": tf.reduce_any(wide),
        "fast": ~tf.reduce_any(whole | wide),  # every row greedy or short
    }


def pick(logits, p: dict, u, general: bool = True):
    """One token per row. logits float32 [B, V]; p from `plan`; u float32
    [B, 1] in [0, 1) -> int32 [B]. general=False: only greedy and short rows
    (when `p["fast"]`), without the branches of the other ways."""
    values, indices = top_k_logits(logits, p["candidates"])  # [B, M], largest first
    token = indices[:, 0]  # greedy
    k, t, top_p = p["k"], p["t"], p["top_p"]  # [B, 1]
    token = tf.where(p["short"], _from_sorted(values, indices, p["k_short"], top_p, t, u), token)
    if not general:
        return token

    def whole_vocabulary():
        return _from_unsorted(logits, t, u)

    token = tf.cond(p["any_whole"], lambda: tf.where(p["whole"], whole_vocabulary(), token), lambda: token)

    def wide():
        # A nucleus over the whole vocabulary closes within the M candidates
        # when their mass reaches top_p of the vocabulary's.
        total = tf.reduce_sum(exp_rows((logits - values[:, :1]) / t), -1, keepdims=True)  # [B, 1]
        m = tf.shape(values)[1]
        near, mass = _from_sorted(values, indices, tf.fill(tf.shape(k), m), top_p, t, u, total, with_mass=True)
        closes = p["nucleus_all"] & (m >= CANDIDATES) & (mass >= top_p * total)[:, 0]
        far = p["wide"] & ~closes

        def full_sort():
            # Only the rows that need it are sorted: sorting the whole
            # vocabulary is the slowest thing a step can do.
            rows = tf.cast(tf.where(far)[:, 0], tf.int32)  # [F]
            k_far = tf.gather(k, rows)  # [F, 1]
            full_values, full_indices = tf.math.top_k(tf.gather(logits, rows), tf.reduce_max(k_far))  # [F, width]
            picked = _from_sorted(
                full_values, full_indices, k_far, tf.gather(top_p, rows), tf.gather(t, rows), tf.gather(u, rows)
            )
            return tf.scatter_nd(rows[:, None], picked, tf.shape(far))

        sorted_token = tf.cond(tf.reduce_any(far), full_sort, lambda: tf.zeros_like(token))
        return tf.where(closes, near, tf.where(far, sorted_token, token))

    return tf.cond(p["any_wide"], wide, lambda: token)


def _from_sorted(values, indices, k, top_p, t, u, total=None, with_mass=False):
    """A draw from the top k of each row's sorted candidates, within its nucleus.

    values float32 [B, M] (largest first), indices int32 [B, M]; k int32
    [B, 1] (1 <= k <= M); top_p, t (> 0), u float32 [B, 1]; total float32
    [B, 1] or None: the row's normaliser sum(exp((l - l_max) / t)) when its
    top-k set reaches past the M candidates, else the sum over its first k.
    -> int32 [B], and with_mass also float32 [B, 1]: the unnormalised mass
    of the M candidates, from the same sums.

    Only prefix sums along each row decide, so a row's token does not
    depend on M, which the other rows of the batch set.
    """
    in_k = tf.range(tf.shape(values)[1])[None, :] < k  # [B, M]
    # Shifting by the largest value keeps a tiny temperature from
    # overflowing: the best token stays at exp(0) = 1.
    p = tf.where(in_k, exp_rows((values - values[:, :1]) / t), 0.0)  # [B, M] unnormalised
    cum = tf.cumsum(p, axis=1)  # [B, M]
    if total is None:
        total = tf.gather(cum, k - 1, batch_dims=1)  # [B, 1]
    before = tf.cumsum(p, axis=1, exclusive=True)
    # The nucleus: the first columns whose preceding mass is below top_p of
    # the total, at least one; top_p >= 1 keeps all k (even where rounding
    # would drop a tail).
    inside = tf.reduce_sum(tf.cast(in_k & (before < top_p * total), tf.int32), 1, keepdims=True)
    size = tf.where(top_p >= 1.0, k, tf.maximum(inside, 1))  # [B, 1]
    mass = tf.gather(cum, size - 1, batch_dims=1)  # [B, 1]
    # The first column whose cumulative mass exceeds u of the nucleus's: the
    # count of the columns at or below it (past the nucleus the sums only
    # grow, and the clamp catches u * mass rounding up to mass).
    chosen = tf.reduce_sum(tf.cast(cum <= u * mass, tf.int32), 1, keepdims=True)
    token = tf.gather(indices, tf.minimum(chosen, size - 1), batch_dims=1)[:, 0]
    return (token, cum[:, -1:]) if with_mass else token


def _from_unsorted(logits, t, u):
    """A draw from softmax(logits / t) over the whole vocabulary, by the
    cumulative sum in vocabulary order (any fixed order samples the same
    distribution). logits [B, V], t, u [B, 1] -> int32 [B]."""
    p = exp_rows((logits - tf.reduce_max(logits, -1, keepdims=True)) / t)  # [B, V]
    cum = tf.cumsum(p, axis=1)
    chosen = tf.reduce_sum(tf.cast(cum <= u * cum[:, -1:], tf.int32), 1)
    return tf.minimum(chosen, tf.shape(logits)[1] - 1)


def top_k_logits(logits, k, small=CANDIDATES):
    """tf.math.top_k(logits, k) over a vocabulary-sized last axis, faster for small k.

    logits float32 [B, V], k int32 [] in [1, V] -> (values [B, k], indices int32 [B, k]).

    For k <= small the logits are cut into G groups of R neighbours. The k
    largest logits all lie in the k groups with the largest maxima, so a
    top-k over those k * R candidates gives the same values and indices
    (ties, as in tf.math.top_k, go to the lower index).
    """
    v = logits.shape[-1]
    # Groups of about 32: the fastest at batch 32 of the sizes that divide
    # 20,000 (docs/performance.md); one that divides V avoids padding the
    # logits at every step.
    size = next((r for r in range(32, 65) if v % r == 0), 32)
    groups = -(-v // size)
    if groups <= 2 * small:  # too small a vocabulary to gain anything
        return tuple(tf.math.top_k(logits, k))

    def two_stage():
        batch = tf.shape(logits)[0]
        padded = logits
        if groups * size != v:
            padded = tf.pad(logits, [[0, 0], [0, groups * size - v]], constant_values=-float("inf"))
        table = tf.reshape(padded, [batch, groups, size])  # [B, G, R]
        _, best = tf.math.top_k(tf.reduce_max(table, -1), k)  # [B, k] group ids
        best = tf.sort(best, -1)  # candidates in index order, so ties break as in top_k
        candidates = tf.reshape(tf.gather(table, best, batch_dims=1), [batch, -1])  # [B, k * R]
        values, at = tf.math.top_k(candidates, k)  # [B, k]
        indices = tf.gather(best, at // size, batch_dims=1) * size + at % size
        return values, indices

    return tf.cond(k <= small, two_stage, lambda: tuple(tf.math.top_k(logits, k)))
