"""Corpus, standardization, vocabulary and the tf.data pipeline.

The corpus is a list of documents (a review, a file); every line of a
document is one example, as in the Keras example's `TextLineDataset`.
Standardization and tokenization run in the TensorFlow graph (`Tokenizer`),
so training and the exported sampler share exactly the same code.

Training reads its windows from a token store on disk (tfgpt/store.py, built
by tfgpt/store_build.py); the in-memory functions here (`read_corpus`,
`train_val_split`, `build_vocab`, `tokenize_lines`, `make_windows`) define
the same corpus, vocabulary and windows for small inputs, the evaluation
and the tests. The tf.data pipeline takes the windows from either: a NumPy
array or a `WindowSource` (`len`, `width`, `gather`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import string
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.config import write_text_atomic

log = logging.getLogger(__name__)

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
IMDB_SPLITS = ("train/pos", "train/neg", "test/pos", "test/neg")
PAD, UNK = "", "[UNK]"

# Every character of string.punctuation, escaped for an RE2 character class.
_PUNCT_CLASS = "[" + "".join("\\" + c for c in string.punctuation) + "]"


class DataError(ValueError):
    """A problem with the user's data: reported as one line, no traceback."""


@dataclasses.dataclass
class Document:
    name: str
    text: str


# --- finding and reading the corpus -------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("TFGPT_CACHE", Path.home() / ".cache" / "tfgpt"))


def resolve_imdb(url: str = IMDB_URL, sha256: str = IMDB_SHA256, cache: Path | None = None) -> Path:
    """`--data imdb`: ./aclImdb if present, else the cached archive, else download it."""
    if Path("aclImdb").is_dir():
        return Path("aclImdb")
    cache = cache or cache_dir()
    target = cache / "aclImdb_v1.tar.gz"
    if target.exists():
        return target
    download(url, target, sha256)
    return target


def download(url: str, target: Path, sha256: str) -> None:
    """Downloads url to target with a progress display, checking its sha256.

    The file appears under its final name only once complete and verified.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    log.info(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, 0.0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last > 0.5 or (total and done == total):
                    last = now
                    pct = f"{100 * done / total:5.1f}% of {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                    print(f"\r  {pct}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DataError(
            f"could not download {url} ({reason}); without network, pass --data PATH "
            "to an aclImdb archive, directory or text file"
        ) from None
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got "
            f"{digest.hexdigest()}; the file was deleted, try again or pass --data PATH"
        )
    part.replace(target)


def is_text_name(name: str) -> bool:
    """Whether a file or archive member is read as text: .txt or .txt.gz."""
    return name.endswith(".txt") or name.endswith(".txt.gz")


def _imdb_dirs(unsup: bool):
    return IMDB_SPLITS + (("train/unsup",) if unsup else ())


def _imdb_member(name: str, unsup: bool) -> bool | None:
    """For a path inside an archive or folder: True if it is an IMDB review we
    read, False if it is IMDB but skipped, None if it is not in the layout."""
    parts = name.replace("\\", "/").split("/")
    if len(parts) < 3 or not is_text_name(parts[-1]):
        return None
    split = "/".join(parts[-3:-1])
    if split in IMDB_SPLITS or split == "train/unsup":
        return split in _imdb_dirs(unsup)
    return None


def read_corpus(path: str | Path, imdb_unsup: bool = False) -> list[Document]:
    """Reads every form `--data` accepts into documents, in memory.

    An archive or folder with the IMDB layout gives its {train,test}/{pos,neg}
    reviews (and train/unsup with imdb_unsup); any other gives all its .txt
    and .txt.gz files, searched recursively; a plain or gzip-compressed file
    is one document. Each path's documents are sorted by name; several paths
    (`tfgpt.sources.expand`) follow one another.
    """
    from tfgpt import sources

    docs, bad = [], 0
    for p in sources.expand(str(path)):
        kind = sources.kind_of(p)
        if kind == "folder":
            raw = [(name, _read_file(f)) for name, f, _ in sources.folder_files(p, imdb_unsup)]
        elif kind == "tar":
            raw = [(n, d) for n, d, _ in sources.keep_members(list(sources.tar_members(p, imdb_unsup)))]
        else:
            raw = [(p.name, _read_file(p))]
        if not raw:
            raise DataError(f"--data {p}: no .txt files found")
        for name, data in sorted(raw):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("utf-8", errors="replace")
                bad += 1
            docs.append(Document(name, text))
    if bad:
        log.warning(f"warning: {bad} file(s) were not valid UTF-8; undecodable bytes became U+FFFD")
    return docs


def _read_file(path: Path) -> bytes:
    """A file's bytes, decompressed when it is gzip-compressed."""
    import gzip

    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"--data {path}: not a readable gzip file ({e})") from None
    return data


