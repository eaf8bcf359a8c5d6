"""Building a token store (tfgpt/data/store.py) in one streaming pass over the text.

The documents are read as chunks of a few MB that end at line ends; a line
longer than a chunk is cut into parts (`sources.segments`: at a space
between two words where there is one), so memory and speed do not depend
on the length of the lines. The parts of a line continue the same line in
the store: its count, its start and its truncate window are the line's.

Word stores (tokenizer "word"): each chunk is analysed by a compiled
TensorFlow function, on one thread per core (the function runs without
Python's lock, so the threads use every core):

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

Subword stores (tokenizer "subword"): a first pass streams a sample of the
training text into `subword.train_subword` (unless a vocabulary is given),
then the chunks are encoded (`SubwordVocab.encode_text`, in one worker
process per core) straight into final ids. Their units are documents: a
document's lines joined by the newline's id, then 0.

The training/validation split is `corpus.train_val_split`'s (`corpus.held_out`
of the documents; of the lines for a single document, or the last share of
its bytes when `corpus.split_by_share` says so, and always for a subword
store, whose single document is its only unit). The store is built in a
folder that the caller (tfgpt/data/prepare.py) renames into place when it
is complete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.config import write_text_atomic
from tfgpt.data import sources
from tfgpt.data.corpus import held_out, share_offset, split_by_share
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
    val_lines: np.ndarray | None  # sorted validation line numbers (a single document split by lines)
    split_at: int | None = None  # a single document split by share: the offset its validation part starts from


def plan_split(docs: list, val_fraction: float, seed: int, on_read=lambda n: None, by_share: bool = False) -> Plan:
    """`corpus.train_val_split`'s choice of validation documents (for a single
    document: `corpus.held_out` lines, or its last share of bytes when
    `corpus.split_by_share` says so or by_share is set), without reading the
    text (a single document is counted: its lines and bytes)."""
    if len(docs) != 1:
        return Plan(docs, set(held_out(len(docs), val_fraction, seed).tolist()), None)
    scan = sources.scan(docs[0], on_read=on_read)
    if val_fraction > 0 and (by_share or split_by_share(scan.lines, scan.text_lines, val_fraction)):
        return Plan(docs, set(), None, share_offset(scan.bytes, val_fraction))
    return Plan(docs, set(), held_out(scan.lines, val_fraction, seed).astype(np.int64))


@dataclasses.dataclass
class ReadStats:
    text_bytes: int = 0
    bad_utf8: int = 0


@dataclasses.dataclass
class Chunk:
    """A few MB of text: rows (its lines, or the parts of a line cut while
    streaming) joined by "\\n"."""

    text: bytes
    val: np.ndarray  # indices of the validation rows
    ends: np.ndarray  # indices of the rows that end a document (or its training part)
    open_last: bool  # the last row's line goes on in the next chunk


def chunks(plan: Plan, stats: ReadStats, on_read, chunk_bytes: int):
    """The documents as Chunks of about chunk_bytes, in order. A line longer
    than a chunk is cut into several rows (`sources.segments`): the rows of
    one line follow one another, the first ones in chunks that end `open_last`."""
    spools: dict = {}
    parts, size, rows, line0, cont = [], 0, 0, 0, False
    val: list = []
    ends: list = []

    def flush():
        nonlocal parts, size, val, ends, rows, line0
        text = b"".join(parts)
        if plan.val_lines is not None:  # a single document: its listed lines
            lo, hi = np.searchsorted(plan.val_lines, [line0, line0 + rows])
            local = plan.val_lines[lo:hi] - line0
        else:
            local = np.concatenate(val) if val else np.zeros([0], np.int64)
        chunk = Chunk(text, local, np.asarray(ends, np.int64), cont)
        line0 += rows - cont  # a line that goes on is the next chunk's first line too
        parts, size, val, ends, rows = [], 0, [], [], 0
        return chunk

    try:
        for i, doc in enumerate(plan.docs):
            in_val, valid = i in plan.val_docs, True
            segments = sources.segments(doc, chunk_bytes, on_read, spools, split_at=plan.split_at)
            for piece, ok, end in segments:
                if size >= chunk_bytes:
                    yield flush()
                valid &= ok
                merge = cont and bool(parts)  # the piece goes on with the chunk's last row
                if parts and not cont:
                    parts.append(b"\n")
                parts.append(piece)
                new = piece.count(b"\n") + (not merge)
                if in_val and new:
                    val.append(np.arange(rows, rows + new, dtype=np.int64))
                rows, size = rows + new, size + len(piece) + 1
                stats.text_bytes += len(piece) + (end != sources.OPEN)
                cont = end == sources.OPEN
                if end == sources.SPLIT:  # what follows is the validation part
                    ends.append(rows - 1)
                    in_val = True
            ends.append(rows - 1)
            stats.bad_utf8 += not valid
        if parts:
            yield flush()
    finally:
        for fd in spools.values():
            os.close(fd)


def row_seps(chunk: Chunk, rows: int, joiner: int) -> np.ndarray:
    """int64 [rows]: the id after each row: 0 where a unit ends, joiner
    after the other rows (0 for word stores: every line is a unit; the
    newline's id for subword stores: a document is), -1 (nothing) after a
    row whose line goes on in the next chunk."""
    seps = np.full(rows, joiner, np.int64)
    seps[chunk.ends] = 0
    if chunk.open_last:
        seps[-1] = -1
    return seps


@dataclasses.dataclass
class Carry:
    """A unit that goes on in the next chunk: where it starts in its
    split's stream, its tokens so far, whether its start is written."""

    start: int
    tokens: int
    started: bool


def split_streams(ids: np.ndarray, lengths: np.ndarray, is_val: np.ndarray, seps: np.ndarray, carry: dict, at: dict):
    """A chunk's rows as ids (flat, `lengths` per row) -> for the training and
    the validation rows: (id stream with each row's sep after it, where each
    unit of at least 2 tokens starts (absolute: `at[split]` is the stream's
    length so far), units begun). A unit is the rows up to a sep 0; one that
    does not end in the chunk goes on in the next (`carry[split]`)."""
    out = {}
    for split, keep in (("train", ~is_val), ("val", is_val)):
        n, sep = lengths[keep].astype(np.int64), seps[keep]
        if not len(n):
            out[split] = (np.zeros([0], np.uint32), np.zeros([0], np.int64), 0)
            continue
        has_sep = sep >= 0
        size = n + has_sep
        row_at = np.cumsum(size) - size
        stream = np.zeros(int(size.sum()), np.uint32)
        first = np.cumsum(n) - n  # each row's first id in `tok`
        tok = ids[np.repeat(keep, lengths)]
        stream[np.arange(len(tok)) + np.repeat(row_at - first, n)] = tok
        stream[(row_at + n)[has_sep]] = sep[has_sep]
        begins = np.ones(len(n), bool)
        begins[1:] = sep[:-1] == 0
        unit = np.cumsum(begins) - 1
        tokens = np.bincount(unit, weights=n + (sep > 0)).astype(np.int64)
        starts = row_at[begins] + at[split]
        units, before = len(tokens), carry.pop(split, None)
        if before is not None:  # the first unit began in an earlier chunk
            tokens[0] += before.tokens
            starts[0] = before.start
            units -= 1
        write = tokens >= 2
        if before is not None and before.started:
            write[0] = False
        if sep[-1] != 0:  # the last unit goes on
            started = bool(write[-1]) or (before is not None and before.started and len(tokens) == 1)
            carry[split] = Carry(int(starts[-1]), int(tokens[-1]), started)
        out[split] = (stream, starts[write], units)
    return out


class _Output:
    """The training and validation streams and starts being written, with
    the units that go on from one chunk to the next."""

    def __init__(self, folder: Path, suffix: str, dtype, shard_tokens: int, sync: bool = False):
        self.streams = {s: _ShardWriter(folder, s, suffix, dtype, shard_tokens, sync) for s in ("train", "val")}
        self.starts = {s: _StartsWriter(folder / f"{s}.starts") for s in ("train", "val")}
        self.lines = {"train": 0, "val": 0}
        self.carry: dict = {}

    def add(self, ids, lengths, is_val, seps) -> None:
        at = {s: w.length for s, w in self.streams.items()}
        for s, (stream, starts, units) in split_streams(ids, lengths, is_val, seps, self.carry, at).items():
            self.starts[s].write(starts)
            self.streams[s].write(stream)
            self.lines[s] += units

    def close(self) -> dict:
        """-> the shard names of each split."""
        if self.carry:
            raise RuntimeError("the text ended inside a unit")  # segments end every document
        for w in self.starts.values():
            w.close()
        return {s: w.close() for s, w in self.streams.items()}

    def abort(self) -> None:
        for w in list(self.starts.values()) + list(self.streams.values()):
            w.abort()


def analyse(text):
    """One chunk -> (its distinct words, each word's index among them, the
    number of words of each line). Standardization leaves "\\n" alone, so
    the chunk is standardized whole, then split into lines and words."""
    words = tf.strings.split(tf.strings.split(standardize(text), sep="\n"))
    uniq, idx = tf.unique(words.flat_values, out_idx=tf.int32)
    return uniq, idx, tf.cast(words.row_lengths(), tf.int32)


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

    def __init__(self, folder: Path, split: str, suffix: str, dtype, shard_tokens: int, sync: bool = False):
        self.folder, self.split, self.suffix, self.sync = folder, split, suffix, sync
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
            self._finish()
        self.names.append(f"{self.split}-{len(self.names):05d}.{self.suffix}")
        self._file = open(self.folder / self.names[-1], "wb")

    def _finish(self):
        """Closes the open shard (final shards: on disk first)."""
        if self.sync:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()

    def close(self) -> list[str]:
        if self._file is None:
            self._next()  # an empty split still has one (empty) shard
        self._finish()
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
    tokenizer: str = "word",
    given_subword: Path | None = None,
) -> dict:
    """Builds a store into the empty folder `folder`; returns its manifest
    (written last, as folder/manifest.json), with `key` and `params`.

    tokenizer "word": the ids of the corpus's word vocabulary of vocab_size
    (vocab.txt). With given_vocab the ids are those of that vocabulary (a
    resumed run's). When the corpus's own vocabulary is the same, the store
    is the ordinary one (key, params); when not, it is the vocabulary's
    (alt = (params, key, ...)), and the manifest says so with "own_vocab":
    false.

    tokenizer "subword": a byte-level BPE vocabulary of vocab_size learned
    from the training text (subword.json), or given_subword's (a resumed
    run's; the store is then alt's, when alt is given). Its units are
    documents: a document's lines joined by the newline's id."""
    if tokenizer not in ("word", "subword"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}")
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
    on_count = progress.add if len(docs) == 1 else (lambda n: None)
    plan = plan_split(docs, val_fraction, seed, on_read=on_count, by_share=tokenizer == "subword")
    progress.close()
    workers, chunk_bytes = workers or cores(), chunk_bytes or CHUNK_BYTES
    stats = ReadStats()
    if tokenizer == "subword":
        made = _subword_store(folder, plan, stats, vocab_size, given_subword, shard_tokens, workers, chunk_bytes)
    else:
        made = _word_store(folder, plan, stats, vocab_size, given_vocab, shard_tokens, workers, chunk_bytes)
    for spool in folder.glob("spool-*"):
        spool.unlink()

    splits = {}
    for s in ("train", "val"):
        length = made.output.streams[s].length
        lines = made.output.lines[s]
        splits[s] = dict(
            lines=lines,
            tokens=length - lines,
            stream=length,
            line_starts=made.output.starts[s].count,
            shards=made.shards[s],
            starts=f"{s}.starts",
        )
    files = {}
    for name in [made.vocab_file] + [n for s in splits.values() for n in s["shards"] + [s["starts"]]]:
        st = (folder / name).stat()
        files[name] = dict(bytes=st.st_size, sha256=file_sha256(folder / name), mtime_ns=st.st_mtime_ns)
    seconds = time.perf_counter() - t0
    if not made.own_vocab and alt is not None:
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
        vocab_entries=made.entries,
        dtype=np.dtype(made.dtype).name,
        shard_tokens=shard_tokens,
        own_vocab=made.own_vocab,
        splits=splits,
        files=files,
        seconds=dict(read_and_tokenize=round(made.read_s, 3), total=round(seconds, 3)),
    )
    if tokenizer != "word":  # a word store's manifest is the one it always was
        manifest["tokenizer"] = tokenizer
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _fsync_dir(folder)
    return manifest


