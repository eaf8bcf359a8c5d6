"""The building blocks of the model, each a small `tf.Module`.

Shapes in comments use B = batch, T = positions, D = model width,
H = heads, K = per-head key size, F = feed-forward width, V = vocabulary.

Every layer keeps its variables in float32. `compute_dtype` (float32 or
bfloat16) is the type its matrix products run in; layer norm, softmax and
everything that accumulates stays in float32.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfgpt.model import attention


def _uniform_init(shape, fan_in, fan_out, seed):
    """Glorot-uniform, as Keras' Dense and EinsumDense use."""
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return tf.random.stateless_uniform(shape, seed=[seed, 0], minval=-limit, maxval=limit)


def dropout(x, rate: float, seed, training: bool):
    """Stateless dropout: the same seed drops the same units, with or without XLA
    on one device type. `seed` is an int32/int64 tensor of shape [2]."""
    if not training or rate == 0.0:
        return x
    return tf.nn.experimental.stateless_dropout(x, rate=rate, seed=seed)


def fold_seed(seed, salt: int):
    """A new [2] seed derived from `seed` and a small integer salt."""
    return tf.random.experimental.stateless_fold_in(seed, salt)


def matmul(x, w, compute_dtype):
    """`x @ w` over the last axis of x, run in compute_dtype, returned in float32."""
    y = tf.matmul(tf.cast(x, compute_dtype), tf.cast(w, compute_dtype))
    return tf.cast(y, tf.float32)


class Dense(tf.Module):
    """y = x @ w + b. x: [..., in_dim] -> y: [..., out_dim]."""

    def __init__(self, in_dim, out_dim, seed=0, compute_dtype=tf.float32, name=None):
        super().__init__(name=name)
        self.compute_dtype = compute_dtype
        self.w = tf.Variable(_uniform_init([in_dim, out_dim], in_dim, out_dim, seed), name="w")
        self.b = tf.Variable(tf.zeros([out_dim]), name="b")

    @tf.Module.with_name_scope
    def __call__(self, x):
        if x.shape.rank == 2:  # [N, in]: no reshapes (the sampler's one-token step)
            return matmul(x, self.w, self.compute_dtype) + self.b
        lead = tf.shape(x)[:-1]
        x2 = tf.reshape(x, [-1, self.w.shape[0]])  # [N, in]
        y = matmul(x2, self.w, self.compute_dtype) + self.b  # [N, out]
        return tf.reshape(y, tf.concat([lead, [self.w.shape[1]]], 0))


class TiedOutput(tf.Module):
    """The output layer of tied embeddings: logits = x @ table^T + b, with the
    token embedding's table as its weights (no matrix of its own).
    x: [..., D] -> [..., V]. `w` is the [D, V] view of the table, as Dense has."""

    def __init__(self, embedding, compute_dtype=tf.float32, name=None):
        super().__init__(name=name)
        self.embedding, self.compute_dtype = embedding, compute_dtype
        self.b = tf.Variable(tf.zeros([embedding.table.shape[0]]), name="b")

    @property
    def w(self):
        return tf.transpose(self.embedding.table)  # [D, V]

    @tf.Module.with_name_scope
    def __call__(self, x):
        lead = tf.shape(x)[:-1]
        y = matmul(tf.reshape(x, [-1, x.shape[-1]]), self.w, self.compute_dtype) + self.b  # [N, V]
        return tf.reshape(y, tf.concat([lead, [self.b.shape[0]]], 0))


class Embedding(tf.Module):
    """Lookup table. ids: int [...] -> [..., dim]."""

    def __init__(self, num, dim, seed=0, name=None):
        super().__init__(name=name)
        # Keras' Embedding initialises uniformly in [-0.05, 0.05].
        self.table = tf.Variable(
            tf.random.stateless_uniform([num, dim], seed=[seed, 1], minval=-0.05, maxval=0.05),
            name="table",
        )

    @tf.Module.with_name_scope
    def __call__(self, ids):
        return tf.gather(self.table, ids)


