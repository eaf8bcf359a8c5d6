"""What `--data` names, read as a stream.

A `--data` string is one path, or several separated by os.pathsep (":"), each
of which may be a glob. Every path is a folder (its .txt and .txt.gz files,
searched recursively, or the IMDB reviews when it has that layout), a tar
archive (the same choice among its members), a gzip-compressed text file or a
plain text file. The paths' documents follow one another in the order the
paths are given (a glob's matches sorted); each path's documents are sorted
by name, as `corpus.read_corpus` returns them.

Nothing here holds the text: documents are listed (name and where the bytes
are) and then read as line-aligned pieces, so memory is bounded by the
longest line, not by the corpus. A tar archive cannot be read out of order
without decompressing it again, so its members are first copied, in archive
order, into a spool file that is then read in name order.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

from tfgpt.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"

IMDB_SPLITS = ("train/pos", "train/neg", "test/pos", "test/neg")


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


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A file the corpus is read from; its identity for a store's cache key."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> InputFile:
        st = path.stat()
        return cls(str(path.resolve()), st.st_size, st.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class Document:
    """Where one document's bytes are: a plain file, a gzip file, or a span of
    a spool file (tar members)."""

    name: str
    path: str
    kind: str  # "plain" | "gzip" | "spool"
    offset: int = 0
    size: int = -1  # spool spans only


def expand(spec: str) -> list[Path]:
    """The input paths a `--data` string names, in order, without repeats."""
    spec = str(spec)
    if Path(spec).expanduser().exists():
        return [Path(spec).expanduser()]
    out: list[Path] = []
    for part in (p for p in spec.split(os.pathsep) if p):
        path = Path(part).expanduser()
        if path.exists():
            out.append(path)
        elif glob.has_magic(part):
            matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
            if not matches:
                raise UserError(f"--data {part}: the pattern matches no file")
            out.extend(Path(m) for m in matches)
        else:
            raise UserError(f"--data {part}: no such file or directory")
    if not out:
        raise UserError(f"--data {spec!r} names no path")
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def kind_of(path: Path) -> str:
    """folder | tar | gzip | plain."""
    if path.is_dir():
        return "folder"
    if tarfile.is_tarfile(path):
        return "tar"
    with open(path, "rb") as f:
        return "gzip" if f.read(2) == GZIP_MAGIC else "plain"


def folder_files(root: Path, unsup: bool) -> list[tuple[str, str, os.stat_result]]:
    """(name relative to root, path, stat) of the documents of a folder,
    sorted by name: its IMDB reviews when it has that layout, else every
    regular .txt and .txt.gz file (searched recursively)."""
    found, imdb = [], False
    for folder, _, names in os.walk(root, followlinks=True):
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        for name in names:
            if not is_text_name(name):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link
            if stat.S_ISREG(st.st_mode):
                kind = _imdb_member(prefix + name, unsup)
                imdb = imdb or kind is not None
                found.append((prefix + name, path, st, kind))
    if imdb:
        found = [f for f in found if f[3]]
    return sorted((f[:3] for f in found), key=lambda f: f[0])


def input_files(paths: list[Path], unsup: bool) -> list[InputFile]:
    """Every file the corpus is read from, with its size and modification
    time; a folder without text files is an error."""
    out = []
    for path in paths:
        if path.is_dir():
            files = folder_files(path, unsup)
            if not files:
                raise UserError(f"--data {path}: no .txt files found")
            root = str(path.resolve())
            out.extend(InputFile(f"{root}/{rel}", st.st_size, st.st_mtime_ns) for rel, _, st in files)
        else:
            out.append(InputFile.of(path))
    return out


def tar_members(path: Path, unsup: bool, fileobj=None):
    """Yields (name, bytes) of the text members of an archive that are read:
    the IMDB reviews if it has that layout, else every .txt (.txt.gz) member.
    The caller drops the non-IMDB members yielded before the first IMDB one:
    each item comes with its `_imdb_member` kind (None: not IMDB)."""
    imdb = False
    try:
        with tarfile.open(path, fileobj=fileobj, mode="r|*") as tar:  # a stream: read in order, once
            for member in tar:
                if not member.isfile() or not is_text_name(member.name):
                    continue
                kind = _imdb_member(member.name, unsup)
                if kind is None and imdb or kind is False:
                    continue
                imdb = imdb or kind is not None
                data = tar.extractfile(member).read()
                if member.name.endswith(".gz"):
                    data = gunzip(data, f"{path}:{member.name}")
                yield member.name, data, kind
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"--data {path}: cannot read the archive ({e})") from None


def keep_members(items):
    """The members read from a list of (name, ..., kind): only the IMDB ones
    when there is any."""
    if any(it[-1] is not None for it in items):
        return [it for it in items if it[-1]]
    return list(items)


def gunzip(data: bytes, name: str | Path) -> bytes:
    """The decompressed bytes of a gzip file's contents; a damaged one is an
    error naming it (`name`: its path, or archive:member)."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise UserError(f"--data {name}: not a readable gzip file ({e})") from None


class _Counting(io.RawIOBase):
    """A read-only file that counts the bytes read from it (progress of an
    archive read through tarfile or gzip)."""

    def __init__(self, f, on_read):
        self.f, self.on_read = f, on_read

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.on_read(n)
        return n


