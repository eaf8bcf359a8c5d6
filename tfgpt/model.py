"""The miniature GPT: token + position embeddings, Transformer blocks, and a
dense output layer over the vocabulary.

Besides the plain forward pass, the model offers what generation needs
(`prefill` and `decode`, with a key/value cache) and what training needs
(`hidden` and `loss_sum`, which never builds the whole [B*T, V] logits tensor
at once).
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.layers import Block, Dense, Embedding, fold_seed, matmul


class GPT(tf.Module):
    def __init__(self, config: GPTConfig, seed: int = 0, compute_dtype=tf.float32, name="gpt"):
        super().__init__(name=name)
        self.config = config
        self.compute_dtype = tf.as_dtype(compute_dtype)
        c = config
        base = 1000 * seed
        with self.name_scope:
            self.token_emb = Embedding(c.vocab_size, c.embed_dim, seed=base + 1, name="token_emb")
            self.pos_emb = Embedding(c.maxlen, c.embed_dim, seed=base + 2, name="pos_emb")
            self.blocks = [
                Block(c.embed_dim, c.num_heads, c.key_dim, c.ff_dim, c.dropout,
                      seed=base + 100 * (i + 1), compute_dtype=self.compute_dtype, name=f"block{i}")
                for i in range(c.num_layers)
            ]
            self.head = Dense(c.embed_dim, c.vocab_size, seed=base + 3, compute_dtype=self.compute_dtype, name="head")

    def embed(self, ids, positions):
        """ids int [B, T], positions int [T] or [B, T] -> [B, T, D]."""
        return self.token_emb(ids) + self.pos_emb(positions)

    @tf.Module.with_name_scope
    def hidden(self, ids, seed=None, training=False):
        """ids int32 [B, T] (T <= maxlen) -> final hidden states [B, T, D].

        `seed` (int [2]) drives dropout when training; each block folds in its index.
        """
        x = self.embed(ids, tf.range(tf.shape(ids)[1]))  # [B, T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, seed=None if seed is None else fold_seed(seed, i), training=training)
        return x

    def __call__(self, ids, seed=None, training=False):
        """ids int32 [B, T] -> logits float32 [B, T, V]."""
        return self.head(self.hidden(ids, seed, training))

    def loss_sum(self, ids, targets, weights, seed=None, training=False, chunk=0):
        """Sum over positions of weights * cross-entropy(logits, targets).

        ids, targets int32 [B, T]; weights float32 [B, T] (0 for padding).
        The output layer and the softmax run `chunk` positions at a time
        (see `chunked_xent_sum`), so the peak memory of the loss does not grow
        with B*T*V.
        """
        h = self.hidden(ids, seed, training)  # [B, T, D]
        d = self.config.embed_dim
        return chunked_xent_sum(
            tf.reshape(h, [-1, d]), self.head.w, self.head.b,
            tf.reshape(targets, [-1]), tf.reshape(weights, [-1]),
            chunk=chunk, compute_dtype=self.compute_dtype)

    # --- generation -----------------------------------------------------------

    def prefill(self, ids, cache_len=None):
        """Runs prompts through the model, returning the logits at every position
        and each layer's key/value cache.

        ids int32 [B, T] -> (logits [B, T, V], caches: list of (k, v), each
        [B, H, cache_len, K] with the first T slots filled).
        """
        cache_len = cache_len or self.config.maxlen
        x = self.embed(ids, tf.range(tf.shape(ids)[1]))
        caches = []
        for block in self.blocks:
            x, k, v = block.prefill(x, cache_len)
            caches.append((k, v))
        return self.head(x), caches

    def decode(self, ids, pos, caches):
        """One token per row at its own position.

        ids int32 [B], pos int32 [B] (< cache length) -> (logits [B, V], caches).
        """
        x = self.embed(ids[:, None], pos[:, None])  # [B, 1, D]
        new = []
        for block, (k, v) in zip(self.blocks, caches):
            x, k, v = block.decode(x, k, v, pos)
            new.append((k, v))
        return self.head(x)[:, 0, :], new


def auto_chunk(n: int, vocab: int, budget_bytes: int = 64 << 20) -> int:
    """The largest divisor of n whose [chunk, vocab] float32 logits fit the budget."""
    target = max(1, budget_bytes // (4 * vocab))
    if n <= target:
        return n
    for c in range(target, 0, -1):
        if n % c == 0:
            return c
    return 1


def chunked_xent_sum(h, w, b, targets, weights, chunk=0, compute_dtype=tf.float32):
    """sum_i weights[i] * CE(h[i] @ w + b, targets[i]), computed `chunk` rows at a
    time in the forward pass and again in the backward pass.

    h [N, D], w [D, V], b [V], targets int32 [N], weights float32 [N] -> scalar.
    The gradient is written by hand (softmax - one_hot), so neither pass keeps
    more than one [chunk, V] block of logits alive. `chunk` must divide N;
    0 picks one (`auto_chunk`). N must be static.
    """
    # Plain tensors: a custom gradient must not capture the variables themselves.
    w, b = tf.convert_to_tensor(w), tf.convert_to_tensor(b)
    n, v = h.shape[0], w.shape[1]
    if n is None:
        raise ValueError("chunked_xent_sum needs a static number of rows")
    chunk = chunk or auto_chunk(n, v)
    if n % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide {n} positions")
    steps = n // chunk

    def block_logits(hc, w, b):
        return matmul(hc, w, compute_dtype) + b  # [C, V] float32

    @tf.custom_gradient
    def xent(h, w, b):
        total = tf.zeros([])
        for i in range(steps):
            s = slice(i * chunk, (i + 1) * chunk)
            logits = block_logits(h[s], w, b)
            lse = tf.reduce_logsumexp(logits, axis=-1)
            picked = tf.gather(logits, targets[s], batch_dims=1)
            total += tf.reduce_sum(weights[s] * (lse - picked))

        def grad(upstream):
            dh, dw, db = [], tf.zeros_like(w), tf.zeros_like(b)
            for i in range(steps):
                s = slice(i * chunk, (i + 1) * chunk)
                logits = block_logits(h[s], w, b)
                g = tf.nn.softmax(logits) - tf.one_hot(targets[s], v)  # [C, V]
                g *= (upstream * weights[s])[:, None]
                dh.append(matmul(g, tf.transpose(w), compute_dtype))
                dw += matmul(tf.transpose(h[s]), g, compute_dtype)
                db += tf.reduce_sum(g, axis=0)
            return tf.concat(dh, 0), dw, db

        return total, grad

    return xent(h, w, b)


def count_params(module: tf.Module) -> int:
    return int(sum(v.shape.num_elements() for v in module.trainable_variables))
