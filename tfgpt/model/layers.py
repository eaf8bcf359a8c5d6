"""The building blocks of the model, each a small `tf.Module`.

Shapes in comments use B = batch, T = positions, D = model width,
H = heads, K = per-head key size, F = feed-forward width, V = vocabulary.

Every layer keeps its variables in float32. `compute_dtype` (float32 or
bfloat16) is the type its matrix products run in; layer norm, softmax and
everything that accumulates stays in float32.

Training calls a block on whole sequences (`Block.__call__`). Generation
runs the same block with a key/value cache: `Block.prefill` over a batch of
prompts fills the cache, `Block.call_with_cache` takes one new token per
row against it. Both take the matrices of `decode_weights` (prepared once
per call, or once for an export: the compute dtype, the layout `batch_invariant.apply_dense`
multiplies by, the attention's 1 / sqrt(K) folded into the query's), and
choose their arithmetic so that a row's numbers do not depend on the other
rows of its batch: float32 attention (`tfgpt.model.attention.attend_one`),
the layer norms with the rsqrt of `tfgpt.model.batch_invariant`. The
residuals, norms and feed-forward around the attention are one function
for every path (`Block._finish`).

The cache of a layer is a pair (k, v), each [B * H * S, K] for S slots
(the layout of `tfgpt.model.attention.write_rows`).
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfgpt.model import attention, batch_invariant


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


def _as_matrix(w, b, rows, dtype, scale=1.0):
    """A projection's weights as `batch_invariant.apply_dense` takes them: (w [rows, columns]
    in dtype, b float32 [columns]), both multiplied by scale. A variable that
    already has that form is returned as it is (a float32 model's decode
    weights are mostly its own variables)."""

    def form(x, shape, dtype):
        if scale == 1.0 and x.dtype == dtype and len(x.shape) == len(shape):
            return x
        return tf.cast(tf.reshape(x, shape) * scale, dtype)

    return form(w, [rows, -1], dtype), form(b, [-1], b.dtype)


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

    def decode_weights(self):
        """(w [in, out] in the compute dtype, b float32 [out]) for `batch_invariant.apply_dense`."""
        return _as_matrix(self.w, self.b, self.w.shape[0], self.compute_dtype)


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

    def decode_weights(self):
        """(w [D, V] in the compute dtype, b float32 [V]) for `batch_invariant.apply_dense`."""
        return _as_matrix(self.w, self.b, self.w.shape[0], self.compute_dtype)


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

    The attention itself is `tfgpt.model.attention`'s: `attend` for a whole
    sequence (`__call__`, training), the prefill's per-head products and the
    decode step's `attend_one` for the cached path (`prefill`,
    `call_with_cache`, from the matrices of `decode_weights`).
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

    @tf.Module.with_name_scope
    def __call__(self, x):
        """Full causal self-attention, one head at a time. x [B, T, D] -> [B, T, D].

        Each head's q, k and v come out of their own products as [B*T, K],
        already the [B, T, K] layout the batched products take, so no
        [B, T, H, K] tensor is transposed, forward or backward
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

    # --- the cached path ----------------------------------------------------------

    def decode_weights(self) -> dict:
        """The projections as `batch_invariant.apply_dense` takes them: q, k, v (w [D, H * K]),
        the attention's 1 / sqrt(K) folded into q; out (w [H * K, D]). One
        product of D x 3 * H * K and a split measured no faster than the
        three (docs/performance.md)."""
        d, hk, cd = self.dim, self.num_heads * self.key_dim, self.compute_dtype
        return {
            "q": _as_matrix(self.wq, self.bq, d, cd, 1.0 / math.sqrt(self.key_dim)),
            "k": _as_matrix(self.wk, self.bk, d, cd),
            "v": _as_matrix(self.wv, self.bv, d, cd),
            "out": _as_matrix(self.wo, self.bo, hk, cd),
        }

    def _qkv(self, x, weights, shape):
        """x float32 [N, D] -> q (scaled), k, v, each reshaped to shape ([..., H, K])."""
        return (tf.reshape(batch_invariant.apply_dense(x, weights[name]), shape) for name in "qkv")

    def _out(self, context, weights):
        """context [..., H, K] (N positions) -> the output projection [N, D]."""
        return batch_invariant.apply_dense(tf.reshape(context, [-1, self.num_heads * self.key_dim]), weights["out"])

    def prefill(self, x, weights, span):
        """Causal attention over whole prompts, one head at a time as [B, C, K]
        slices (no [B, C, H, K] transpose), and their keys and values as a
        new cache.

        x float32 [B * C, D] (B rows of C positions), weights from
        `decode_weights`, span from `prefill_span` -> (out float32
        [B * C, D], cache (k, v), each [B * H * S, K] with the first C slots
        of each (row, head) filled).
        """
        b, c, seen = span["batch"], span["length"], span["keys"]
        h, kd = self.num_heads, self.key_dim
        q, k, v = self._qkv(x, weights, [b, c, h, kd])  # each [B, C, H, K]
        ks, vs = [k[:, :, i] for i in range(h)], [v[:, :, i] for i in range(h)]
        keys = [[0, 0], [0, seen - c], [0, 0]]
        context_h = [
            tf.matmul(
                attention.softmax(
                    tf.matmul(q[:, :, i], tf.pad(ks[i], keys), transpose_b=True) + span["blocked"]
                ),  # [B, C, seen]
                tf.pad(vs[i], keys),
            )  # [B, C, K]
            for i in range(h)
        ]
        out = self._out(tf.stack(context_h, 2), weights)  # [B * C, D]
        pad = [[0, 0], [0, 0], [0, span["slots"] - c], [0, 0]]
        cache = tuple(tf.reshape(tf.pad(tf.stack(t, 1), pad), [-1, kd]) for t in (ks, vs))  # [B * H * S, K]
        return out, cache

    def call_with_cache(self, x, cache, weights, step):
        """One new position per row: its key and value written into the cache
        (`attention.write_rows`), its query against the cache
        (`attention.attend_one`).

        x float32 [B, D], cache (k, v) each [B * H * S, K], weights from
        `decode_weights`, step from the decode loop: "rows" int32 [B * H]
        (the cache rows to write), "blocked" float32 [B, S] (0 at the slots
        each row sees, -1e9 elsewhere), "cache_shape" int32 [4] ([B, H, S, K])
        -> (out float32 [B, D], cache). The old cache is not to be read
        after this: it is written in place.
        """
        q, k, v = self._qkv(x, weights, [-1, self.num_heads, self.key_dim])  # each [B, H, K], q scaled
        k_cache, v_cache = cache
        k_cache = attention.write_rows(k_cache, step["rows"], k)
        v_cache = attention.write_rows(v_cache, step["rows"], v)
        shape = step["cache_shape"]
        context = attention.attend_one(
            q, tf.reshape(k_cache, shape), tf.reshape(v_cache, shape), step["blocked"]
        )  # [B, H, K]
        return self._out(context, weights), (k_cache, v_cache)  # [B, D]