class LayerNorm(tf.Module):
    """Normalises the last axis, in float32. x: [..., D] -> [..., D].

    rsqrt: the function for 1 / sqrt(variance + eps) of the [..., 1]
    column; generation passes `tfgpt.model.batch_invariant.rsqrt_column`, whose
    numbers for a row do not depend on how many rows there are."""

    def __init__(self, dim, eps=1e-6, name=None):
        super().__init__(name=name)
        self.eps = eps
        self.gamma = tf.Variable(tf.ones([dim]), name="gamma")
        self.beta = tf.Variable(tf.zeros([dim]), name="beta")

    @tf.Module.with_name_scope
    def __call__(self, x, rsqrt=tf.math.rsqrt):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * rsqrt(var + self.eps) * self.gamma + self.beta


class MultiHeadAttention(tf.Module):
    """Causal multi-head self-attention with separate per-head projections.

    Variables (as Keras' MultiHeadAttention lays them out):
      q, k, v: w [D, H, K], b [H, K];  out: w [H, K, D], b [D].

    The attention itself is `tfgpt.model.attention.attend`; this module adds the
    projections around it. Training calls it on a whole sequence; `qkv` and
    `attend` are the same function in the [B, H, T, K] layout (the reference
    tests/test_layers.py holds `__call__` to). Generation (tfgpt/decode.py)
    reads the weights and does its own arithmetic.
    """

    def __init__(self, dim, num_heads, key_dim, seed=0, compute_dtype=tf.float32, name=None):
        super().__init__(name=name)
        self.dim, self.num_heads, self.key_dim = dim, num_heads, key_dim
        self.compute_dtype = compute_dtype
        hk = num_heads * key_dim

        def projection(fan_in, fan_out, salt, shape):
            return tf.reshape(_uniform_init([fan_in, fan_out], fan_in, fan_out, seed + salt), shape)

        with self.name_scope:
            self.wq = tf.Variable(projection(dim, hk, 0, [dim, num_heads, key_dim]), name="wq")
            self.wk = tf.Variable(projection(dim, hk, 1, [dim, num_heads, key_dim]), name="wk")
            self.wv = tf.Variable(projection(dim, hk, 2, [dim, num_heads, key_dim]), name="wv")
            self.bq = tf.Variable(tf.zeros([num_heads, key_dim]), name="bq")
            self.bk = tf.Variable(tf.zeros([num_heads, key_dim]), name="bk")
            self.bv = tf.Variable(tf.zeros([num_heads, key_dim]), name="bv")
            self.wo = tf.Variable(projection(hk, dim, 3, [num_heads, key_dim, dim]), name="wo")
            self.bo = tf.Variable(tf.zeros([dim]), name="bo")

    def _project(self, x, w, b):
        """x [B, T, D] -> [B, H, T, K]."""
        bsz, t = tf.shape(x)[0], tf.shape(x)[1]
        hk = self.num_heads * self.key_dim
        # The bias is added to the [B*T, H*K] product, where float32 fuses it
        # into the product and its gradient is one column sum.
        y = matmul(tf.reshape(x, [-1, self.dim]), tf.reshape(w, [self.dim, hk]), self.compute_dtype)
        y = tf.reshape(y + tf.reshape(b, [hk]), [bsz, t, self.num_heads, self.key_dim])  # [B, T, H, K]
        return tf.transpose(y, [0, 2, 1, 3])  # [B, H, T, K]

    def qkv(self, x):
        """x [B, T, D] -> q, k, v, each [B, H, T, K]."""
        return (
            self._project(x, self.wq, self.bq),
            self._project(x, self.wk, self.bk),
            self._project(x, self.wv, self.bv),
        )

    def attend(self, q, k, v, mask):
        """q [B, H, Tq, K], k/v [B, H, Tk, K], mask broadcastable to [B, H, Tq, Tk]
        (1 = may attend) -> [B, Tq, D]."""
        ctx = attention.attend(q, k, v, mask, self.compute_dtype)  # [B, H, Tq, K] float32
        ctx = tf.transpose(ctx, [0, 2, 1, 3])  # [B, Tq, H, K]
        bsz, tq = tf.shape(ctx)[0], tf.shape(ctx)[1]
        hk = self.num_heads * self.key_dim
        out = matmul(tf.reshape(ctx, [-1, hk]), tf.reshape(self.wo, [hk, self.dim]), self.compute_dtype) + self.bo
        return tf.reshape(out, [bsz, tq, self.dim])  # [B, Tq, D]

    @tf.Module.with_name_scope
    def __call__(self, x):
        """Full causal self-attention, one head at a time. x [B, T, D] -> [B, T, D].

        The same function as `attend(*qkv(x), causal_mask(T))`, arranged for
        training: each head's q, k and v come out of their own products as
        [B*T, K], already the [B, T, K] layout the batched products take, so
        no [B, T, H, K] tensor is transposed, forward or backward
        (docs/performance.md has the measurement).
        """
        cd, kd = self.compute_dtype, self.key_dim
        bsz, t = tf.shape(x)[0], tf.shape(x)[1]
        x2 = tf.reshape(x, [-1, self.dim])  # [B*T, D]
        mask = attention.causal_mask(t)  # [T, T]
        out = tf.convert_to_tensor(self.bo)  # [D], broadcast over the rows
        for h in range(self.num_heads):
            q, k, v = (
                tf.reshape(matmul(x2, w[:, h], cd) + b[h], [bsz, t, kd])  # [B, T, K]
                for w, b in ((self.wq, self.bq), (self.wk, self.bk), (self.wv, self.bv))
            )
            ctx = attention.attend(q, k, v, mask, cd)  # [B, T, K] float32
            out += matmul(tf.reshape(ctx, [-1, kd]), self.wo[h], cd)  # [B*T, D]
        return tf.reshape(out, [bsz, t, self.dim])


