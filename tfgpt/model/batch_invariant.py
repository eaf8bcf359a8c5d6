"""Elementwise functions whose result for one row does not depend on how
many rows are computed with it.

TensorFlow's CPU kernels for exp and rsqrt (and log) work through a tensor
in vector registers of 16 float32 numbers, and compute the last (size mod
16) numbers with a scalar function that rounds differently in the last bit.
Which numbers of a row fall into that tail depends on the whole tensor's
size: the same row computed alone and inside a batch can come out different,
and a generated text with them (a row's numbers must depend on the row only,
see tfgpt/serving/sampler.py).

The functions here keep every number in the vector path by giving the
kernel a tensor whose size is a multiple of `PACKET`: a column is widened
before the function and narrowed after, and the row length of the
attention's softmax is a multiple of `PACKET` by construction (the decode
step's cache slots, `round_up`). Sizes that are already multiples pay
nothing but a broadcast.

Sums have the same trouble with the row's length: TensorFlow's reduce_sum
adds a row of 48 numbers in another order than the same row with zeros
appended up to 64, and the decode step's softmax sums a row over the cache
slots, whose count the batch's longest request sets. `row_sum` adds in
order, so that trailing zeros change nothing.
"""

from __future__ import annotations

import tensorflow as tf

# float32 numbers per vector register with AVX-512 (a multiple of AVX2's 8).
PACKET = 16


def round_up(n):
    """n int (Python or int32 tensor) -> the smallest multiple of PACKET >= n."""
    return (n + PACKET - 1) // PACKET * PACKET


def rsqrt_column(x):
    """1 / sqrt(x) for x float32 [..., 1] (a layer norm's variance per row),
    computed as [..., PACKET] -> [..., 1]."""
    shape = tf.concat([tf.shape(x)[:-1], [PACKET]], 0)
    return tf.math.rsqrt(tf.broadcast_to(x, shape))[..., :1]


def exp_rows(x):
    """exp(x) for x float32 [B, M] of any M, the rows padded to a multiple of
    PACKET columns for the kernel (when M is not known to be one)."""
    m = x.shape[-1]
    if m is not None and m % PACKET == 0:
        return tf.exp(x)
    width = tf.shape(x)[-1]
    return tf.exp(tf.pad(x, [[0, 0], [0, round_up(width) - width]]))[:, :width]


def row_sum(x):
    """The sum of x [..., N] over its last axis -> [..., 1], added from the
    first number to the last (the last of a cumulative sum): a row's sum
    does not change with zeros appended to it or with the rows beside it."""
    return tf.cumsum(x, axis=-1)[..., -1:]


def apply_dense(x, weights, activation=None):
    """activation(x @ w + b) for x float32 [N, in] and (w, b) from a layer's
    `decode_weights` -> float32 [N, out]: the cached path's product, a
    `Dense` without its reshapes and casts of the weights.

    In float32 the bias is added by BiasAdd right after the product (and the
    ReLU right after that), which TensorFlow's graph optimizer fuses into
    the product: one pass over the output instead of three. In bfloat16 the
    product is rounded to bfloat16 and the float32 bias added after, as in
    `Dense`. (Fused, the bfloat16 product took a faster oneDNN kernel at
    batch 1, but a different one from larger batches: a row's logits then
    depended on the batch size, and a request's text on what it was
    batched with.)
    """
    w, b = weights
    if w.dtype == tf.float32:
        y = tf.nn.bias_add(tf.matmul(x, w), b)
    else:
        y = tf.cast(tf.matmul(tf.cast(x, w.dtype), w), tf.float32) + b
    return y if activation is None else activation(y)