@dataclasses.dataclass
class _Made:
    """What a tokenizing pass wrote."""

    output: _Output
    shards: dict  # split -> final shard names
    vocab_file: str
    entries: int
    dtype: object
    own_vocab: bool
    read_s: float


def _write_in_order(output, progress, chunks, submit, consume, depth: int) -> dict:
    """The tokenizing loop of both passes: submit(chunk) starts each chunk's
    work (a future), and consume(result, chunk) takes the results in the
    chunks' order, with at most `depth` of them pending while this thread
    reads on. Returns output.close(); on any error the output is aborted.
    The progress line is closed either way."""
    try:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((submit(chunk), chunk))
            if len(pending) > depth:
                future, done = pending.popleft()
                consume(future.result(), done)
        while pending:
            future, done = pending.popleft()
            consume(future.result(), done)
        return output.close()
    except BaseException:
        output.abort()
        raise
    finally:
        progress.close()


def _word_store(folder, plan, stats, vocab_size, given_vocab, shard_tokens, workers, chunk_bytes) -> _Made:
    """The word pass: provisional ids while reading, then the vocabulary
    ranked and the shards rewritten in its ids."""
    t0 = time.perf_counter()
    progress = Progress("tokenizing", _doc_bytes(plan.docs))
    run = tf.function(analyse, input_signature=[tf.TensorSpec([], tf.string)])
    ids = _Ids()
    output = _Output(folder, "u32", np.uint32, shard_tokens)

    def consume(result, chunk):
        uniq, idx, lengths = result
        idx, lengths = idx.numpy(), lengths.numpy()
        is_val = np.zeros(len(lengths), bool)
        is_val[chunk.val] = True
        counts = np.bincount(idx[~np.repeat(is_val, lengths)], minlength=len(uniq))
        pids = ids.add(uniq, counts).take(idx)
        output.add(pids, lengths, is_val, row_seps(chunk, len(lengths), 0))

    # The analysis runs on `workers` threads (TensorFlow releases the GIL
    # while a function runs); this thread reads the next chunks and takes
    # the results in order.
    with ThreadPoolExecutor(workers) as pool:
        prov = _write_in_order(
            output,
            progress,
            chunks(plan, stats, progress.add, chunk_bytes),
            lambda chunk: pool.submit(run, tf.constant(chunk.text)),
            consume,
            depth=workers,
        )
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
    dtype = _store_dtype(len(vocab))
    write_vocab(vocab, folder / "vocab.txt", vocab_counts)
    shards = {s: _remap(folder, prov[s], lut.astype(dtype)) for s in prov}
    return _Made(output, shards, "vocab.txt", len(vocab), dtype, own_vocab, read_s)


