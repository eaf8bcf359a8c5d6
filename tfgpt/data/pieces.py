"""A table from short byte strings to ints, looked up many at a time with NumPy.

The subword encoder cuts text into pieces at spaces and keeps an entry for
every distinct piece it has encoded. Looking each piece up in a Python dict
would cost a Python string and a hash per piece; here all the pieces of a
text are looked up together with array operations.

A string of at most MAX_BYTES bytes is its own key: two 64-bit integers
holding its bytes (zero padded) and, in the top byte, its length. Keys live
in an open-addressing table with linear probing, and a look-up compares the
whole key, so it is exact: no hash is trusted to tell strings apart.
"""

from __future__ import annotations

import numpy as np

MAX_BYTES = 15  # 8 bytes in the low word, 7 in the high word, the length in its top byte

_EMPTY_HI = np.uint64(0xFF << 56)  # a length of 255: no key has it
_LOW_MASKS = np.array([(1 << (8 * j)) - 1 for j in range(9)], np.uint64)  # j low bytes set
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0xD6E8FEB86659FD93))


def padded(data: bytes) -> np.ndarray:
    """data as uint8 with 16 zero bytes after it, as `pack` reads them."""
    buf = np.zeros(len(data) + 16, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    return buf


def pack(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys (lo, hi), uint64 [N] each, of the strings
    buf[starts[i] : starts[i] + lengths[i]], every length at most MAX_BYTES;
    buf: contiguous uint8 with 16 bytes readable from every start (`padded`)."""
    # Every byte offset of buf as the start of a little-endian 8-byte word.
    words = np.ndarray(shape=(buf.size - 7,), dtype="<u8", buffer=buf, strides=(1,))
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    lo = words[starts] & _LOW_MASKS[np.minimum(lengths, 8)]
    hi = lengths.astype(np.uint64) << np.uint64(56)
    long = np.flatnonzero(lengths > 8)  # most pieces fit in the low word alone
    hi[long] |= words[starts[long] + 8] & _LOW_MASKS[lengths[long] - 8]
    return lo, hi


def pack_strings(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The keys of strings (each at most MAX_BYTES long)."""
    lengths = np.fromiter(map(len, strings), np.int64, count=len(strings))
    return pack(padded(b"".join(strings)), np.cumsum(lengths) - lengths, lengths)


class PieceTable:
    """Keys (see `pack`) -> int64 values; keys are added, never removed."""

    def __init__(self, bits: int = 16):
        self._alloc(bits)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _alloc(self, bits: int) -> None:
        self._bits = bits
        # One row per slot, [lo, hi, value]: a probe reads one cache line.
        self._rows = np.zeros([1 << bits, 3], np.uint64)
        self._rows[:, 1] = _EMPTY_HI

    def _slots(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Each key's first slot: a multiplicative hash's top bits."""
        h = (lo * _MIX[0]) ^ (hi * _MIX[1])  # unsigned arithmetic wraps
        h ^= h >> np.uint64(29)
        return ((h * _MIX[2]) >> np.uint64(64 - self._bits)).astype(np.int64)

    def find(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """int64 [N]: each key's value, -1 where the key is not in the table."""
        mask = (1 << self._bits) - 1
        slot = self._slots(lo, hi)
        # The first probe settles almost every key: done for all keys at once.
        rows = np.take(self._rows, slot, axis=0)  # [N, 3]
        hit = (rows[:, 1] == hi) & (rows[:, 0] == lo)
        out = np.where(hit, rows[:, 2].view(np.int64), -1)
        todo = np.flatnonzero(~hit & (rows[:, 1] != _EMPTY_HI))  # an occupied slot of another key
        while todo.size:  # probe the next slot
            s = slot[todo] = (slot[todo] + 1) & mask
            rows = np.take(self._rows, s, axis=0)
            hit = (rows[:, 1] == hi[todo]) & (rows[:, 0] == lo[todo])
            out[todo[hit]] = rows[hit, 2].view(np.int64)
            todo = todo[~hit & (rows[:, 1] != _EMPTY_HI)]
        return out

    def insert(self, lo: np.ndarray, hi: np.ndarray, values) -> None:
        """Adds keys, distinct and not in the table yet, with their values
        (at least 0). The table doubles whenever it would be more than half
        full."""
        values = np.asarray(values, np.int64)
        if (self.size + lo.size) * 2 > self._rows.shape[0]:
            old = self._rows[self._rows[:, 1] != _EMPTY_HI]
            bits = self._bits
            while (self.size + lo.size) * 2 > 1 << bits:
                bits += 1
            self._alloc(bits)
            self._place(old[:, 0], old[:, 1], old[:, 2].view(np.int64))
        self._place(lo, hi, values)
        self.size += lo.size

    def _place(self, lo: np.ndarray, hi: np.ndarray, values: np.ndarray) -> None:
        slot = self._slots(lo, hi)
        todo = np.arange(lo.size)
        mask = (1 << self._bits) - 1
        while todo.size:
            s = slot[todo]
            free = self._rows[s, 1] == _EMPTY_HI
            # Of the keys that reached the same free slot, the first takes it.
            taken, first = np.unique(s[free], return_index=True)
            win = todo[free][first]
            self._rows[taken, 0], self._rows[taken, 1] = lo[win], hi[win]
            self._rows[taken, 2] = values[win].view(np.uint64)
            placed = np.zeros(lo.size, bool)
            placed[win] = True
            left = ~placed[todo]
            todo = todo[left]
            slot[todo] = (s[left] + 1) & mask
