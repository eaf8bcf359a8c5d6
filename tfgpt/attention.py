"""Causal softmax attention: the one function that training, the prefill
and the cached decode step all call, and the two kernels only the decode
step needs (the mask of a query against its cache, and the cache row write).

Shapes: B = batch, H = heads, Tq = queries, Tk = keys, K = per-head key
size, S = cache slots.

The cache of a layer is a pair (k, v), each kept as [B * H * S, K]: row
((b * H) + h) * S + p holds slot p of head h of batch row b, so that one
new key per (b, h) is a write of B * H rows, and a reshape to [B, H, S, K]
is all `attend` needs to read it.
"""

from __future__ import annotations

import math

import tensorflow as tf


def causal_mask(t):
    """[T, T] float mask, 1 where position i may attend to position j (j <= i):
    the lower triangle of a matrix of ones."""
    return tf.linalg.band_part(tf.ones([t, t]), -1, 0)


def attend(q, k, v, mask, compute_dtype=tf.float32):
    """Softmax attention. q [B, H, Tq, K], k/v [B, H, Tk, K], mask float32
    broadcastable to [B, H, Tq, Tk] (1 = may attend) -> context float32
    [B, H, Tq, K].

    The two products run in compute_dtype; the scores, their 1 / sqrt(K)
    scaling, the mask and the softmax are float32.
    """
    cd = compute_dtype
    scores = tf.matmul(tf.cast(q, cd), tf.cast(k, cd), transpose_b=True)  # [B, H, Tq, Tk]
    scores = tf.cast(scores, tf.float32) * (1.0 / math.sqrt(q.shape[-1])) + (1.0 - mask) * -1e9
    probs = tf.nn.softmax(scores, axis=-1)  # [B, H, Tq, Tk] float32
    return tf.cast(tf.matmul(tf.cast(probs, cd), tf.cast(v, cd)), tf.float32)  # [B, H, Tq, K]


# --- the decode step's kernels ------------------------------------------------


def cache_mask(causal, pos):
    """The mask of one query per row against its cache: row pos[b] of the
    cache's causal mask, the slots <= pos[b].

    causal float32 [S, S] (`causal_mask(S)`), pos int32 [B] -> float32
    [B, 1, 1, S], as `attend` takes it."""
    return tf.gather(causal, pos)[:, None, None, :]


def write_rows(cache, rows, new, in_place=True):
    """cache [B * H * S, K] with new ([B, H, K] or [B, H, 1, K]) written at the
    given rows [B * H].

    in_place: InplaceUpdate writes into the cache's own buffer, where a
    scatter copies the whole cache at every step. It never copies, even when
    something else still reads the old value, so it is used only where the
    update is the old cache's last reader: in the decoding loop, each step's
    cache is read by nothing but the next step. in_place=False is the
    scatter, for XLA, which has no in-place update.
    """
    new = tf.reshape(new, [-1, tf.shape(cache)[1]])  # [B * H, K]
    if in_place:
        return tf.raw_ops.InplaceUpdate(x=cache, i=rows, v=new)
    return tf.tensor_scatter_nd_update(cache, rows[:, None], new)
