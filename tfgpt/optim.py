"""Adam, a learning-rate schedule and global-norm clipping, written out.

`Adam` is a `tf.Module`, so its slots and step counter are checkpointed with
the model. `apply` runs in replica context on gradients that are already
all-reduced: every replica then makes the same update to its own copy.
"""

from __future__ import annotations

import math

import tensorflow as tf


class Adam(tf.Module):
    """Adam (Kingma & Ba), with the bias correction folded into the step size:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)
        w -= lr_t m / (sqrt(v) + eps)

    which is TensorFlow's and Keras' formulation (eps is added to sqrt(v)
    before the bias correction is applied to lr).
    """

    def __init__(self, variables, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-7, name="adam"):
        super().__init__(name=name)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.lr = lr  # a float, or a callable step -> learning rate tensor
        with self.name_scope:
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.m = [tf.Variable(tf.zeros_like(v), trainable=False, name=_slot(v, "m")) for v in variables]
            self.v = [tf.Variable(tf.zeros_like(v), trainable=False, name=_slot(v, "v")) for v in variables]

    def learning_rate(self, step):
        """The learning rate used for update number `step` (1-based)."""
        return tf.cast(self.lr(step) if callable(self.lr) else self.lr, tf.float32)

    def apply(self, grads, variables):
        """One update. Returns the learning rate it used."""
        t = self.step + 1
        tf_ = tf.cast(t, tf.float32)
        lr = self.learning_rate(t)
        lr_t = lr * tf.sqrt(1.0 - self.beta2 ** tf_) / (1.0 - self.beta1 ** tf_)
        for g, var, m, v in zip(grads, variables, self.m, self.v):
            m.assign(self.beta1 * m + (1.0 - self.beta1) * g)
            v.assign(self.beta2 * v + (1.0 - self.beta2) * tf.square(g))
            var.assign_sub(lr_t * m / (tf.sqrt(v) + self.eps))
        self.step.assign(t)
        return lr


def _slot(var, kind):
    return var.name.split(":")[0].replace("/", "_") + "_" + kind


def clip_by_global_norm(grads, clip_norm):
    """Returns (clipped grads, the global norm before clipping)."""
    norm = tf.linalg.global_norm(grads)
    if clip_norm:
        scale = tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-12))
        grads = [g * scale for g in grads]
    return grads, norm


def make_schedule(name, lr, warmup_steps=0, total_steps=None):
    """`constant`: lr (after a linear warm-up if warmup_steps > 0).
    `cosine`: linear warm-up, then cosine decay to 0 at total_steps."""
    if name not in ("constant", "cosine"):
        raise ValueError(f"unknown learning-rate schedule {name!r}")
    if name == "cosine" and not total_steps:
        raise ValueError("the cosine schedule needs the total number of steps")
    if name == "constant" and warmup_steps == 0:
        return lr

    def schedule(step):
        s = tf.cast(step, tf.float32)
        warm = tf.minimum(1.0, s / max(1, warmup_steps)) if warmup_steps else 1.0
        if name == "constant":
            return lr * warm
        frac = tf.clip_by_value((s - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
        return lr * warm * 0.5 * (1.0 + tf.cos(math.pi * frac))

    return schedule
