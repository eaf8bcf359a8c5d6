"""Adam, a learning-rate schedule and global-norm clipping.

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

    Per-occurrence second moments (`apply(..., rows={i: squares})`):
    variable i (an embedding table) is updated as Keras' Adam updates the
    sparse gradient of a lookup. A row looked up k times in the batch, with
    per-occurrence gradients g_1..g_k, gets

        m = b1 m + (1 - b1) sum g;  v = b2 v + (1 - b2) sum g^2

    (sum g is its ordinary gradient; sum g^2 replaces (sum g)^2). For a
    frequent token whose occurrences pull the same way, v is up to k times
    smaller than dense Adam's, so its row takes steps up to sqrt(k) larger.
    """

    def __init__(self, variables, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-7, weight_decay=0.0, name="adam"):
        super().__init__(name=name)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        # Decoupled weight decay (AdamW): w -= lr * weight_decay * w before the
        # Adam step, for matrices and embeddings (rank >= 2), not for biases
        # and layer-norm scales.
        self.weight_decay = weight_decay
        self.decays = [weight_decay > 0 and v.shape.rank >= 2 for v in variables]
        self.lr = lr  # a float, or a callable step -> learning rate tensor
        with self.name_scope:
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.m = [tf.Variable(tf.zeros_like(v), trainable=False, name=_slot(v, "m")) for v in variables]
            self.v = [tf.Variable(tf.zeros_like(v), trainable=False, name=_slot(v, "v")) for v in variables]

    def learning_rate(self, step):
        """The learning rate used for update number `step` (1-based)."""
        return tf.cast(self.lr(step) if callable(self.lr) else self.lr, tf.float32)

    def apply(self, grads, variables, scale=None, where=None, rows=None):
        """One update with each gradient multiplied by `scale` (a scalar, or
        None for 1). Returns the learning rate it used.

        `where` (a bool scalar tensor, or None for always): when it is False
        the update changes nothing (weights, slots, step), without a
        conditional: the gradients are replaced by zeros, the learning rate
        by 0 and both betas by 1, which leaves m, v and the weights as they
        are. Under XLA on a GPU a data-dependent conditional would make the
        device wait for the host.

        Each variable's m, v and weights are updated by TensorFlow's fused
        ResourceApplyAdam kernel, whose formula is the one above: one pass
        over the variable instead of about ten elementwise ops.

        `rows`: {variable index: squares [V, D]}, the sum of the squared
        per-occurrence gradients of each row of that variable, for the update
        above (its entry of `grads` is the ordinary, summed gradient).
        """
        t = self.step + 1
        tf_ = tf.cast(t, tf.float32)
        lr = self.learning_rate(t)
        b1_power, b2_power = self.beta1**tf_, self.beta2**tf_
        beta1, beta2, step_lr = self.beta1, self.beta2, lr
        if where is not None:
            beta1, beta2 = tf.where(where, beta1, 1.0), tf.where(where, beta2, 1.0)
            step_lr = tf.where(where, lr, 0.0)
        rows = rows or {}
        for i, (g, var, m, v, decay) in enumerate(zip(grads, variables, self.m, self.v, self.decays)):
            if decay:
                var.assign_sub(step_lr * self.weight_decay * var, use_locking=True)
            if i in rows:
                lr_t = step_lr * tf.sqrt(1.0 - b2_power) / (1.0 - b1_power)
                self._apply_rows(g, rows[i], var, m, v, scale, where, lr_t)
                continue
            g = g if scale is None else g * scale
            if where is not None:
                g = tf.where(where, g, tf.zeros_like(g))
            # In replica context a mirrored variable's handle is this replica's
            # copy. use_locking: the kernel holds the variables' mutexes while
            # it writes, as assign ops do, so no read can see a half-written
            # update (without it TensorFlow leaves that case undefined).
            tf.raw_ops.ResourceApplyAdam(
                var=var.handle,
                m=m.handle,
                v=v.handle,
                beta1_power=b1_power,
                beta2_power=b2_power,
                lr=step_lr,
                beta1=beta1,
                beta2=beta2,
                epsilon=self.eps,
                grad=g,
                use_locking=True,
            )
        self.step.assign(t if where is None else tf.where(where, t, self.step))
        return lr

    def _apply_rows(self, g, squares, var, m, v, scale, where, lr_t):
        """The per-occurrence update of one table (see the class docstring)."""
        if scale is not None:
            g, squares = g * scale, squares * tf.square(scale)
        m_new = self.beta1 * m + (1.0 - self.beta1) * g
        v_new = self.beta2 * v + (1.0 - self.beta2) * squares
        if where is not None:
            m_new, v_new = tf.where(where, m_new, m), tf.where(where, v_new, v)
        m.assign(m_new)
        v.assign(v_new)
        var.assign_sub(lr_t * m_new / (tf.sqrt(v_new) + self.eps))


def _slot(var, kind):
    return var.name.split(":")[0].replace("/", "_") + "_" + kind


def clip_scale(grads, clip_norm, divisor=1.0):
    """The factor that turns summed gradients into clipped mean gradients.

    The gradients divided by `divisor` have global norm `norm`; `scale` is
    1 / divisor, times clip_norm / norm where that norm exceeds clip_norm
    (clip_norm None or 0: no clipping). Returns (scale, norm). Adam.apply
    takes the scale, so dividing and clipping cost no pass of their own.
    """
    norm = tf.linalg.global_norm(grads) / divisor
    scale = 1.0 / divisor
    if clip_norm:
        scale *= tf.minimum(1.0, clip_norm / tf.maximum(norm, 1e-12))
    return scale, norm


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
