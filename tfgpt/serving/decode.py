"""The decode loop's side of the model: the matrices it multiplies by
(`DecodeWeights`, frozen in an export), the cache's slots and row layout,
the step that turns each row's newest token into its next hidden state
(against the cache while the row fits in `maxlen` positions, a window pass
after), and the output layer on that hidden state.

The arithmetic of the cached path is the model's (`GPT.prefill`,
`GPT.call_with_cache` and the blocks' methods in `tfgpt.model.layers`),
chosen so that a row's numbers do not depend on the other rows of its
batch; the window pass is the model's own forward pass. Turning logits into
the next token is `tfgpt.serving.sampling`, and the loop around both is
`tfgpt.serving.sampler`.

The cache of a layer is a pair (k, v), each kept flattened to
[B * H * S, K], the shape the in-place row update takes
(`tfgpt.model.attention.write_rows`).

Shapes: B = batch, L = maxlen, S = cache slots (a multiple of 16),
W = history width, D = model width, H = heads, K = key size,
V = vocabulary.
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.model import batch_invariant
from tfgpt.model.attention import causal_mask


def logits(hidden, weights):
    """hidden float32 [B, D] -> float32 [B, V], the output layer, from the
    dict of a `DecodeWeights`: its "head" (w [D, V], b), or its "head_t" (w
    [V, D], b) where the export keeps the bfloat16 matrix transposed. At
    batch 1 the product with the transposed matrix (a dot product of 256
    neighbouring numbers per word) is faster (docs/performance.md), and in
    bfloat16 it gives the same bits as the other at every batch size (in
    float32 its kernel changes with the batch, so float32 keeps [D, V])."""
    if "head_t" not in weights:
        return batch_invariant.apply_dense(hidden, weights["head"])
    w, b = weights["head_t"]
    return tf.cast(tf.matmul(tf.cast(hidden, w.dtype), w, transpose_b=True), tf.float32) + b


class DecodeWeights(tf.Module):
    """The matrices of the cached path (`GPT.decode_weights`: per block q
    (scaled), k, v, out, fc1, fc2, in the layout and dtype `batch_invariant.apply_dense`
    multiplies by) and the output layer's.

    frozen=False: computed from the model's variables at every call, for a
    model that is still training (the samples taken between epochs).
    frozen=True: computed once, here, and kept as variables of their own,
    for the export, whose weights never change: a bfloat16 model would
    otherwise cast its output layer (V x D numbers) again for every request.
    A float32 matrix that needs no change is the model's own variable, not
    a copy.

    Calling it returns {"blocks": per block a dict of (w, b) for q, k, v,
    out, fc1, fc2; and the output layer: "head": (w [D, V], b), or, frozen
    in bfloat16, "head_t": (w [V, D], b) (see `logits`)}.
    """

    def __init__(self, model, frozen: bool = False, name="decode_weights"):
        super().__init__(name=name)
        self._model = model
        self.frozen = frozen
        if frozen:
            with self.name_scope:
                held = model.decode_weights()
                self._weights = {
                    "blocks": [
                        {part: _keep(f"blocks_{i}_{part}", pair) for part, pair in block.items()}
                        for i, block in enumerate(held["blocks"])
                    ],
                }
                w, b = held["head"]
                if w.dtype == tf.bfloat16:
                    self._weights["head_t"] = _keep("head_t", (tf.transpose(w), b))
                else:
                    self._weights["head"] = _keep("head", (w, b))

    def __call__(self):
        if not self.frozen:
            return self._model.decode_weights()
        return tf.nest.map_structure(tf.convert_to_tensor, self._weights)


def _keep(name, pair):
    """A frozen (w, b): each the model's variable itself, or a new variable
    ("<name>_w", "<name>_b")."""
    return tuple(
        t if isinstance(t, tf.Variable) else tf.Variable(t, trainable=False, name=f"{name}_{part}")
        for t, part in zip(pair, "wb")
    )


def cache_slots(needed, maxlen: int):
    """needed int32 [B]: the positions each row will occupy (its context
    plus its new tokens) -> the cache slots S: no more than min(L, the
    largest need) are ever written, rounded up to a multiple of 16, so that
    the rows of the decode step's softmax ([B, H, S]) keep every exp in the
    vector kernel (`tfgpt.model.batch_invariant`). Slots past a row's position
    are never visible to it."""
    return batch_invariant.round_up(tf.minimum(maxlen, tf.reduce_max(tf.concat([needed, [1]], 0))))


def decode_setup(model, batch, slots, weights):
    """What the decode step needs, prepared once per call outside the loop,
    so that each step runs as few operations as possible:

      weights: the dict a `DecodeWeights` returns
      row_base, row_of int32 [B * H]: the cache row of (b, h, slot p), with a
        cache seen as [B * H * S, K], is row_base + p[row_of]
      blocked float32 [S, S]: row p is 0 at the slots a query in slot p
        sees (<= p) and -1e9 elsewhere
      last_slot int32 []: the last slot a position can take, min(S, L) - 1
        (S may be rounded up past L, `tfgpt.model.batch_invariant`)
      cache_shape int32 [4]: [B, H, S, K]
    """
    heads = model.config.num_heads
    return {
        "weights": weights,
        "row_base": tf.range(batch * heads) * slots,
        "row_of": tf.repeat(tf.range(batch), heads),  # [B * H]: the row b of each (b, h)
        "blocked": (1.0 - causal_mask(slots)) * -1e9,
        "last_slot": tf.minimum(slots, model.config.maxlen) - 1,
        "cache_shape": tf.stack([batch, heads, slots, model.config.key_dim]),
    }


def decode_hidden(model, token, pos, caches, setup):
    """One new token per row against the cache (`GPT.call_with_cache`): the
    model's blocks for a single query position, without the output layer.

    token, pos int32 [B] (pos < S); caches: per layer (k, v) [B * H * S, K],
    not to be read again (the new keys and values are written in place);
    setup from `decode_setup` -> (hidden float32 [B, D], caches).
    """
    step = {
        "rows": setup["row_base"] + tf.gather(pos, setup["row_of"]),  # [B * H]
        "blocked": tf.gather(setup["blocked"], pos),  # [B, S]
        "cache_shape": setup["cache_shape"],
    }
    return model.call_with_cache(token, pos, caches, setup["weights"], step)


def cached_hidden(model, token, n, caches, setup):
    """The decode step for each row's newest token (the n-th, at slot n - 1).

    token, n int32 [B]; caches, setup as `decode_hidden` takes them ->
    (hidden float32 [B, D], caches). Rows already past L positions or ended
    still pass through it (the batch is one tensor): their slot is clamped
    and their result is not to be used."""
    return decode_hidden(model, token, tf.minimum(n - 1, setup["last_slot"]), caches, setup)


def next_hidden(model, token, n, live, hidden, caches, history, setup):
    """The last block's output at each row's newest token (index n - 1 of
    its history), for rows of any length.

    token int32 [B], n int32 [B], live bool [B] (rows that need it), hidden
    [B, D] (the previous step's), caches and setup as `decode_hidden` takes
    them, history int32 [B, W] (n <= W) -> (hidden [B, D], caches). A row
    not live gets a hidden state not to be used (the old one when no row is
    live: then nothing runs).

    Rows whose history fits in L positions decode against the cache
    (`cached_hidden`); longer rows run a window (`window_hidden`). A batch
    may hold both kinds at once.
    """
    sliding = n > model.config.maxlen  # [B]

    def cached():
        return cached_hidden(model, token, n, caches, setup)

    def windowed():
        return window_hidden(model, history, n), caches

    def both():
        from_cache, new_caches = cached()
        from_window, _ = windowed()
        return tf.where(sliding[:, None], from_window, from_cache), new_caches

    need_cache = tf.reduce_any(live & ~sliding)
    need_window = tf.reduce_any(live & sliding)
    return tf.cond(
        need_window,
        lambda: tf.cond(need_cache, both, windowed),
        lambda: tf.cond(need_cache, cached, lambda: (hidden, caches)),
    )


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