def training_text(plan: Plan, on_text, chunk_bytes: int, budget: int | None = None):
    """The training part's text as str pieces, streamed (what a subword
    vocabulary is learned from): the training documents, or a single
    document's part before its split. With budget (bytes), a larger training
    part gives an evenly spread sample of about budget bytes: of each run of
    documents (or pieces of a long one) totalling n bytes, about
    n * budget / total. on_text(n): n more bytes of the sample read."""
    training = [d for i, d in enumerate(plan.docs) if i not in plan.val_docs]
    total = _doc_bytes(training)
    share = 1.0 if budget is None or total <= budget else budget / total
    credit = 0.0  # bytes of text the sample is owed

    def take(n: int) -> bool:
        nonlocal credit
        credit += n * share
        if credit < n * 0.5:  # taken when more than half of it is owed
            return False
        credit -= n
        return True

    spools: dict = {}
    try:
        for doc in training:
            size = _known_size(doc)
            whole = size is not None and size <= chunk_bytes and plan.split_at is None
            if whole and share < 1.0 and not take(size):
                continue  # a small document left out unread
            for piece, _, end in sources.segments(doc, chunk_bytes, lambda n: None, spools, split_at=plan.split_at):
                if whole or share >= 1.0 or take(len(piece)):
                    on_text(len(piece))
                    yield piece.decode("utf-8")
                    if end == sources.LINE:
                        yield "\n"  # a line end, as in the text
                if end == sources.SPLIT:
                    break
    finally:
        for fd in spools.values():
            os.close(fd)


