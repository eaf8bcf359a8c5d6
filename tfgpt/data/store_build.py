"""Building a token store (tfgpt/data/store.py) in one streaming pass over the text.

The documents are read as line-aligned chunks of a few MB. Each chunk is
analysed by a compiled TensorFlow function, on one thread per core (the
function runs without Python's lock, so the threads use every core):

    words = the chunk standardized (`text.standardize`, the Tokenizer's own),
    split at "\\n" into lines and each line at whitespace;
    -> the chunk's distinct words, each word's index among them, and the
       number of words of each line

The reading thread takes the results in chunk order: a hash table gives each
new word the next provisional id, the training lines' word counts are added
up by provisional id, and the lines' ids, with 0 after each line, are
written (in provisional ids, uint32) to temporary training and validation
shards, with the start of each line of at least 2 words. Memory is the
table and the counts (bounded by the number of distinct words) plus the
chunks in flight, whatever the corpus size.

When the text is read, the vocabulary is ranked from the counts exactly as
`text.build_vocab` ranks it (training lines only; descending count, ties by
the word), and each temporary shard is rewritten through provisional id ->
vocabulary id into the final shard (uint16 when the vocabulary fits), with
its checksum. So the text is standardized and split once, not once for the
vocabulary and again for the ids.

The training/validation split is `corpus.train_val_split`'s (`corpus.held_out`
of the documents, of the lines for a single document). The store is built in
a folder that the caller (tfgpt/data/prepare.py) renames into place when it
is complete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.config import write_text_atomic
from tfgpt.data import sources
from tfgpt.data.corpus import held_out
from tfgpt.data.progress import Progress
from tfgpt.data.store import FORMAT, MANIFEST, VERSION, file_sha256
from tfgpt.data.text import PAD, UNK, standardize, write_vocab
from tfgpt.runtime.memory import release_library_pages

CHUNK_BYTES = 1 << 20
SHARD_TOKENS = 1 << 27  # ids per shard file (2^27: 256 MiB as uint16)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclasses.dataclass
class Plan:
    """What is read and how it is split."""

    docs: list
    val_docs: set  # indices of validation documents (several documents)
    val_lines: np.ndarray | None  # sorted validation line numbers (a single document)


def plan_split(docs: list, val_fraction: float, seed: int, on_read=lambda n: None) -> Plan:
    """`corpus.train_val_split`'s choice of validation documents (lines, for a
    single document: `corpus.held_out`), without reading the text (a single
    document's lines are counted)."""
    single = len(docs) == 1
    n = sources.count_lines(docs[0], on_read=on_read) if single else len(docs)
    val = held_out(n, val_fraction, seed)
    if single:
        return Plan(docs, set(), val.astype(np.int64))
    return Plan(docs, set(val.tolist()), None)


@dataclasses.dataclass
class ReadStats:
    text_bytes: int = 0
    bad_utf8: int = 0


def chunks(plan: Plan, stats: ReadStats, on_read, chunk_bytes: int):
    """(text, val_line_indices) chunks of whole lines, about chunk_bytes each:
    the lines of consecutive documents, with the indices (in the chunk) of
    the lines that are held out for validation."""
    spools: dict = {}
    parts, size, val, lines, line0 = [], 0, [], 0, 0

    def flush():
        nonlocal parts, size, val, lines, line0
        text = b"\n".join(parts)
        if plan.val_lines is not None:  # a single document: its listed lines
            lo, hi = np.searchsorted(plan.val_lines, [line0, line0 + lines])
            local = plan.val_lines[lo:hi] - line0
        else:
            local = np.concatenate(val) if val else np.zeros([0], np.int64)
        line0 += lines
        parts, size, val, lines = [], 0, [], 0
        return text, local

    try:
        for i, doc in enumerate(plan.docs):
            is_val, valid = i in plan.val_docs, True
            for piece, ok in sources.pieces(doc, block=chunk_bytes, on_read=on_read, spools=spools):
                valid &= ok
                n = piece.count(b"\n") + 1
                if is_val:
                    val.append(np.arange(lines, lines + n, dtype=np.int64))
                parts.append(piece)
                size, lines = size + len(piece) + 1, lines + n
                stats.text_bytes += len(piece) + 1
                if size >= chunk_bytes:
                    yield flush()
            stats.bad_utf8 += not valid
        if parts:
            yield flush()
    finally:
        for fd in spools.values():
            os.close(fd)


def analyse(text):
    """One chunk -> (its distinct words, each word's index among them, the
    number of words of each line). Standardization leaves "\\n" alone, so
    the chunk is standardized whole, then split into lines and words."""
    words = tf.strings.split(tf.strings.split(standardize(text), sep="\n"))
    uniq, idx = tf.unique(words.flat_values, out_idx=tf.int32)
    return uniq, idx, tf.cast(words.row_lengths(), tf.int32)


def split_streams(pids: np.ndarray, lengths: np.ndarray, is_val: np.ndarray):
    """A chunk's words as ids (pids, one per word) and line lengths -> for the
    training and the validation lines: (id stream with 0 after each line,
    where each line of at least 2 words starts in it, lines)."""
    out = []
    line_of_word = np.repeat(np.arange(len(lengths)), lengths)
    stream = np.zeros(len(pids) + len(lengths), np.uint32)
    stream[np.arange(len(pids)) + line_of_word] = pids
    stream_val = np.repeat(is_val, lengths + 1)
    for keep_line, keep in ((~is_val, ~stream_val), (is_val, stream_val)):
        n = lengths[keep_line].astype(np.int64)
        starts = np.cumsum(n + 1) - (n + 1)
        out.append((stream[keep], starts[n >= 2], len(n)))
    return out


class _Ids:
    """Provisional ids: each new word gets the next one, in chunk order (0 is
    the end of a line). Also adds up the training counts by id."""

    def __init__(self):
        self.table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, default_value=-1)
        self.next = tf.Variable(1, dtype=tf.int64)
        self.counts = np.zeros(1 << 16, np.int64)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def assign(uniq):
            ids = tf.reshape(self.table.lookup(uniq), [-1])
            new = ids < 0
            fresh = tf.boolean_mask(uniq, new)
            fresh_ids = self.next + tf.range(tf.size(fresh, out_type=tf.int64))
            self.table.insert(fresh, fresh_ids)
            self.next.assign_add(tf.size(fresh, out_type=tf.int64))
            return tf.tensor_scatter_nd_update(ids, tf.where(new), fresh_ids)

        self._assign = assign

    def add(self, uniq, train_counts: np.ndarray) -> np.ndarray:
        """-> uint32 [len(uniq)]: the provisional id of each of a chunk's
        distinct words (new ones get the next ids)."""
        ids = self._assign(uniq).numpy()
        top = int(self.next.numpy())
        if top > len(self.counts):
            grown = np.zeros(max(top, 2 * len(self.counts)), np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
        self.counts[ids] += train_counts
        return ids.astype(np.uint32)

    def words(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(words as bytes, their provisional ids, their training counts)."""
        keys, ids = self.table.export()
        keys, ids = keys.numpy(), ids.numpy()
        return keys, ids, self.counts[ids]


def rank_vocab(words: np.ndarray, counts: np.ndarray, vocab_size: int) -> tuple[list[str], list[int], np.ndarray]:
    """`text.build_vocab` from counts: ["", "[UNK]", words by descending count,
    ties by the word (bytes)], at most vocab_size; words never seen in
    training lines are left out. Also returns the chosen rows of `words`."""
    seen = np.flatnonzero(counts > 0)
    room = max(0, vocab_size - 2)
    if room < len(seen):
        # Only words at least as frequent as the room-th most frequent can be
        # in the vocabulary: sort those (all ties of that count included).
        threshold = np.partition(counts[seen], len(seen) - room)[len(seen) - room]
        candidates = seen[counts[seen] >= threshold]
    else:
        candidates = seen
    ranked = sorted(candidates.tolist(), key=lambda r: (-counts[r], words[r]))[:room]
    kept = np.asarray(ranked, np.int64)
    unk = int(counts[seen].sum() - counts[kept].sum()) if len(kept) else int(counts[seen].sum())
    vocab = [PAD, UNK] + [words[r].decode("utf-8") for r in ranked]
    return vocab, [0, unk] + [int(counts[r]) for r in ranked], kept


class _ShardWriter:
    """Appends ids to shards of `shard_tokens` each: <split>-00000.<suffix>, ..."""

    def __init__(self, folder: Path, split: str, suffix: str, dtype, shard_tokens: int):
        self.folder, self.split, self.suffix = folder, split, suffix
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.names: list[str] = []
        self.length, self._file = 0, None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self.length % self.shard_tokens == 0 and (self._file is None or self.length):
                self._next()
            take = min(len(ids), self.shard_tokens - self.length % self.shard_tokens)
            self._file.write(ids[:take].tobytes())
            ids, self.length = ids[take:], self.length + take

    def _next(self):
        if self._file:
            self._file.close()
        self.names.append(f"{self.split}-{len(self.names):05d}.{self.suffix}")
        self._file = open(self.folder / self.names[-1], "wb")

    def close(self) -> list[str]:
        if self._file is None:
            self._next()  # an empty split still has one (empty) shard
        self._file.close()
        return self.names

    def abort(self) -> None:
        """Closes the open shard after a failure (its folder is deleted)."""
        _quietly_close(self._file)


class _StartsWriter:
    def __init__(self, path: Path):
        self.path, self.count = path, 0
        self._file = open(path, "wb")

    def write(self, starts: np.ndarray) -> None:
        self._file.write(starts.astype(np.int64).tobytes())
        self.count += len(starts)

    def close(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        _quietly_close(self._file)


def _quietly_close(f) -> None:
    if f is not None and not f.closed:
        try:
            f.close()
        except OSError:  # the buffered rest cannot be written either (a full disk)
            pass


def _remap(folder: Path, names: list[str], lut: np.ndarray, block: int = 1 << 22) -> list[str]:
    """Rewrites provisional shards (uint32) through lut (whose dtype is the
    final one) into final shards; deletes each provisional shard once
    rewritten, so the disk holds at most one shard twice."""
    out = []
    for name in names:
        final = name.rsplit(".", 1)[0] + ".tok"
        with open(folder / name, "rb") as src, open(folder / final, "wb") as dst:
            while True:
                ids = np.fromfile(src, np.uint32, count=block)
                if not len(ids):
                    break
                lut.take(ids).tofile(dst)
            dst.flush()
            os.fsync(dst.fileno())
        (folder / name).unlink()
        out.append(final)
    return out


def build(
    folder: Path,
    paths: list[Path],
    *,
    imdb_unsup: bool,
    vocab_size: int,
    val_fraction: float,
    seed: int,
    params: dict,
    key: str,
    given_vocab: list[str] | None = None,
    alt: tuple | None = None,
    shard_tokens: int = SHARD_TOKENS,
    workers: int | None = None,
    chunk_bytes: int | None = None,
) -> dict:
    """Builds a store into the empty folder `folder`; returns its manifest
    (written last, as folder/manifest.json), with `key` and `params`.

    With given_vocab the ids are those of that vocabulary (a resumed run's).
    When the corpus's own vocabulary is the same, the store is the ordinary
    one (key, params); when not, it is the vocabulary's (alt = (params, key,
    ...)), and the manifest says so with "own_vocab": false."""
    t0 = time.perf_counter()
    # TensorFlow is running: unmap the library pages only its start-up used
    # (tfgpt/runtime/memory.py), as training does before it reads its data.
    release_library_pages()
    archives = [p for p in paths if not p.is_dir() and sources.kind_of(p) == "tar"]
    progress = Progress("reading archives", sum(p.stat().st_size for p in archives))
    docs = sources.list_documents(paths, imdb_unsup, spool_dir=folder, on_read=progress.add)
    if len(docs) == 1:
        progress.close()
        progress = Progress("counting lines", _doc_bytes(docs))
    plan = plan_split(docs, val_fraction, seed, on_read=progress.add if len(docs) == 1 else (lambda n: None))
    progress.close()
    progress = Progress("tokenizing", _doc_bytes(docs))

    stats = ReadStats()
    workers, chunk_bytes = workers or cores(), chunk_bytes or CHUNK_BYTES
    run = tf.function(analyse, input_signature=[tf.TensorSpec([], tf.string)])
    ids = _Ids()
    streams = {s: _ShardWriter(folder, s, "u32", np.uint32, shard_tokens) for s in ("train", "val")}
    starts = {s: _StartsWriter(folder / f"{s}.starts") for s in ("train", "val")}
    lines = {"train": 0, "val": 0}

    def consume(job):
        future, val = job
        uniq, idx, lengths = future.result()
        idx, lengths = idx.numpy(), lengths.numpy()
        is_val = np.zeros(len(lengths), bool)
        is_val[val] = True
        counts = np.bincount(idx[~np.repeat(is_val, lengths)], minlength=len(uniq))
        pids = ids.add(uniq, counts).take(idx)
        for s, (stream, at, n) in zip(("train", "val"), split_streams(pids, lengths, is_val)):
            starts[s].write(at + streams[s].length)
            streams[s].write(stream)
            lines[s] += n

    # The analysis runs on `workers` threads (TensorFlow releases the GIL
    # while a function runs); this thread reads the next chunks and takes
    # the results in order.
    try:
        with ThreadPoolExecutor(workers) as pool:
            pending: collections.deque = collections.deque()
            for text, val in chunks(plan, stats, progress.add, chunk_bytes):
                pending.append((pool.submit(run, tf.constant(text)), val))
                if len(pending) > workers:
                    consume(pending.popleft())
            while pending:
                consume(pending.popleft())
        for w in starts.values():
            w.close()
        prov = {s: w.close() for s, w in streams.items()}
    except BaseException:
        for w in list(starts.values()) + list(streams.values()):
            w.abort()
        raise
    finally:
        progress.close()
    read_s = time.perf_counter() - t0

    words, pids, counts = ids.words()
    vocab, vocab_counts, kept = rank_vocab(words, counts, vocab_size)
    own_vocab = given_vocab is None or vocab == list(given_vocab)
    lut = np.ones(int(ids.next.numpy()), np.int64)  # unknown words: [UNK]
    lut[0] = 0
    if own_vocab:
        lut[pids[kept]] = np.arange(2, len(kept) + 2)
    else:
        vocab, vocab_counts = list(given_vocab), _given_counts(given_vocab, words, counts)
        index = {w.encode("utf-8"): i for i, w in enumerate(given_vocab) if i >= 2}
        rows = [(r, index[w]) for r, w in enumerate(words.tolist()) if w in index]
        if rows:
            r, i = np.asarray(rows, np.int64).T
            lut[pids[r]] = i
    dtype = np.uint16 if len(vocab) <= 1 << 16 else np.uint32
    write_vocab(vocab, folder / "vocab.txt", vocab_counts)
    shards = {s: _remap(folder, prov[s], lut.astype(dtype)) for s in prov}
    for spool in folder.glob("spool-*"):
        spool.unlink()

    splits = {}
    for s in ("train", "val"):
        length = streams[s].length
        splits[s] = dict(
            lines=lines[s],
            tokens=length - lines[s],
            stream=length,
            line_starts=starts[s].count,
            shards=shards[s],
            starts=f"{s}.starts",
        )
    files = {}
    for name in ["vocab.txt"] + [n for s in splits.values() for n in s["shards"] + [s["starts"]]]:
        st = (folder / name).stat()
        files[name] = dict(bytes=st.st_size, sha256=file_sha256(folder / name), mtime_ns=st.st_mtime_ns)
    seconds = time.perf_counter() - t0
    if not own_vocab:
        params, key = alt[0], alt[1]
    manifest = dict(
        format=FORMAT,
        version=VERSION,
        key=key,
        params=params,
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
        documents=len(docs),
        bad_utf8=stats.bad_utf8,
        text_bytes=stats.text_bytes,
        vocab_entries=len(vocab),
        dtype=np.dtype(dtype).name,
        shard_tokens=shard_tokens,
        own_vocab=own_vocab,
        splits=splits,
        files=files,
        seconds=dict(read_and_tokenize=round(read_s, 3), total=round(seconds, 3)),
    )
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _fsync_dir(folder)
    return manifest


def _given_counts(vocab: list[str], words: np.ndarray, counts: np.ndarray) -> list[int]:
    """The training counts of a given vocabulary's words in this corpus
    ([UNK]: of all other words)."""
    by_word = dict(zip(words.tolist(), counts.tolist()))
    out = [0, 0] + [int(by_word.get(w.encode("utf-8"), 0)) for w in vocab[2:]]
    out[1] = int(counts.sum()) - sum(out[2:])
    return out


def _doc_bytes(docs) -> int:
    """Bytes the documents take where they are read from (compressed ones:
    their compressed size; a whole gzip file is counted once)."""
    total, seen = 0, set()
    for d in docs:
        if d.kind == "spool":
            total += d.size
        elif d.path not in seen:
            seen.add(d.path)
            total += os.path.getsize(d.path)
    return total


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