class FeedForward(tf.Module):
    """relu(x @ w1 + b1) @ w2 + b2. x [..., D] -> [..., D]."""

    def __init__(self, dim, hidden, seed=0, compute_dtype=tf.float32, name=None):
        super().__init__(name=name)
        with self.name_scope:
            self.fc1 = Dense(dim, hidden, seed=seed, compute_dtype=compute_dtype, name="fc1")
            self.fc2 = Dense(hidden, dim, seed=seed + 1, compute_dtype=compute_dtype, name="fc2")

    @tf.Module.with_name_scope
    def __call__(self, x):
        return self.fc2(tf.nn.relu(self.fc1(x)))


class Block(tf.Module):
    """A post-layer-norm Transformer block, as in the Keras example:

    a = LN1(x + Dropout(Attention(x)))
    y = LN2(a + Dropout(FeedForward(a)))
    """

    def __init__(self, dim, num_heads, key_dim, ff_dim, rate, seed=0, compute_dtype=tf.float32, name=None):
        super().__init__(name=name)
        self.rate = rate
        with self.name_scope:
            self.attn = MultiHeadAttention(dim, num_heads, key_dim, seed=seed, compute_dtype=compute_dtype, name="attn")
            self.ln1 = LayerNorm(dim, name="ln1")
            self.ffn = FeedForward(dim, ff_dim, seed=seed + 10, compute_dtype=compute_dtype, name="ffn")
            self.ln2 = LayerNorm(dim, name="ln2")

    def finish(self, x, attn_out, seed=None, training=False):
        """Residuals, dropout, feed-forward and norms around an attention output
        (x and attn_out [..., D])."""
        a = self.ln1(x + dropout(attn_out, self.rate, None if seed is None else fold_seed(seed, 1), training))
        f = self.ffn(a)
        return self.ln2(a + dropout(f, self.rate, None if seed is None else fold_seed(seed, 2), training))

    @tf.Module.with_name_scope
    def __call__(self, x, seed=None, training=False):
        """x [B, T, D] -> [B, T, D]. `seed` [2] is needed when training with dropout."""
        return self.finish(x, self.attn(x), seed, training)
