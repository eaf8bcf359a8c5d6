"""The miniature GPT: token + position embeddings, Transformer blocks, and a
dense output layer over the vocabulary.

Besides the plain forward pass, the model offers what training needs:
`hidden` and `loss_sum`, which never builds the whole [B*T, V] logits tensor
at once (the loss is `tfgpt/model/loss.py`); and what generation with a
key/value cache needs: `decode_weights`, `prefill` and `call_with_cache`,
its blocks' cached path (`tfgpt.model.layers`). The loop around them (cache
slots, the sliding window, the choice of tokens) is `tfgpt.serving.decode`
and `tfgpt.serving.sampler`.
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.model.layers import Block, Dense, Embedding, TiedOutput, fold_seed, prefill_span
from tfgpt.model.loss import chunked_xent_sum


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
                Block(
                    c.embed_dim,
                    c.num_heads,
                    c.key_dim,
                    c.ff_dim,
                    c.dropout,
                    seed=base + 100 * (i + 1),
                    compute_dtype=self.compute_dtype,
                    name=f"block{i}",
                )
                for i in range(c.num_layers)
            ]
            if c.tie_embeddings:
                self.head = TiedOutput(self.token_emb, compute_dtype=self.compute_dtype, name="head")
            else:
                self.head = Dense(
                    c.embed_dim, c.vocab_size, seed=base + 3, compute_dtype=self.compute_dtype, name="head"
                )

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

    # --- the cached path ------------------------------------------------------------

    def decode_weights(self) -> dict:
        """The cached path's matrices, from the variables as they are now:
        {"blocks": per block its `Block.decode_weights`, "head": the output
        layer's (w [D, V], b)}."""
        return {"blocks": [block.decode_weights() for block in self.blocks], "head": self.head.decode_weights()}

    def prefill(self, context, context_len, slots, weights):
        """Runs the contexts through the blocks once on the cached path
        (`Block.prefill`), filling a cache of `slots` positions per layer.

        context int32 [B, C] (right-padded), context_len int32 [B] (>= 1),
        slots int32 [] (>= C), weights a dict with the "blocks" of
        `decode_weights` -> (hidden float32 [B, D] at each row's last token,
        caches: per layer (k, v), each [B * H * S, K] with the first C slots
        of each (row, head) filled).
        """
        b, c = tf.shape(context)[0], tf.shape(context)[1]
        d = self.config.embed_dim
        x = tf.reshape(self.embed(context, tf.range(c)), [-1, d])  # [B * C, D]
        span = prefill_span(b, c, slots)
        caches = []
        for block, w in zip(self.blocks, weights["blocks"]):
            x, cache = block.prefill(x, w, span)
            caches.append(cache)
        return tf.gather(tf.reshape(x, [b, c, d]), context_len - 1, batch_dims=1), caches  # [B, D]

    def call_with_cache(self, token, pos, caches, weights, step):
        """One new token per row against the caches (`Block.call_with_cache`):
        the blocks for a single query position, without the output layer.

        token, pos int32 [B]; caches: per layer (k, v) [B * H * S, K];
        weights a dict with the "blocks" of `decode_weights`; step: the
        cache rows and visible slots of this position
        (`MultiHeadAttention.call_with_cache`) -> (hidden float32 [B, D],
        caches).
        """
        x = self.embed(token, pos)  # [B, D]
        new = []
        for block, w, cache in zip(self.blocks, weights["blocks"], caches):
            x, cache = block.call_with_cache(x, cache, w, step)
            new.append(cache)
        return x, new

    def loss_sum(
        self,
        ids,
        targets,
        weights,
        seed=None,
        training=False,
        chunk=0,
        with_grad=True,
        branch_free=False,
        smoothing=0.0,
    ):
        """Sum over positions of weights * cross-entropy(logits, targets).

        ids, targets int32 [B, T]; weights float32 [B, T] (0 for padding).
        The output layer and the softmax run `chunk` positions at a time
        (see `chunked_xent_sum`), so the peak memory of the loss does not grow
        with B*T*V. `branch_free`: no data-dependent conditional (for XLA on GPUs).
        """
        h = self.hidden(ids, seed, training)  # [B, T, D]
        d = self.config.embed_dim
        return chunked_xent_sum(
            tf.reshape(h, [-1, d]),
            self.head.w,
            self.head.b,
            tf.reshape(targets, [-1]),
            tf.reshape(weights, [-1]),
            chunk=chunk,
            compute_dtype=self.compute_dtype,
            with_grad=with_grad,
            branch_free=branch_free,
            smoothing=smoothing,
        )


def count_params(module: tf.Module) -> int:
    return int(sum(v.shape.num_elements() for v in module.trainable_variables))