def split_lines(docs: list[Document]) -> list[str]:
    """Every line of every document, as TextLineDataset would read them."""
    lines = []
    for d in docs:
        lines.extend(line.rstrip("\r") for line in d.text.split("\n"))
    return lines


def train_val_split(docs: list[Document], val_fraction: float, seed: int):
    """Holds out a deterministic fraction of the documents (of the lines, when
    the corpus is a single document). Returns (train_lines, val_lines)."""
    if len(docs) == 1:
        docs = [Document(f"{docs[0].name}:{i}", line) for i, line in enumerate(split_lines(docs))]
    n_val = int(round(val_fraction * len(docs)))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= len(docs):
        raise DataError(f"--val-fraction {val_fraction} leaves no training data ({len(docs)} documents)")
    order = np.random.default_rng(seed).permutation(len(docs))
    val_ids = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return split_lines(train), split_lines(val)


# --- standardization, vocabulary, tokenizer -----------------------------------


def standardize(text):
    """string [...] -> string [...]: lowercase, `<br />` to a space, and a space
    before every punctuation character (so "don't" becomes "don 't")."""
    text = tf.strings.regex_replace(text, "\\x00", " ")  # a NUL would end the string for lower()
    text = tf.strings.lower(text, encoding="utf-8")
    text = tf.strings.regex_replace(text, "<br />", " ")
    return tf.strings.regex_replace(text, f"({_PUNCT_CLASS})", r" \1")


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


# --- training windows and tf.data -------------------------------------------


def make_windows(ids: np.ndarray, lengths: np.ndarray, maxlen: int, packing: str) -> np.ndarray:
    """Cuts token rows into windows of maxlen + 1 ids: int32 [N, maxlen + 1].

    truncate: one window per line, its first maxlen + 1 tokens, 0-padded
      (lines with fewer than 2 tokens give no target and are dropped).
    pack: lines joined into one stream with id 0 after each line (its end);
      windows start every maxlen tokens, so each token is a target once.
    """
    width = maxlen + 1
    if packing == "truncate":
        keep = lengths >= 2
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[keep]
        lens = np.minimum(lengths[keep], width)
        out = np.zeros([len(starts), width], np.int32)
        cols = np.arange(width)
        src = starts[:, None] + np.minimum(cols[None, :], lens[:, None] - 1)
        out[:] = np.where(cols[None, :] < lens[:, None], ids[src] if len(ids) else 0, 0)
        return out
    if packing == "pack":
        ends = np.cumsum(lengths)
        stream = np.insert(ids, ends, 0).astype(np.int32)  # 0 after every line
        n = (len(stream) - 1) // maxlen
        if n <= 0:
            return np.zeros([0, width], np.int32)
        index = np.arange(n)[:, None] * maxlen + np.arange(width)[None, :]
        return stream[index]
    raise ValueError(f"unknown packing {packing!r}")


def split_window(window, packing: str):
    """int32 [..., maxlen + 1] -> (inputs [..., maxlen], targets, weights).

    Weights are 1 for real targets. In truncate mode a target id 0 is padding
    (weight 0); in pack mode id 0 is the end-of-line separator, a real target."""
    x, y = window[..., :-1], window[..., 1:]
    w = tf.ones_like(y, tf.float32) if packing == "pack" else tf.cast(y != 0, tf.float32)
    return x, y, w


def batches_per_epoch(num_windows: int, global_batch: int) -> int:
    """Global batches in an epoch (the partial last one is dropped); a
    DataError when the windows do not fill a single one."""
    if num_windows < global_batch:
        raise DataError(
            f"the training data gives {num_windows} windows, fewer than one global batch of "
            f"{global_batch}; use more text or a smaller --batch-size"
        )
    return num_windows // global_batch