def spool_archive(path: Path, unsup: bool, spool: Path, on_read=lambda n: None) -> list[Document]:
    """Copies the archive's documents into the file `spool`, in archive order;
    returns them as spans of it, sorted by name."""
    docs = []
    with open(path, "rb") as raw, open(spool, "ab") as out:
        counted = io.BufferedReader(_Counting(raw, on_read), 1 << 20)
        for name, data, kind in tar_members(path, unsup, fileobj=counted):
            docs.append((name, out.tell(), len(data), kind))
            out.write(data)
    docs = keep_members(docs)
    return [Document(name, str(spool), "spool", off, size) for name, off, size, _ in sorted(docs, key=lambda d: d[0])]


def list_documents(
    paths: list[Path], unsup: bool, spool_dir: Path | None = None, on_read=lambda n: None
) -> list[Document]:
    """The documents of all paths, in order (archives are spooled into
    spool_dir)."""
    docs: list[Document] = []
    for i, path in enumerate(paths):
        kind = kind_of(path)
        if kind == "folder":
            found = [Document(r, p, "gzip" if p.endswith(".gz") else "plain") for r, p, _ in folder_files(path, unsup)]
            if not found:
                raise UserError(f"--data {path}: no .txt files found")
        elif kind == "tar":
            if spool_dir is None:
                raise ValueError("reading an archive needs a spool directory")
            found = spool_archive(path, unsup, spool_dir / f"spool-{i}", on_read)
            if not found:
                raise UserError(f"--data {path}: no .txt files found")
        else:
            found = [Document(path.name, str(path), kind)]
        docs.extend(found)
    return docs


class _Span(io.RawIOBase):
    """A span of a file read with positioned reads on a shared descriptor
    (the spool holds every member of an archive: one open for all)."""

    def __init__(self, fd: int, offset: int):
        self.fd, self.pos = fd, offset

    def readable(self):
        return True

    def read(self, n=-1):
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data


def _open(doc: Document, on_read, spools: dict | None = None):
    """A binary reader of the document's bytes, and how many there are (-1:
    to the end)."""
    if doc.kind == "spool":
        if spools is None:
            f = open(doc.path, "rb")
            f.seek(doc.offset)
            return f, doc.size
        if doc.path not in spools:
            spools[doc.path] = os.open(doc.path, os.O_RDONLY)
        return _Span(spools[doc.path], doc.offset), doc.size
    raw = open(doc.path, "rb")
    if doc.kind == "gzip":
        return _GzipText(raw, on_read), -1
    return raw, -1


class _GzipText(gzip.GzipFile):
    """A gzip file read through a counter of its compressed bytes (the
    progress); closing it closes the file."""

    def __init__(self, raw, on_read):
        super().__init__(fileobj=io.BufferedReader(_Counting(raw, on_read), 1 << 20))
        self._raw = raw

    def close(self):
        try:
            super().close()
        finally:
            self._raw.close()


def pieces(doc: Document, block: int = 1 << 20, on_read=lambda n: None, spools: dict | None = None):
    """The document's bytes in pieces that end at line ends: the document's
    lines (its text split at "\\n") are the pieces' lines, one piece after the
    other. The newline at each cut is left out. Undecodable UTF-8 becomes
    U+FFFD, as `bytes.decode(errors="replace")` of the whole file would make
    it (a "\\n" byte is never inside a UTF-8 sequence, so cutting there changes
    nothing). Yields (piece, was_valid_utf8). `spools` (path -> descriptor)
    lets the documents of a spool share one open file."""
    f, left = _open(doc, on_read, spools)
    plain = doc.kind == "plain"
    try:
        rest = b""
        while left != 0:
            data = _read(f, block if left < 0 else min(block, left), doc)
            if not data:
                break
            if plain or doc.kind == "spool":
                on_read(len(data))
            if left > 0:
                left -= len(data)
            buf = rest + data if rest else data
            cut = buf.rfind(b"\n")
            if cut < 0:
                rest = buf
                continue
            yield _valid(buf[:cut])
            rest = buf[cut + 1 :]
        yield _valid(rest)
    finally:
        f.close()


def _read(f, n: int, doc: Document) -> bytes:
    try:
        return f.read(n)
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip file, an I/O error
        raise UserError(f"--data {doc.path}: cannot read {doc.name} ({e})") from None


def _valid(piece: bytes) -> tuple[bytes, bool]:
    try:
        piece.decode("utf-8")
        return piece, True
    except UnicodeDecodeError:
        return piece.decode("utf-8", errors="replace").encode("utf-8"), False


def count_lines(doc: Document, block: int = 8 << 20, on_read=lambda n: None) -> int:
    """How many lines the document has: its "\\n" bytes plus one."""
    f, left = _open(doc, on_read)
    newlines = 0
    with f:
        while left != 0:
            data = _read(f, block if left < 0 else min(block, left), doc)
            if not data:
                break
            if doc.kind != "gzip":
                on_read(len(data))
            left -= len(data) if left > 0 else 0
            newlines += data.count(b"\n")
    return newlines + 1
