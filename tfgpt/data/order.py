"""The order of the training windows in an epoch: a pseudo-random permutation
of 0..n-1 keyed by (seed, epoch), computed in the graph one batch of
positions at a time.

A shuffle that holds the permutation (or a shuffle buffer of every window
index) needs memory in proportion to the corpus; this one needs none, so a
corpus of any size trains with the same resident memory, and any position of
an epoch can be computed directly, which is what resuming in the middle of
an epoch needs.

The permutation is a balanced Feistel network over the smallest even number
of bits b with 2^b >= n (a bijection of 0..2^b-1 whatever its round
function), with "cycle walking" to stay inside 0..n-1: a position whose
image is n or more is mapped again until it lands below n, which keeps it a
bijection of 0..n-1. The round function is the splitmix64 finaliser of the
half-block mixed with a 64-bit round key; the keys come from SHA-512 of
(seed, epoch).
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow as tf

ROUNDS = 6
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def round_keys(seed: int, epoch: int) -> list[int]:
    digest = hashlib.sha512(f"tfgpt window order {int(seed)} {int(epoch)}".encode()).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(ROUNDS)]


class EpochOrder:
    """position -> window index for one epoch of n windows."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.keys = round_keys(seed, epoch)

    def _rounds(self, x):
        half = tf.constant(self.half, tf.uint64)
        mask = tf.constant((1 << self.half) - 1, tf.uint64)
        left, right = tf.bitwise.right_shift(x, half), tf.bitwise.bitwise_and(x, mask)
        for key in self.keys:
            z = tf.bitwise.bitwise_xor(right, tf.constant(key, tf.uint64))
            z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(30, tf.uint64)))
            z *= tf.constant(_MIX1, tf.uint64)
            z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(27, tf.uint64)))
            z *= tf.constant(_MIX2, tf.uint64)
            z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))
            left, right = right, tf.bitwise.bitwise_xor(left, tf.bitwise.bitwise_and(z, mask))
        return tf.bitwise.bitwise_or(tf.bitwise.left_shift(left, half), right)

    def __call__(self, positions):
        """int64 [k] positions in 0..n-1 -> int64 [k] window indices."""
        n = tf.constant(self.n, tf.uint64)
        y = self._rounds(tf.cast(positions, tf.uint64))
        y = tf.while_loop(lambda y: tf.reduce_any(y >= n), lambda y: (tf.where(y >= n, self._rounds(y), y),), (y,))[0]
        return tf.cast(y, tf.int64)

    def numpy(self, positions) -> np.ndarray:
        """The same in eager mode, for checks."""
        return self(tf.constant(np.asarray(positions, np.int64))).numpy()
