"""The decode step: the model run for one new token per row against a
key/value cache, the prefill that fills the cache, and the window pass used
once a row is longer than `maxlen`. The step's attention kernels
(`attend_one`, `write_rows`) are in tfgpt/attention.py beside the attention
that training and the prefill use.

Everything here maps token ids to the last block's hidden state; turning a
hidden state into the next token is `tfgpt.sampling`, and the loop around
both is `tfgpt.sampler`.

The cache of a layer is a pair (k, v). The prefill returns them as
[B, H, S, K]; the decode step keeps them flattened to [B * H * S, K], the
shape the in-place row update takes.

Shapes: B = batch, C = context length (<= maxlen), L = maxlen, S = cache
slots (<= L), W = history width, D = model width, H = heads, K = key size,
F = feed-forward width, V = vocabulary.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfgpt.attention import attend_one, causal_mask, write_rows


def head_weights(model):
    """The output layer's (w [D, V] in the compute dtype, b float32 [V]), cast
    once per call, so that a bfloat16 model does not cast its largest matrix
    at every step."""
    dense = model.head
    return _as_matrix(dense.w, dense.b, dense.w.shape[0], dense.compute_dtype)


def logits(hidden, head):
    """hidden float32 [B, D] -> float32 [B, V], the output layer."""
    return _dense(hidden, head)


def prefill(model, context, context_len, slots):
    """Runs the contexts through the model's blocks once.

    context int32 [B, C] (right-padded), context_len int32 [B] (>= 1), slots
    int32 [] (>= C) -> (hidden float32 [B, D] at each row's last token,
    caches: per layer (k, v), each [B * H * S, K] with the first C slots of
    each (row, head) filled).
    """
    x = model.embed(context, tf.range(tf.shape(context)[1]))  # [B, C, D]
    caches = []
    for block in model.blocks:
        x, k, v = block.prefill(x, slots)  # k, v [B, H, S, K]
        caches.append(tuple(tf.reshape(t, [-1, block.attn.key_dim]) for t in (k, v)))
    return tf.gather(x, context_len - 1, batch_dims=1), caches  # [B, D]


def decode_setup(model, batch, slots):
    """What the decode step needs, prepared once per call outside the loop,
    so that each step runs as few operations as possible:

      blocks: per block a dict of its weights (w in the compute dtype, b
        float32; `_as_matrix`): q, k, v (w [D, H * K]), out (w [H * K, D]),
        fc1 (w [D, F]), fc2 (w [F, D]); the attention's 1 / sqrt(K) folded
        into q. Three products of D x H * K measured faster at batch 1 than
        one of D x 3 * H * K and a split; the feed-forward weights are cast
        here rather than by `Dense` at every step.
      row_base, row_of int32 [B * H]: the cache row of (b, h, slot p), with a
        cache seen as [B * H * S, K], is row_base + p[row_of]
      blocked float32 [S, S]: row p is 0 at the slots a query in slot p
        sees (<= p) and -1e9 elsewhere
      last_slot int32 []: S - 1
      cache_shape int32 [4]: [B, H, S, K]
    """
    blocks = []
    for block in model.blocks:
        attn = block.attn
        d, hk = attn.dim, attn.num_heads * attn.key_dim
        cd = attn.compute_dtype
        ffn = block.ffn
        blocks.append(
            {
                "q": _as_matrix(attn.wq, attn.bq, d, cd, 1.0 / math.sqrt(attn.key_dim)),
                "k": _as_matrix(attn.wk, attn.bk, d, cd),
                "v": _as_matrix(attn.wv, attn.bv, d, cd),
                "out": _as_matrix(attn.wo, attn.bo, hk, cd),
                "fc1": _as_matrix(ffn.fc1.w, ffn.fc1.b, d, ffn.fc1.compute_dtype),
                "fc2": _as_matrix(ffn.fc2.w, ffn.fc2.b, ffn.fc2.w.shape[0], ffn.fc2.compute_dtype),
            }
        )
    heads = model.config.num_heads
    return {
        "blocks": blocks,
        "row_base": tf.range(batch * heads) * slots,
        "row_of": tf.repeat(tf.range(batch), heads),  # [B * H]: the row b of each (b, h)
        "blocked": (1.0 - causal_mask(slots)) * -1e9,
        "last_slot": slots - 1,
        "cache_shape": tf.stack([batch, heads, slots, model.config.key_dim]),
    }


def decode_hidden(model, token, pos, caches, setup, in_place=True):
    """One new token per row against the cache: the model's blocks for a
    single query position, without the output layer.

    token, pos int32 [B] (pos < S); caches: per layer (k, v) [B * H * S, K];
    setup from `decode_setup` -> (hidden float32 [B, D], caches).

    The new key and value are written into their slots (`write_rows`), and
    the attention of one query is computed by `attend_one`; residuals, norms
    and feed-forward are the block's (its own layer norms; the feed-forward
    with the weights `decode_setup` cast). in_place=False writes with a
    scatter instead, for XLA, which has no in-place update.
    """
    x = model.embed(token, pos)  # [B, D]
    blocked = tf.gather(setup["blocked"], pos)  # [B, S]
    rows = setup["row_base"] + tf.gather(pos, setup["row_of"])  # [B * H]
    shape = setup["cache_shape"]
    new = []
    for block, w, (k_cache, v_cache) in zip(model.blocks, setup["blocks"], caches):
        h, kd = block.attn.num_heads, block.attn.key_dim
        q, k, v = (tf.reshape(_dense(x, w[name]), [-1, h, kd]) for name in "qkv")  # each [B, H, K], q scaled
        k_cache = write_rows(k_cache, rows, k, in_place)
        v_cache = write_rows(v_cache, rows, v, in_place)
        context = attend_one(q, tf.reshape(k_cache, shape), tf.reshape(v_cache, shape), blocked)  # [B, H, K]
        out = _dense(tf.reshape(context, [-1, h * kd]), w["out"])  # [B, D]
        # Block.finish without dropout (inference), its feed-forward products
        # from the weights cast once per call.
        a = block.ln1(x + out)  # [B, D]
        f = _dense(_dense(a, w["fc1"], tf.nn.relu), w["fc2"])  # [B, D]
        x = block.ln2(a + f)
        new.append((k_cache, v_cache))
    return x, new


def window_hidden(model, history, n):
    """The last block's output at position n - 1 of each row, from the model
    run over the row's last min(n, L) tokens.

    history int32 [B, W], n int32 [B] (1 <= n <= W) -> [B, D].

    The position embeddings are absolute: a token's keys and values depend
    on its position in the window. When the window slides by one token,
    every token moves to a new position, so the cache cannot be rolled over;
    the whole window is run again.
    """
    size = tf.minimum(model.config.maxlen, tf.reduce_max(n))  # narrower while all rows are short
    start = tf.maximum(n - size, 0)  # [B]
    index = start[:, None] + tf.range(size)[None, :]  # [B, size]
    window = tf.gather(history, index, batch_dims=1)  # [B, size]
    hidden = model.hidden(window)  # [B, size, D]
    return tf.gather(hidden, n - start - 1, batch_dims=1)  # [B, D]


def _as_matrix(w, b, rows, dtype, scale=1.0):
    """A projection's weights as `_dense` takes them: (w [rows, columns] in
    dtype, b float32 [columns]), both multiplied by scale."""
    return tf.cast(tf.reshape(w, [rows, -1]) * scale, dtype), tf.reshape(b * scale, [-1])


def _dense(x, weights, activation=None):
    """activation(x @ w + b) for x float32 [B, in] and (w, b) from
    `_as_matrix` -> float32 [B, out], as the model's `Dense` computes it.

    In float32 the bias is added by BiasAdd right after the product (and the
    ReLU right after that), which TensorFlow's graph optimizer fuses into
    the product: one pass over the output instead of three. In bfloat16 the
    product is rounded to bfloat16 and the float32 bias added after, as in
    the model. (Fused, the bfloat16 product took a faster oneDNN kernel at
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