def _known_size(doc) -> int | None:
    """A document's bytes when known without reading it (not for gzip)."""
    if doc.kind == "spool":
        return doc.size
    if doc.kind == "plain":
        return os.path.getsize(doc.path)
    return None


def _subword_store(folder, plan, stats, vocab_size, given_subword, shard_tokens, workers, chunk_bytes) -> _Made:
    """The subword pass: learn the vocabulary from the training text (a
    sample of at most `subword.TRAIN_SAMPLE_BYTES`, a first pass) unless
    one is given, then encode the chunks in `workers` processes while this
    one reads the next chunks and writes the ids (`_Encoders`)."""
    # Imported here, not at the top: word stores never need the `tokenizers` package.
    from tfgpt.data.subword import SUBWORD_FILE, TRAIN_SAMPLE_BYTES, SubwordVocab, train_subword

    t0 = time.perf_counter()
    corpus_bytes = _doc_bytes(plan.docs)
    big = corpus_bytes >= POOL_MIN_BYTES
    # The processes are started before the vocabulary is learned, while the
    # process is small and `tokenizers` has started no threads yet.
    with _Encoders(workers if big else 0) as encoders:
        if given_subword is not None:
            vocab = SubwordVocab.load(given_subword)
        else:
            training = [d for i, d in enumerate(plan.docs) if i not in plan.val_docs]
            progress = Progress("learning subwords", min(_doc_bytes(training), TRAIN_SAMPLE_BYTES))
            try:
                text = training_text(plan, progress.add, chunk_bytes, budget=TRAIN_SAMPLE_BYTES)
                vocab = train_subword(text, vocab_size)
            finally:
                progress.close()
        vocab.save(folder / SUBWORD_FILE)
        encoders.use(vocab, folder / SUBWORD_FILE)
        dtype = _store_dtype(vocab.size)
        progress = Progress("tokenizing", corpus_bytes)
        output = _Output(folder, "tok", dtype, shard_tokens, sync=True)

        def consume(result, chunk):
            ids, lengths = result
            is_val = np.zeros(len(lengths), bool)
            is_val[chunk.val] = True
            output.add(ids, lengths, is_val, row_seps(chunk, len(lengths), vocab.newline_id))

        shards = _write_in_order(
            output,
            progress,
            chunks(plan, stats, progress.add, chunk_bytes),
            lambda chunk: encoders.submit(chunk.text),
            consume,
            depth=2 * max(workers, 1),
        )
    read_s = time.perf_counter() - t0
    return _Made(output, shards, SUBWORD_FILE, vocab.size, dtype, given_subword is None, read_s)


