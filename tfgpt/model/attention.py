"""Causal softmax attention: `attend`, the function of training, and
beside it the kernels of the cached path (`tfgpt.model.layers`'
`prefill` and `call_with_cache`): the cache row write, `attend_one`, the
same attention for one query per row against the cache, and the softmax
both the prefill and `attend_one` use (tests/test_attention.py checks them
against each other and against NumPy).

Shapes: B = batch, H = heads, Tq = queries, Tk = keys, K = per-head key
size, S = cache slots.

The cache of a layer is a pair (k, v), each kept as [B * H * S, K]: row
((b * H) + h) * S + p holds slot p of head h of batch row b, so that one
new key per (b, h) is a write of B * H rows, and a reshape to [B, H, S, K]
is all the attention needs to read it.

The decode step runs once per generated token on tensors of a few thousand
numbers, where the kernel launches, not the arithmetic, take the time: so
`attend_one` takes its query already scaled and its mask as an additive
[B, S] row.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfgpt.model import batch_invariant


def causal_mask(t, keys=None):
    """[T, keys] float mask (keys = T by default), 1 where position i may
    attend to position j (j <= i): the lower triangle of a matrix of ones."""
    return tf.linalg.band_part(tf.ones([t, t if keys is None else keys]), -1, 0)


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


def write_rows(cache, rows, new):
    """cache [B * H * S, K] with new [B, H, K] written at the given rows [B * H].

    InplaceUpdate writes into the cache's own buffer, where a scatter
    copies the whole cache at every step. It never copies, even when
    something else still reads the old value, so the update must be the old
    cache's last reader: in the decoding loop, each step's cache is read by
    nothing but the next step.
    """
    new = tf.reshape(new, [-1, tf.shape(cache)[1]])  # [B * H, K]
    return tf.raw_ops.InplaceUpdate(x=cache, i=rows, v=new)


def attend_one(q, k_cache, v_cache, blocked):
    """`attend` for one query per row and head, in float32, the query
    already multiplied by 1 / sqrt(K).

    q [B, H, K]; k_cache, v_cache [B, H, S, K]; blocked [B, S] (0 where
    visible, -1e9 where not) -> [B, H, K].

    One kernel for every batch: a row's sums must be added in the same order
    whether it is served alone or batched with others, or its numbers (and
    in bfloat16, once rounded, its samples) would depend on the batch. For
    the same reason H * S should be a multiple of 16, so that the softmax's
    exp never reaches the kernel's scalar tail (`tfgpt.model.batch_invariant`;
    the sampler's cache slots are, `tfgpt.serving.decode.cache_slots`).
    """
    scores = tf.matmul(q[:, :, None, :], k_cache, transpose_b=True)[:, :, 0, :] + blocked[:, None, :]  # [B, H, S]
    return tf.matmul(softmax(scores)[:, :, None, :], v_cache)[:, :, 0, :]  # [B, H, K]


def softmax(x):
    """Softmax over the last axis, written out (for these small tensors it is
    faster than the fused kernel), its sum added in order
    (`tfgpt.model.batch_invariant.row_sum`): keys padded past a row's last
    position (exp = 0) leave its numbers as they are."""
    e = tf.exp(x - tf.reduce_max(x, -1, keepdims=True))
    return e / batch_invariant.row_sum(e)
