"""The piece table (tfgpt/data/pieces.py) against a Python dict."""

import random

import numpy as np
import pytest

from tfgpt.data import pieces
from tfgpt.data.pieces import MAX_BYTES, PieceTable, pack, pack_strings, padded


def random_strings(rng: random.Random, count: int) -> list[bytes]:
    """Distinct strings of 0..MAX_BYTES bytes, many of them alike: few
    letters, NUL bytes, high bytes, and strings that differ only in a
    trailing NUL or in their last byte."""
    letters = b"ab\x00\xff "
    out = {b"", b"\x00", b"a", b"a\x00", b"\x00" * MAX_BYTES, b"\xff" * MAX_BYTES, b"a" * 8, b"a" * 8 + b"\x00"}
    while len(out) < count:
        n = rng.randint(0, MAX_BYTES)
        out.add(bytes(rng.choice(letters) for _ in range(n)))
    out = sorted(out)
    rng.shuffle(out)
    return out


def test_pack_is_one_to_one_and_reads_at_any_offset():
    rng = random.Random(0)
    strings = random_strings(rng, 3000)
    lo, hi = pack_strings(strings)
    keys = set(zip(lo.tolist(), hi.tolist()))
    assert len(keys) == len(strings)  # no two strings share a key
    # The same strings found at other offsets of a text give the same keys.
    text = b"".join(b"#" + s for s in strings)
    lengths = np.array([len(s) for s in strings])
    starts = np.cumsum(lengths + 1) - lengths
    lo2, hi2 = pack(padded(text), starts, lengths)
    assert np.array_equal(lo, lo2) and np.array_equal(hi, hi2)


def test_table_agrees_with_a_dict_while_it_grows():
    rng = random.Random(1)
    strings = random_strings(rng, 20000)
    table, ref = PieceTable(bits=2), {}
    for k in range(0, 18000, 1500):  # batches that make the table double many times
        batch = strings[k : k + 1500]
        values = [rng.randrange(1 << 40) for _ in batch]
        table.insert(*pack_strings(batch), values)
        ref.update(zip(batch, values))
        queries = rng.sample(strings, 4000)  # present and absent ones
        got = table.find(*pack_strings(queries))
        assert got.tolist() == [ref.get(s, -1) for s in queries]
    assert len(table) == len(ref)
    assert table._rows.shape[0] >= 2 * len(ref)  # at most half full


def test_crowded_slots_still_find_every_key(monkeypatch):
    """Keys that all hash to a few slots (a hash that ignores most of the
    key) are still told apart and found, by probing."""
    monkeypatch.setattr(pieces, "_MIX", (np.uint64(0), np.uint64(1), np.uint64(1)))
    strings = [bytes([i % 7]) * (i % MAX_BYTES + 1) + bytes([i // 7]) for i in range(300)]
    strings = list(dict.fromkeys(s[:MAX_BYTES] for s in strings))
    table = PieceTable(bits=4)
    table.insert(*pack_strings(strings), range(len(strings)))
    assert table.find(*pack_strings(strings)).tolist() == list(range(len(strings)))
    assert table.find(*pack_strings([b"zz", b"\x09" * MAX_BYTES])).tolist() == [-1, -1]


@pytest.mark.parametrize("n", [0, 1])
def test_empty_queries_and_inserts(n):
    table = PieceTable()
    table.insert(*pack_strings([b"x"] * n), [5] * n)
    assert table.find(*pack_strings([])).size == 0
    assert table.find(*pack_strings([b"x"])).tolist() == [5 if n else -1]