class ArrayWindows:
    """Windows held in memory (int32 [N, maxlen + 1]) as a window source."""

    def __init__(self, windows: np.ndarray):
        self.windows = np.asarray(windows, np.int32)
        self.width = self.windows.shape[1]
        self._table = tf.convert_to_tensor(self.windows)  # created eagerly, captured by the pipelines

    def __len__(self) -> int:
        return len(self.windows)

    def gather(self, rows):
        """int64 [k] window indices -> int32 [k, width], in the graph."""
        return tf.gather(self._table, rows)


def window_source(windows):
    """A NumPy array of windows, or already a source (`len`, `width`, `gather`)."""
    return ArrayWindows(windows) if isinstance(windows, np.ndarray) else windows


def _slice(global_batch: int, ctx: tf.distribute.InputContext | None) -> tuple[int, int, int]:
    """(first row, rows, replicas) of this input pipeline's part of a global batch.

    A global batch is cut into num_replicas_in_sync equal slices; pipeline p
    (a worker) takes the slices of its replicas, p * local ... (p + 1) * local - 1."""
    replicas = ctx.num_replicas_in_sync if ctx else 1
    pipelines = ctx.num_input_pipelines if ctx else 1
    pipeline = ctx.input_pipeline_id if ctx else 0
    if global_batch % replicas:
        raise DataError(f"--batch-size {global_batch} is not divisible by the {replicas} replicas")
    local, per_replica = replicas // pipelines, global_batch // replicas
    return pipeline * local * per_replica, local * per_replica, local


def train_dataset(
    windows,
    global_batch: int,
    seed: int,
    epoch: int,
    packing: str,
    input_context: tf.distribute.InputContext | None = None,
    skip: int = 0,
) -> tf.data.Dataset:
    """One epoch of per-replica batches for this input pipeline.

    Global batch b holds the windows at positions b * global_batch ... of the
    epoch's order, a permutation keyed by (seed, epoch) alone (tfgpt/order.py),
    so a resumed run sees the same batches; `skip` starts at global batch
    `skip`. With an input context, each global batch is cut into
    num_replicas_in_sync equal slices and this pipeline (worker) reads and
    yields only its replicas' slices, in order.
    """
    from tfgpt.order import EpochOrder

    source = window_source(windows)
    first, rows, local = _slice(global_batch, input_context)
    order = EpochOrder(len(source), seed, epoch)
    ds = tf.data.Dataset.range(skip, len(source) // global_batch)
    ds = ds.map(lambda b: order(b * global_batch + first + tf.range(rows, dtype=tf.int64)))
    ds = ds.map(lambda idx: (source.gather(idx),))
    return _to_replicas(ds, local, rows // local, source.width, packing)


def eval_dataset(
    windows, global_batch: int, packing: str, input_context: tf.distribute.InputContext | None = None
) -> tf.data.Dataset:
    """Every window once, in order; the last batch is filled with empty
    (all-padding, zero-weight) windows so that every batch has the same shape."""
    source = window_source(windows)
    first, rows, local = _slice(global_batch, input_context)
    n = len(source)

    def read(b):
        idx = b * global_batch + first + tf.range(rows, dtype=tf.int64)
        real = idx < n
        # Filler rows read the last window and are zeroed; their weight is 0
        # through `real` (packed windows have no padding of their own).
        window = source.gather(tf.minimum(idx, n - 1)) * tf.cast(real, tf.int32)[:, None]
        return window, real

    ds = tf.data.Dataset.range(-(-n // global_batch)).map(read)
    return _to_replicas(ds, local, rows // local, source.width, packing)


def _to_replicas(ds, local: int, per_replica: int, width: int, packing: str):
    """[local * per_replica, width] batches -> per-replica (inputs, targets, weights)."""

    def cut(window, real=None):
        # [rows, ...] -> [local, per_replica, ...]: this pipeline's replicas' slices.
        window = tf.reshape(window, [local, per_replica, width])
        return (window,) if real is None else (window, tf.reshape(real, [local, per_replica]))

    def features(window, real=None):
        x, y, w = split_window(window, packing)
        if real is not None:
            w *= tf.cast(real, tf.float32)[:, None]
        return x, y, w

    ds = ds.map(cut).unbatch()
    ds = ds.map(features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
