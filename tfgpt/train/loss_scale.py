"""Dynamic loss scaling, for float16 training.

float16 represents magnitudes from about 6e-8 to 65504. Small gradients
underflow to zero in its products; multiplying the loss by a large scale S
before the backward pass moves them into range, and the gradients are divided
by S again (in float32) before the update. A scale that is too large makes
some gradient overflow to Inf: that step is skipped and S halved. After
`growth_interval` finite steps in a row S is doubled again, so it follows the
largest value that does not overflow.

The state (scale, finite steps in a row) is a tf.Module, checkpointed with
the model. Every replica updates its own copy from the same all-reduced
finiteness, so the copies stay equal, as the optimizer's do.
"""

from __future__ import annotations

import tensorflow as tf


class LossScale(tf.Module):
    """scale: float32 variable; good_steps: finite steps since the last change."""

    def __init__(
        self, initial: float = 2.0**15, growth_interval: int = 2000, max_scale: float = 2.0**24, name="loss_scale"
    ):
        super().__init__(name=name)
        self.growth_interval, self.max_scale = growth_interval, max_scale
        with self.name_scope:
            self.scale = tf.Variable(initial, dtype=tf.float32, trainable=False, name="scale")
            self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")

    def update(self, finite, where=True):
        """After a step whose gradients were finite (bool scalar) or not;
        nothing changes where `where` (bool scalar) is False: a step run after
        training was told to stop. Branch-free (no data-dependent
        conditional, which under XLA on a GPU would wait for the host)."""
        good = tf.where(finite, self.good_steps + 1, tf.zeros([], tf.int64))
        grow = good >= self.growth_interval
        scale = tf.where(
            finite, tf.where(grow, tf.minimum(self.scale * 2.0, self.max_scale), self.scale), self.scale * 0.5
        )
        self.scale.assign(tf.where(where, scale, self.scale))
        self.good_steps.assign(tf.where(where, tf.where(grow, tf.zeros([], tf.int64), good), self.good_steps))
