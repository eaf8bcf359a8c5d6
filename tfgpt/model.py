"""The miniature GPT: token + position embeddings, Transformer blocks, and a
dense output layer over the vocabulary.

Besides the plain forward pass, the model offers what training needs:
`hidden` and `loss_sum`, which never builds the whole [B*T, V] logits tensor
at once. Generation with a key/value cache lives in `tfgpt/decode.py` and
`tfgpt/sampler.py`.
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.layers import Block, Dense, Embedding, TiedOutput, fold_seed


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
            if c.tie_embeddings:
                self.head = TiedOutput(self.token_emb, compute_dtype=self.compute_dtype, name="head")
            else:
                self.head = Dense(c.embed_dim, c.vocab_size, seed=base + 3, compute_dtype=self.compute_dtype,
                                  name="head")

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

    def loss_sum(self, ids, targets, weights, seed=None, training=False, chunk=0, with_grad=True,
                 branch_free=False, smoothing=0.0):
        """Sum over positions of weights * cross-entropy(logits, targets).

        ids, targets int32 [B, T]; weights float32 [B, T] (0 for padding).
        The output layer and the softmax run `chunk` positions at a time
        (see `chunked_xent_sum`), so the peak memory of the loss does not grow
        with B*T*V. `branch_free`: no data-dependent conditional (for XLA on GPUs).
        """
        h = self.hidden(ids, seed, training)  # [B, T, D]
        d = self.config.embed_dim
        return chunked_xent_sum(
            tf.reshape(h, [-1, d]), self.head.w, self.head.b,
            tf.reshape(targets, [-1]), tf.reshape(weights, [-1]),
            chunk=chunk, compute_dtype=self.compute_dtype, with_grad=with_grad, branch_free=branch_free,
            smoothing=smoothing)


# Bytes of float32 logits one loss chunk may take, by device type: on a CPU a
# block that stays in its cache; a GPU has the memory for all of a replica's
# rows at the default size, and each extra chunk is one more kernel sequence.
CHUNK_BUDGET = {"CPU": 32 << 20, "GPU": 1 << 30}


def auto_chunk(n: int, vocab: int, budget_bytes: int = CHUNK_BUDGET["CPU"]) -> int:
    """The largest divisor of n whose [chunk, vocab] float32 logits fit the budget."""
    target = max(1, budget_bytes // (4 * vocab))
    if n <= target:
        return n
    for c in range(target, 0, -1):
        if n % c == 0:
            return c
    return 1


_TINY = 2.0 ** -126  # the smallest normal float32


def chunked_xent_sum(h, w, b, targets, weights, chunk=0, compute_dtype=tf.float32, with_grad=True,
                     branch_free=False, smoothing=0.0):
    """sum_i weights[i] * CE(h[i] @ w + b, targets[i]), `chunk` rows at a time.

    h [N, D], w [D, V], b [V], targets int32 [N], weights float32 [N] -> scalar.

    The loss and its gradient are computed together, in one pass over each
    [chunk, V] block of logits, so the output layer costs three matrix
    products (no recomputation) and no more than one block of logits is alive
    at a time. Per block, with p = softmax(logits):

        loss_i = -log p[i, t_i]
        dlogits = w_i (p - one_hot(t))

    If some p[i, t_i] of a weighted row is below the smallest normal float32
    (its logit more than about 87 below the row's largest), that block's loss is
    taken from the log-sum-exp instead, lse_i - logits[i, t_i] with
    lse_i = max_j logits[i, j] - log(max_j p[i, j]) (the largest probability
    is at least 1/V, so its log never underflows). Two reductions over the
    [chunk, V] block are thus spent only where they are needed. With
    `branch_free` both are always computed and selected per row instead:
    under XLA on a GPU a data-dependent conditional copies its predicate to
    the host and waits for it, once per block.
    The one-hot part never becomes a [chunk, V] tensor: its share of each
    gradient is a gather or a segment sum over the N targets, done once.
    With `with_grad=False` (evaluation) only the loss is computed.
    `chunk` must divide N (static); 0 picks one (`auto_chunk`).

    Label smoothing (`smoothing` = e > 0) trains on the target distribution
    (1 - e) one_hot(t) + e / V: loss_i = (1 - e)(-log p[i, t_i]) +
    e (lse_i - mean_j logits[i, j]) and dlogits = w_i (p - (1 - e) one_hot(t) - e / V).
    """
    # Plain tensors: a custom gradient must not capture the variables themselves.
    w, b = tf.convert_to_tensor(w), tf.convert_to_tensor(b)
    n, v = h.shape[0], w.shape[1]
    if n is None:
        raise ValueError("chunked_xent_sum needs a static number of rows")
    chunk = chunk or auto_chunk(n, v)
    if n % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide {n} positions")
    cd = compute_dtype

    def block(h_rows, w_cd, b_cd, rows):
        """-> (softmax [C, V], weighted loss sum) of one block of rows."""
        # The bias is added inside the product, before its result is rounded
        # to the compute type: no separate float32 pass over the block.
        logits = tf.cast(tf.nn.bias_add(tf.matmul(tf.cast(h_rows, cd), w_cd), b_cd), tf.float32)  # [C, V]
        p = tf.nn.softmax(logits)  # [C, V] float32
        t = targets[rows]
        p_t = tf.gather(p, t, batch_dims=1)  # [C]

        def from_lse():
            lse = tf.reduce_max(logits, -1) - tf.math.log(tf.reduce_max(p, -1))  # [C]
            return lse - tf.gather(logits, t, batch_dims=1)

        # Rows of weight 0 (padding) never need the exact value; clamping
        # their p_t keeps 0 * log(0) out of the sum.
        w_rows = weights[rows]
        exact_rows = (p_t >= _TINY) | (w_rows == 0.0)
        if branch_free:
            loss = tf.where(exact_rows, -tf.math.log(tf.maximum(p_t, _TINY)), from_lse())  # [C]
        else:
            loss = tf.cond(tf.reduce_all(exact_rows), lambda: -tf.math.log(tf.maximum(p_t, _TINY)), from_lse)
        if smoothing:
            lse = tf.reduce_max(logits, -1) - tf.math.log(tf.reduce_max(p, -1))  # [C]
            loss = (1.0 - smoothing) * loss + smoothing * (lse - tf.reduce_mean(logits, -1))
        return p, tf.reduce_sum(w_rows * loss)

    b_cd = tf.cast(b, cd)
    if not with_grad:
        w_cd, total = tf.cast(w, cd), tf.zeros([])
        for i in range(n // chunk):
            rows = slice(i * chunk, (i + 1) * chunk)
            with tf.control_dependencies([total]):  # one block at a time
                h_rows = tf.identity(h[rows])
            total += block(h_rows, w_cd, b_cd, rows)[1]
        return total

    @tf.custom_gradient
    def xent(h, w, b):
        w_cd = tf.cast(w, cd)  # [D, V], cast once for all blocks
        hw = h * weights[:, None]  # [N, D]: rows scaled by their weight
        # In bfloat16 the weight gradient is summed as its transpose, from
        # p^T @ hw ([V, D]): oneDNN's bfloat16 hw^T @ p is slower on CPUs
        # (measured: the README's "Speed and memory" section).
        # In float32 the two orders measured the same.
        transposed = cd == tf.bfloat16
        total, dh, db = tf.zeros([]), [], tf.zeros_like(b)
        dw = tf.zeros([v, w.shape[0]]) if transposed else tf.zeros_like(w)
        for i in range(n // chunk):
            rows = slice(i * chunk, (i + 1) * chunk)
            # One block at a time: without this dependency the executor may run
            # several blocks at once, each with its own [C, V] buffers.
            with tf.control_dependencies([dw]):
                h_rows = tf.identity(h[rows])
            p, block_loss = block(h_rows, w_cd, b_cd, rows)
            total += block_loss
            db += tf.linalg.matvec(p, weights[rows], transpose_a=True)  # [V]
            p_cd = tf.cast(p, cd)
            dh.append(weights[rows][:, None] * tf.cast(tf.matmul(p_cd, w_cd, transpose_b=True), tf.float32))
            hw_cd = tf.cast(hw[rows], cd)
            if transposed:
                dw += tf.cast(tf.matmul(p_cd, hw_cd, transpose_a=True), tf.float32)  # [V, D]
            else:
                dw += tf.cast(tf.matmul(hw_cd, p_cd, transpose_a=True), tf.float32)  # [D, V]
        # The one-hot terms, for all N rows at once, after the last block: they
        # depend on no block, and computed early they (an [N, D] and a [V, D]
        # tensor, each with its transpose) stayed alive through the whole loop,
        # where the training step's memory peaks.
        with tf.control_dependencies([dw]):
            w_t = tf.gather(w, targets, axis=1)  # [D, N]
            hw_t = tf.math.unsorted_segment_sum(hw, targets, v)  # [V, D]
        hot = 1.0 - smoothing  # the one-hot share of the target distribution
        dh = tf.concat(dh, 0) - hot * weights[:, None] * tf.transpose(w_t)  # [N, D]
        dw = tf.transpose(dw - hot * hw_t) if transposed else dw - hot * tf.transpose(hw_t)  # [D, V]
        db -= hot * tf.math.unsorted_segment_sum(weights, targets, v)
        if smoothing:  # the uniform share, e / V for every column
            u = smoothing / v
            dh -= u * weights[:, None] * tf.reduce_sum(w, axis=1)[None, :]
            dw -= u * tf.reduce_sum(hw, axis=0)[:, None]
            db -= u * tf.reduce_sum(weights)

        def grad(upstream):
            return upstream * dh, upstream * dw, upstream * db

        return total, grad

    return xent(h, w, b)


def count_params(module: tf.Module) -> int:
    return int(sum(v.shape.num_elements() for v in module.trainable_variables))
