"""The decode step: the model run for one new token per row against a
key/value cache, the prefill that fills the cache, and the window pass used
once a row is longer than `maxlen`.

Everything here maps token ids to the last block's hidden state; turning a
hidden state into the next token is `tfgpt.sampling`, and the loop around
both is `tfgpt.sampler`. The attention of every path, and the kernels of
the cached step (the cache row write and the query's mask over the cache),
are `tfgpt.attention`.

The cache of a layer is a pair (k, v). The prefill returns them as
[B, H, S, K]; the decode step keeps them flattened to [B * H * S, K], the
shape the in-place row update takes.

Shapes: B = batch, C = context length (<= maxlen), L = maxlen, S = cache
slots (<= L), W = history width, D = model width, H = heads, K = key size.
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.attention import cache_mask, causal_mask, write_rows


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
    """What the decode step needs about the cache's layout, worked out once
    per call outside the loop:

      row_base, row_of int32 [B * H]: the cache row of (b, h, slot p), with a
        cache seen as [B * H * S, K], is row_base + p[row_of]
      causal float32 [S, S]: `causal_mask(S)`, whose row p masks a query in slot p
      last_slot int32 []: S - 1
      cache_shape int32 [4]: [B, H, S, K]
    """
    heads = model.config.num_heads
    return {
        "row_base": tf.range(batch * heads) * slots,
        "row_of": tf.repeat(tf.range(batch), heads),  # [B * H]: the row b of each (b, h)
        "causal": causal_mask(slots),
        "last_slot": slots - 1,
        "cache_shape": tf.stack([batch, heads, slots, model.config.key_dim]),
    }


def decode_hidden(model, token, pos, caches, setup, in_place=True):
    """One new token per row against the cache: the model's blocks for a
    single query position, without the output layer.

    token, pos int32 [B] (pos < S); caches: per layer (k, v) [B * H * S, K];
    setup from `decode_setup` -> (hidden float32 [B, D], caches).

    Each block projects the new token's query, key and value with its own
    attention layer, writes the key and value into their slots
    (`write_rows`), attends from the query over the cache's slots <= pos
    (the attention of training and prefill, one query long), and finishes
    with its own residuals, norms and feed-forward. in_place=False writes
    with a scatter instead, for XLA, which has no in-place update.
    """
    x = model.embed(token, pos)  # [B, D]
    shape = setup["cache_shape"]
    mask = cache_mask(setup["causal"], pos)  # [B, 1, 1, S]
    rows = setup["row_base"] + tf.gather(pos, setup["row_of"])  # [B * H]
    new = []
    for block, (k_cache, v_cache) in zip(model.blocks, caches):
        q, k, v = block.attn.qkv(x[:, None, :])  # each [B, H, 1, K]
        k_cache = write_rows(k_cache, rows, k, in_place)
        v_cache = write_rows(v_cache, rows, v, in_place)
        out = block.attn.attend(q, tf.reshape(k_cache, shape), tf.reshape(v_cache, shape), mask)  # [B, 1, D]
        x = block.finish(x, out[:, 0])  # [B, D], inference: no dropout
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
