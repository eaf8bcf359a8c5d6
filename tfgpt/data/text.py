"""Standardization, vocabulary and the in-graph tokenizer.

Standardization and tokenization run in the TensorFlow graph (`Tokenizer`),
so training, the token store and the exported sampler share exactly the same
code.
"""

from __future__ import annotations

import logging
import string
import uuid
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.config import write_text_atomic

log = logging.getLogger(__name__)

PAD, UNK = "", "[UNK]"

# Every character of string.punctuation, escaped for an RE2 character class.
PUNCT_CLASS = "[" + "".join("\\" + c for c in string.punctuation) + "]"

# The standardization, step by step, in the order `standardize` applies them:
# ("lower", encoding) lowercases, ("replace", RE2 pattern, rewrite) is
# `tf.strings.regex_replace`. A token store's key hashes this definition
# (`tfgpt.data.prepare.standardization_id`), so any edit of a step gives new
# stores rather than reusing ones standardized otherwise.
STANDARDIZE = (
    ("replace", "\\x00", " "),  # a NUL would end the string for lower()
    ("lower", "utf-8"),
    ("replace", "<br />", " "),
    ("replace", f"({PUNCT_CLASS})", r" \1"),  # a space before each punctuation character
)


def standardize(text):
    """string [...] -> string [...]: the steps of STANDARDIZE: lowercase, `<br />`
    to a space, and a space before every punctuation character (so "don't"
    becomes "don 't")."""
    for step, *args in STANDARDIZE:
        if step == "lower":
            text = tf.strings.lower(text, encoding=args[0])
        elif step == "replace":
            text = tf.strings.regex_replace(text, *args)
        else:
            raise ValueError(f"unknown standardization step {step!r}")
    return text


def split_words(text):
    """string [N] -> ragged string [N, None]: standardized words."""
    return tf.strings.split(standardize(text))


def count_words(lines: list[str], batch: int = 8192) -> dict[bytes, int]:
    """How often each standardized word occurs in lines (counted in the graph)."""
    counts: dict[bytes, int] = {}
    for i in range(0, len(lines), batch):
        words = split_words(tf.constant(lines[i : i + batch], tf.string)).flat_values
        uniq, _, n = tf.unique_with_counts(words)
        for w, c in zip(uniq.numpy().tolist(), n.numpy().tolist()):
            counts[w] = counts.get(w, 0) + c
    return counts


def build_vocab(lines: list[str], vocab_size: int) -> tuple[list[str], list[int]]:
    """Words ["", "[UNK]", then by descending count, ties by the word], at most
    vocab_size of them, and their counts ("[UNK]" counts the words left out)."""
    ranked = sorted(count_words(lines).items(), key=lambda wc: (-wc[1], wc[0]))
    kept, dropped = ranked[: max(0, vocab_size - 2)], ranked[max(0, vocab_size - 2) :]
    words = [PAD, UNK] + [w.decode("utf-8") for w, _ in kept]
    counts = [0, sum(c for _, c in dropped)] + [c for _, c in kept]
    return words, counts


def write_vocab(words: list[str], path: str | Path, counts: list[int] | None = None) -> None:
    """One `word<TAB>count` line per id; the padding id 0 is the empty word.
    (A tab-separated column keeps the empty word on a non-empty line, which
    TensorFlow's text-file table initializer requires.)"""
    counts = counts or [0] * len(words)
    write_text_atomic(path, "".join(f"{w}\t{c}\n" for w, c in zip(words, counts)))


def read_vocab(path: str | Path) -> list[str]:
    """The words of a vocabulary file, index = id."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.split("\t")[0] for line in lines]


class _VocabFile(tf.lookup.TextFileInitializer):
    """A TextFileInitializer whose table has a name of its own.

    TensorFlow names a table from a file after the file argument's repr,
    which for a `tf.saved_model.Asset` is the object's address; a table
    created under a name that a live table already has is that table. So a
    Tokenizer made after another one's Asset was freed could answer with
    the other's vocabulary, and a SavedModel keeps the name it was saved
    with. A random suffix keeps the names apart; the table stays named (not
    anonymous), as TensorFlow Serving's loader needs to initialize it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unique = uuid.uuid4().hex

    @property
    def _shared_name(self):
        return f"{super()._shared_name}_{self._unique}"


class Tokenizer(tf.Module):
    """Text <-> ids in the graph, from a vocabulary file (`write_vocab`:
    line number = id, the word in the first tab-separated column). Its tables are created here, not in a tf.function, so
    that a SavedModel holding a Tokenizer carries the file as an asset."""

    def __init__(self, vocab_path: str | Path, name="tokenizer"):
        super().__init__(name=name)
        vocab_path = str(vocab_path)
        self.vocab_file = tf.saved_model.Asset(vocab_path)
        self.size = len(read_vocab(vocab_path))
        self.to_id = tf.lookup.StaticHashTable(
            _VocabFile(self.vocab_file, tf.string, 0, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, delimiter="\t"),
            default_value=1,
        )
        self.to_word = tf.lookup.StaticHashTable(
            _VocabFile(self.vocab_file, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER, tf.string, 0, delimiter="\t"),
            default_value=UNK,
        )

    def __call__(self, text):
        """string [N] -> ragged int32 [N, None]."""
        words = split_words(text)
        return tf.cast(tf.ragged.map_flat_values(self.to_id.lookup, words), tf.int32)

    def detokenize(self, ids):
        """int [N, T] (0 = padding, dropped) -> string [N]: words joined by spaces."""
        ids = tf.cast(ids, tf.int64)
        words = tf.ragged.boolean_mask(self.to_word.lookup(ids), ids != 0)
        return tf.strings.reduce_join(words, axis=-1, separator=" ")


def tokenize_lines(tokenizer: Tokenizer, lines: list[str], batch: int = 8192):
    """Tokenizes lines in batches -> (flat int32 ids, row lengths)."""
    ids, lengths = [], []
    for i in range(0, len(lines), batch):
        rt = tokenizer(tf.constant(lines[i : i + batch], tf.string))
        ids.append(rt.flat_values.numpy())
        lengths.append(rt.row_lengths().numpy())
    if not ids:
        return np.zeros([0], np.int32), np.zeros([0], np.int64)
    return np.concatenate(ids), np.concatenate(lengths)