def prefill_span(batch, length, slots) -> dict:
    """What every block's `prefill` shares for B prompts of C positions
    (right-padded) and a cache of S slots (>= C): "batch", "length", "slots";
    "keys": the key positions, C rounded up to a multiple of 16; "blocked"
    float32 [C, keys]: 0 where key j <= query i, -1e9 elsewhere.

    A row's numbers do not depend on how far the batch's longest prompt pads
    it: its padding comes after its tokens, where the causal mask hides it;
    the keys are padded with zeros to a multiple of 16 positions (masked
    too), so that the softmax's exps stay in the vector kernel
    (`tfgpt.model.batch_invariant`) and its sums, added in order, only gain
    exact zeros.
    """
    seen = batch_invariant.round_up(length)  # key positions, >= C
    blocked = (1.0 - attention.causal_mask(length, seen)) * -1e9  # [C, seen]
    return {"batch": batch, "length": length, "keys": seen, "blocked": blocked, "slots": slots}


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

    def decode_weights(self) -> dict:
        """fc1 (w [D, F]) and fc2 (w [F, D]) as `batch_invariant.apply_dense` takes them."""
        return {"fc1": self.fc1.decode_weights(), "fc2": self.fc2.decode_weights()}

    @staticmethod
    def with_weights(x, weights):
        """The feed-forward of x float32 [N, D] from the matrices of
        `decode_weights` (or a dict holding them) -> [N, D]."""
        return batch_invariant.apply_dense(batch_invariant.apply_dense(x, weights["fc1"], tf.nn.relu), weights["fc2"])


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

    def _finish(self, x, attn_out, ffn, rsqrt=tf.math.rsqrt, seed=None, training=False):
        """Residuals, dropout, feed-forward and norms around an attention
        output (x and attn_out [..., D]): the block's arithmetic after its
        attention, on every path. ffn: the feed-forward function; rsqrt: the
        layer norms' (`LayerNorm`)."""
        a = self.ln1(x + dropout(attn_out, self.rate, None if seed is None else fold_seed(seed, 1), training), rsqrt)
        f = ffn(a)
        return self.ln2(a + dropout(f, self.rate, None if seed is None else fold_seed(seed, 2), training), rsqrt)

    @tf.Module.with_name_scope
    def __call__(self, x, seed=None, training=False):
        """x [B, T, D] -> [B, T, D]. `seed` [2] is needed when training with dropout."""
        return self._finish(x, self.attn(x), self.ffn, seed=seed, training=training)

    # --- the cached path ----------------------------------------------------------

    def decode_weights(self) -> dict:
        """The cached path's matrices (`batch_invariant.apply_dense`'s (w, b)): q (scaled), k,
        v, out (`MultiHeadAttention.decode_weights`), fc1, fc2."""
        return {**self.attn.decode_weights(), **self.ffn.decode_weights()}

    def _finish_cached(self, x, attn_out, weights):
        """`_finish` for inference, with the decode matrices' feed-forward and
        the rsqrt of `tfgpt.model.batch_invariant`."""
        return self._finish(
            x, attn_out, lambda a: FeedForward.with_weights(a, weights), rsqrt=batch_invariant.rsqrt_column
        )

    def prefill(self, x, weights, span):
        """The block over whole prompts, filling its cache. x float32 [B * C, D],
        weights from `decode_weights`, span from `prefill_span` -> (float32
        [B * C, D], cache (k, v) each [B * H * S, K])."""
        out, cache = self.attn.prefill(x, weights, span)
        return self._finish_cached(x, out, weights), cache

    def call_with_cache(self, x, cache, weights, step):
        """The block for one new position per row against its cache.
        x float32 [B, D], cache, weights and step as
        `MultiHeadAttention.call_with_cache` takes them -> (float32 [B, D],
        cache)."""
        out, cache = self.attn.call_with_cache(x, cache, weights, step)
        return self._finish_cached(x, out, weights), cache
