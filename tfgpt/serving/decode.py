"""The decode step: the model run for one new token per row against a
key/value cache, the prefill that fills the cache, and the window pass used
once a row is longer than `maxlen`. The step's attention kernels
(`attend_one`, `write_rows`) are in tfgpt/attention.py beside the attention
that training uses.

Everything here maps token ids to the last block's hidden state; turning a
hidden state into the next token is `tfgpt.serving.sampling`, and the loop around
both is `tfgpt.serving.sampler`. The prefill and the step share their arithmetic
(`DecodeWeights`' matrices, float32 attention, layer norms with the rsqrt
of `tfgpt.model.batch_invariant`), chosen so that a row's numbers do not depend
on the other rows of its batch; the window pass is the model's own.

The cache of a layer is a pair (k, v), each kept flattened to
[B * H * S, K], the shape the in-place row update takes.

Shapes: B = batch, C = context length (<= maxlen), L = maxlen, S = cache
slots (a multiple of 16), W = history width, D = model width, H = heads,
K = key size, F = feed-forward width, V = vocabulary.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfgpt.model import batch_invariant
from tfgpt.model.attention import attend_one, causal_mask, softmax, write_rows


def logits(hidden, weights):
    """hidden float32 [B, D] -> float32 [B, V], the output layer, from the
    dict of a `DecodeWeights`: its "head" (w [D, V], b), or its "head_t" (w
    [V, D], b) where the export keeps the bfloat16 matrix transposed. At
    batch 1 the product with the transposed matrix (a dot product of 256
    neighbouring numbers per word) is faster (docs/performance.md), and in
    bfloat16 it gives the same bits as the other at every batch size (in
    float32 its kernel changes with the batch, so float32 keeps [D, V])."""
    if "head_t" not in weights:
        return _dense(hidden, weights["head"])
    w, b = weights["head_t"]
    return tf.cast(tf.matmul(tf.cast(hidden, w.dtype), w, transpose_b=True), tf.float32) + b


class DecodeWeights(tf.Module):
    """The matrices of the decode step, in the layout and dtype it multiplies
    by (see `decode_setup`), and the output layer's.

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
                held = _decode_weights(model)
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
            return _decode_weights(self._model)
        return tf.nest.map_structure(tf.convert_to_tensor, self._weights)


def _keep(name, pair):
    """A frozen (w, b): each the model's variable itself, or a new variable
    ("<name>_w", "<name>_b")."""
    return tuple(
        t if isinstance(t, tf.Variable) else tf.Variable(t, trainable=False, name=f"{name}_{part}")
        for t, part in zip(pair, "wb")
    )


def _decode_weights(model) -> dict:
    """What `DecodeWeights` holds, from the model's variables: per block q,
    k, v (w [D, H * K]), out (w [H * K, D]), fc1 (w [D, F]), fc2 (w [F, D]),
    the attention's 1 / sqrt(K) folded into q; and the output layer (w
    [D, V]). One product of D x 3 * H * K and a split measured no faster
    than the three (docs/performance.md)."""
    blocks = []
    for block in model.blocks:
        attn, ffn = block.attn, block.ffn
        d, hk, cd = attn.dim, attn.num_heads * attn.key_dim, attn.compute_dtype
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
    head = model.head
    return {"blocks": blocks, "head": _as_matrix(head.w, head.b, head.w.shape[0], head.compute_dtype)}