# Text below this size is encoded in this process: starting processes would
# take longer than they save.
POOL_MIN_BYTES = 16 << 20


class _Encoders:
    """Encodes chunks of text (bytes of "\n"-separated rows) with a
    SubwordVocab: in `workers` forked processes, each with its own copy of
    the vocabulary and of its cache of encoded pieces (`encode_text` is
    Python and holds the interpreter's lock), or on one thread of this
    process where that is not possible (workers 0 or 1, no fork).

    `tokenizers` turns its threads off in a process forked after it has
    used them, with a warning; the processes are forked before any
    tokenizing, with TOKENIZERS_PARALLELISM=false (one thread each: the
    processes use the cores)."""

    def __init__(self, workers: int):
        self.pool = None
        self.vocab = self.path = None
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            saved = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the processes
            try:
                self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
                self.pool.submit(int).result()  # forks every process now
            finally:
                if saved is None:
                    del os.environ["TOKENIZERS_PARALLELISM"]
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = saved
        self.thread = None if self.pool else ThreadPoolExecutor(1)

    def use(self, vocab, path: Path) -> None:
        """The vocabulary to encode with (the processes load it from path)."""
        self.vocab, self.path = vocab, str(path)

    def submit(self, text: bytes):
        """A future of (flat int32 ids, int64 ids per row)."""
        if self.pool:
            return self.pool.submit(_encode_in_worker, self.path, text)
        return self.thread.submit(_encode_chunk, self.vocab, text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)
        else:
            self.thread.shutdown()


def _encode_chunk(vocab, text: bytes):
    """The ids of a chunk's rows (`SubwordVocab.encode_text`), in the store's
    dtype (from a worker process: half the bytes to send back)."""
    ids, lengths = vocab.encode_text(text)
    return ids.astype(_store_dtype(vocab.size), copy=False), lengths


def _store_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


_WORKER_VOCABS: dict = {}  # in a worker process: path -> SubwordVocab


def _encode_in_worker(path: str, text: bytes):
    """A worker process's encoding, with the vocabulary of path (loaded once)."""
    vocab = _WORKER_VOCABS.get(path)
    if vocab is None:
        # Imported here, not at the top (as in _subword_store): word stores never need `tokenizers`.
        from tfgpt.data.subword import SubwordVocab

        _WORKER_VOCABS.clear()
        vocab = _WORKER_VOCABS[path] = SubwordVocab.load(path)
    return _encode_chunk(vocab, text)


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
