"""The miniature GPT: token + position embeddings, Transformer blocks, and a
dense output layer over the vocabulary.

Besides the plain forward pass, the model offers what training needs:
`hidden` and `loss_sum`, which never builds the whole [B*T, V] logits tensor
at once (the loss is `tfgpt/loss.py`). Generation with a key/value cache
lives in `tfgpt/decode.py` and `tfgpt/sampler.py`.
"""

from __future__ import annotations

import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.model.layers import Block, Dense, Embedding, TiedOutput, fold_seed
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