def prefill(model, context, context_len, slots, weights):
    """Runs the contexts through the model's blocks once, with the decode
    step's arithmetic: `DecodeWeights`' matrices (q already scaled), float32
    attention, the layer norms with the rsqrt of `tfgpt.model.batch_invariant`.

    context int32 [B, C] (right-padded), context_len int32 [B] (>= 1), slots
    int32 [] (>= C), weights the dict of a `DecodeWeights` -> (hidden float32
    [B, D] at each row's last token, caches: per layer (k, v), each
    [B * H * S, K] with the first C slots of each (row, head) filled).

    A row's numbers do not depend on how far the batch's longest prompt pads
    it: its padding comes after its tokens, where the causal mask hides it;
    the keys are padded with zeros to a multiple of 16 positions (masked
    too), so that the softmax's exps stay in the vector kernel
    (`tfgpt.model.batch_invariant`) and its sums, added in order, only gain exact
    zeros.
    """
    b, c = tf.shape(context)[0], tf.shape(context)[1]
    d = model.config.embed_dim
    x = tf.reshape(model.embed(context, tf.range(c)), [-1, d])  # [B * C, D]
    seen = batch_invariant.round_up(c)  # key positions, >= C
    blocked = (1.0 - causal_mask(c, seen)) * -1e9  # [C, seen]: 0 where j <= i
    caches = []
    for block, w in zip(model.blocks, weights["blocks"]):
        h, kd = block.attn.num_heads, block.attn.key_dim
        q, k, v = (tf.reshape(_dense(x, w[name]), [b, c, h, kd]) for name in "qkv")  # each [B, C, H, K]
        # One head at a time as [B, C, K] slices: no [B, C, H, K] transpose.
        ks, vs = [k[:, :, i] for i in range(h)], [v[:, :, i] for i in range(h)]
        keys = [[0, 0], [0, seen - c], [0, 0]]
        context_h = [
            tf.matmul(
                softmax(tf.matmul(q[:, :, i], tf.pad(ks[i], keys), transpose_b=True) + blocked),  # [B, C, seen]
                tf.pad(vs[i], keys),
            )  # [B, C, K]
            for i in range(h)
        ]
        out = _dense(tf.reshape(tf.stack(context_h, 2), [-1, h * kd]), w["out"])  # [B * C, D]
        a = block.ln1(x + out, rsqrt=batch_invariant.rsqrt_column)
        x = block.ln2(a + _dense(_dense(a, w["fc1"], tf.nn.relu), w["fc2"]), rsqrt=batch_invariant.rsqrt_column)
        pad = [[0, 0], [0, 0], [0, slots - c], [0, 0]]
        caches.append(tuple(tf.reshape(tf.pad(tf.stack(t, 1), pad), [-1, kd]) for t in (ks, vs)))  # [B * H * S, K]
    return tf.gather(tf.reshape(x, [b, c, d]), context_len - 1, batch_dims=1), caches  # [B, D]


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

      blocks: per block a dict of its weights, `DecodeWeights`' (w in the
        compute dtype, b float32; `_as_matrix`)
      row_base, row_of int32 [B * H]: the cache row of (b, h, slot p), with a
        cache seen as [B * H * S, K], is row_base + p[row_of]
      blocked float32 [S, S]: row p is 0 at the slots a query in slot p
        sees (<= p) and -1e9 elsewhere
      last_slot int32 []: the last slot a position can take, min(S, L) - 1
        (S may be rounded up past L, `tfgpt.model.batch_invariant`)
      cache_shape int32 [4]: [B, H, S, K]

    weights: the dict a `DecodeWeights` returns.
    """
    heads = model.config.num_heads
    return {
        "blocks": weights["blocks"],
        "row_base": tf.range(batch * heads) * slots,
        "row_of": tf.repeat(tf.range(batch), heads),  # [B * H]: the row b of each (b, h)
        "blocked": (1.0 - causal_mask(slots)) * -1e9,
        "last_slot": tf.minimum(slots, model.config.maxlen) - 1,
        "cache_shape": tf.stack([batch, heads, slots, model.config.key_dim]),
    }


def decode_hidden(model, token, pos, caches, setup, in_place=True):
    """One new token per row against the cache: the model's blocks for a
    single query position, without the output layer.

    token, pos int32 [B] (pos < S); caches: per layer (k, v) [B * H * S, K];
    setup from `decode_setup` -> (hidden float32 [B, D], caches).

    The new key and value are written into their slots (`write_rows`), and
    the attention of one query is computed by `attend_one`; residuals, norms
    and feed-forward are the block's (its layer norms, with the rsqrt of
    `tfgpt.model.batch_invariant`; the feed-forward with `DecodeWeights`'
    matrices). in_place=False writes with a scatter instead, for XLA, which
    has no in-place update.
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
        # from `DecodeWeights`' matrices.
        a = block.ln1(x + out, rsqrt=batch_invariant.rsqrt_column)  # [B, D]
        f = _dense(_dense(a, w["fc1"], tf.nn.relu), w["fc2"])  # [B, D]
        x = block.ln2(a + f, rsqrt=batch_invariant.rsqrt_column)
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
    dtype, b float32 [columns]), both multiplied by scale. A variable that
    already has that form is returned as it is."""

    def form(x, shape, dtype):
        if scale == 1.0 and x.dtype == dtype and len(x.shape) == len(shape):
            return x
        return tf.cast(tf.reshape(x, shape) * scale, dtype)

    return form(w, [rows, -1], dtype), form(b, [-1], b.dtype)


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
