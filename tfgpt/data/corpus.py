"""A corpus in memory: the IMDB archive, documents, lines, the validation split.

The corpus is a list of documents (a review, a file); every line of a
document is one example, as in the Keras example's `TextLineDataset`.
Training reads its windows from a token store on disk (data/store.py, built
by data/store_build.py); the in-memory functions here (`read_corpus`,
`train_val_split`) with data/text.py's `build_vocab` and `tokenize_lines`
and data/windows.py's `make_windows` define the same corpus, vocabulary and
windows for small inputs, the evaluation and the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from tfgpt.data import sources
from tfgpt.errors import UserError

log = logging.getLogger(__name__)

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"


@dataclasses.dataclass
class TextDocument:
    """A document read into memory (`tfgpt.data.sources.Document` says where
    a document's bytes are, without reading them)."""

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
        raise UserError(
            f"could not download {url} ({reason}); without network, pass --data PATH "
            "to an aclImdb archive, directory or text file"
        ) from None
    if digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise UserError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got "
            f"{digest.hexdigest()}; the file was deleted, try again or pass --data PATH"
        )
    part.replace(target)


def read_corpus(path: str | Path, imdb_unsup: bool = False) -> list[TextDocument]:
    """Reads every form `--data` accepts into documents, in memory.

    An archive or folder with the IMDB layout gives its {train,test}/{pos,neg}
    reviews (and train/unsup with imdb_unsup); any other gives all its .txt
    and .txt.gz files, searched recursively; a plain or gzip-compressed file
    is one document. Each path's documents are sorted by name; several paths
    (`tfgpt.data.sources.expand`) follow one another.
    """

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
            raise UserError(sources.no_text_files(p))
        for name, data in sorted(raw):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("utf-8", errors="replace")
                bad += 1
            docs.append(TextDocument(name, text))
    if bad:
        log.warning(f"warning: {bad} file(s) were not valid UTF-8; undecodable bytes became U+FFFD")
    return docs


def _read_file(path: Path) -> bytes:
    """A file's bytes, decompressed when it is gzip-compressed."""

    data = Path(path).read_bytes()
    return sources.gunzip(data, path) if data[:2] == sources.GZIP_MAGIC else data


def split_lines(docs: list[TextDocument]) -> list[str]:
    """Every line of every document, as TextLineDataset would read them."""
    lines = []
    for d in docs:
        lines.extend(line.rstrip("\r") for line in d.text.split("\n"))
    return lines


def held_out(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """The validation split of n documents (or lines): the sorted indices of
    round(val_fraction * n) of them, at least one when val_fraction > 0,
    chosen by the seed. Leaving none for training is an error."""
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise UserError(f"--val-fraction {val_fraction} leaves no training data ({n} documents)")
    return np.sort(np.random.default_rng(seed).permutation(n)[:n_val])


def split_by_share(lines: int, text_lines: int, val_fraction: float) -> bool:
    """Whether a single document's validation split is the last val_fraction
    of its bytes (`share_offset`) rather than `held_out` lines: when holding
    out lines would leave no training data, or when at most one line holds
    text (a corpus that is one long line). Everywhere else the lines are
    held out, as they always were."""
    if val_fraction <= 0:
        return False
    n_val = max(1, int(round(val_fraction * lines)))
    return n_val >= lines or text_lines <= 1


def share_offset(total_bytes: int, val_fraction: float) -> int:
    """The byte offset from which the last val_fraction of a document of
    total_bytes is held out (at least one byte on each side); the split
    itself is at the first safe place from there (`sources.split_place`)."""
    if total_bytes < 2:
        raise UserError(f"--val-fraction {val_fraction} leaves no training data (a document of {total_bytes} bytes)")
    return min(max(1, int(round((1.0 - val_fraction) * total_bytes))), total_bytes - 1)


def split_text(data: bytes, val_fraction: float) -> tuple[bytes, bytes]:
    """A document's bytes split by share: (training part, validation part),
    cut at `sources.split_place` (a "\\n" there is left out), as the token
    store splits it while streaming."""
    cut = sources.split_place(data, share_offset(len(data), val_fraction))
    head = data[: cut - 1] if cut and data[cut - 1 : cut] == b"\n" else data[:cut]
    return head, data[cut:]


def train_val_split(docs: list[TextDocument], val_fraction: float, seed: int):
    """Holds out a deterministic fraction of the documents (of the lines, when
    the corpus is a single document: `held_out`; of its bytes, the last
    share, when `split_by_share` says so). Returns (train_lines, val_lines)."""
    if len(docs) == 1:
        text = docs[0].text
        raw = text.split("\n")
        if split_by_share(len(raw), sum(1 for line in raw if line), val_fraction):
            parts = split_text(text.encode("utf-8"), val_fraction)
            head, tail = (split_lines([TextDocument("", p.decode("utf-8"))]) for p in parts)
            return head, tail
        docs = [TextDocument(f"{docs[0].name}:{i}", line) for i, line in enumerate(split_lines(docs))]
    val_ids = set(held_out(len(docs), val_fraction, seed).tolist())
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return split_lines(train), split_lines(val)
