"""The token store: a corpus tokenized once, on disk, and the training windows
read from it.

    STORE/
      manifest.json       written last: what was built from what, and the size,
                          SHA-256 and modification time of every other file
      vocab.txt           the vocabulary (`text.write_vocab`) of a word store,
      or subword.json     or a subword store's (`subword.SubwordVocab.save`)
      train-00000.tok     token ids, uint16 when the vocabulary fits, else uint32:
      train-00001.tok     the training units one after the other, each followed
      ...                 by the id 0 (the stream that `--packing pack` cuts),
                          split into shards of `shard_tokens` ids
      train.starts        int64: where each training unit of at least 2 tokens
                          starts in that stream (the windows of `truncate`)
      val-00000.tok, val.starts   the same for the validation units

A unit ("line" in the manifest) is a line of a word store, a document of a
subword store (its lines joined by the newline's id). The manifest's
"tokenizer" says which ("word" when it is absent: stores from before).

A window is read with a positioned read (pread) of its maxlen + 1 ids, so
reading needs no memory beyond the batch in flight, whatever the corpus size
(a memory map would keep every page it touched resident). `pack` window i
is the stream's ids i * maxlen .. i * maxlen + maxlen; `truncate` window i is
the line at starts[i], cut at its end (the first 0) and 0-padded: both are
exactly what `windows.make_windows` makes of the same lines.

Opening a store checks that every file has the size the manifest gives, and
the checksum of every file whose modification time changed since (all of them
with `checksums="all"`); a store that fails is reported, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.data.text import read_vocab

FORMAT = "tfgpt-token-store"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class StoreError(RuntimeError):
    """A store that cannot be used as it is (missing, incomplete or damaged)."""


def is_store(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(8 << 20)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except FileNotFoundError:
        raise StoreError(f"{root} holds no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{root}/{MANIFEST} is unreadable ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise StoreError(f"{root} is not a version-{VERSION} tfgpt token store")
    return manifest


def check_files(root: Path, manifest: dict, checksums: str = "changed") -> None:
    """Raises StoreError naming the first file that is missing, has another
    size than recorded, or (when its modification time changed, or with
    checksums="all") another SHA-256."""
    for name, info in sorted(manifest["files"].items()):
        path = Path(root) / name
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{name} is missing") from None
        if st.st_size != info["bytes"]:
            raise StoreError(f"{name} has {st.st_size:,} bytes, the manifest says {info['bytes']:,}")
        if checksums == "all" or st.st_mtime_ns != info["mtime_ns"]:
            if file_sha256(path) != info["sha256"]:
                raise StoreError(f"{name} does not match its checksum")


class Store:
    """An opened, checked store."""

    def __init__(self, root, checksums: str = "changed"):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        check_files(self.root, self.manifest, checksums)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shard_tokens = int(self.manifest["shard_tokens"])

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def tokenizer(self) -> str:
        """The store's tokenizer, "word" or "subword" (old manifests: word)."""
        return self.manifest.get("tokenizer", "word")

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer's file: vocab.txt (word) or subword.json (subword)."""
        return self.root / ("subword.json" if self.tokenizer == "subword" else "vocab.txt")

    @property
    def vocab_path(self) -> Path:
        return self.root / "vocab.txt"

    def vocab(self) -> list[str]:
        return read_vocab(self.vocab_path)

    def split(self, name: str) -> dict:
        return self.manifest["splits"][name]

    def windows(self, split: str, maxlen: int, packing: str) -> StoreWindows:
        return StoreWindows(self, split, maxlen, packing)


class TokenStream:
    """Positioned reads of one split's id stream and line starts."""

    def __init__(self, store: Store, split: str):
        info = store.split(split)
        self.dtype, self.shard_tokens = store.dtype, store.shard_tokens
        self.length = int(info["stream"])
        self.num_starts = int(info["line_starts"])
        # Opened once: a store replaced while training runs stays readable
        # through these descriptors.
        self.fds = [os.open(store.root / name, os.O_RDONLY) for name in info["shards"]]
        self.starts_fd = os.open(store.root / info["starts"], os.O_RDONLY)

    def close(self):
        for fd in self.fds + [self.starts_fd]:
            os.close(fd)
        self.fds, self.starts_fd = [], None

    def __del__(self):
        if getattr(self, "starts_fd", None) is not None:
            self.close()

    def tokens(self, pos: int, count: int) -> np.ndarray:
        """Up to `count` ids from stream position pos (fewer at the end)."""
        count = max(0, min(count, self.length - pos))
        size = self.dtype.itemsize
        parts, need = [], count
        while need > 0:
            shard, offset = divmod(pos, self.shard_tokens)
            take = min(need, self.shard_tokens - offset)
            data = os.pread(self.fds[shard], take * size, offset * size)
            if len(data) != take * size:
                raise StoreError(f"shard {shard} of the token store is shorter than its manifest says")
            parts.append(data)
            pos, need = pos + take, need - take
        return np.frombuffer(b"".join(parts), self.dtype)

    def starts(self, rows: np.ndarray) -> np.ndarray:
        """int64 stream positions of the lines with index rows (of those with
        at least 2 tokens)."""
        out = np.empty(len(rows), np.int64)
        for i, r in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(self.starts_fd, 8, 8 * r), np.int64)[0]
        return out


class StoreWindows:
    """The windows of one split of a store, as a window source for
    `data.train_dataset` and `data.eval_dataset`."""

    def __init__(self, store: Store, split: str, maxlen: int, packing: str):
        if packing not in ("truncate", "pack"):
            raise ValueError(f"unknown packing {packing!r}")
        self.stream = TokenStream(store, split)
        self.maxlen, self.packing, self.width = maxlen, packing, maxlen + 1
        self.tokens = int(store.split(split)["tokens"])
        if packing == "pack":
            self.count = max(0, (self.stream.length - 1) // maxlen)
        else:
            self.count = self.stream.num_starts

    def __len__(self) -> int:
        return self.count

    def read(self, rows) -> np.ndarray:
        """int32 [len(rows), maxlen + 1]: the windows with these indices."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.zeros([len(rows), self.width], np.int32)
        if self.packing == "pack":
            starts = rows * self.maxlen
        else:
            starts = self.stream.starts(rows)
        for i, start in enumerate(starts.tolist()):
            ids = self.stream.tokens(start, self.width)
            out[i, : len(ids)] = ids
        if self.packing == "truncate":
            # The line ends at its first 0: what follows belongs to the next line.
            out *= np.cumsum(out == 0, axis=1) == 0
        return out

    def gather(self, rows):
        """int64 [k] window indices -> int32 [k, maxlen + 1], in the graph."""
        out = tf.numpy_function(self.read, [rows], tf.int32, name="read_windows")
        out.set_shape([None, self.width])
        return out
