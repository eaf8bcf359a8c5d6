"""What `--data` names, read as a stream.

A `--data` string is one path, or several separated by os.pathsep (":"), each
of which may be a glob. Every path is a folder (its .txt and .txt.gz files,
searched recursively, or the IMDB reviews when it has that layout), a tar
archive (the same choice among its members), a gzip-compressed text file or a
plain text file. The paths' documents follow one another in the order the
paths are given (a glob's matches sorted); each path's documents are sorted
by name, as `corpus.read_corpus` returns them.

Nothing here holds the text: documents are listed (name and where the bytes
are) and then read as segments of about a block (`segments`): at line ends,
and within a line longer than a block at a space between two words, so
memory is bounded by the block, not by the corpus or its longest line. A tar archive cannot be read out of order
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

import numpy as np

from tfgpt.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"

IMDB_SPLITS = ("train/pos", "train/neg", "test/pos", "test/neg")


def is_text_name(name: str) -> bool:
    """Whether a file or archive member is read as text: .txt or .txt.gz."""
    return name.endswith(".txt") or name.endswith(".txt.gz")


def no_text_files(path) -> str:
    """The error for a folder or archive without .txt files, saying how
    other files are read."""
    return (
        f"--data {path}: no .txt files found (a folder or archive gives its .txt and .txt.gz files); "
        f"to read other files, name them with a glob, e.g. --data '{path}/**/*.py'"
    )


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
                raise UserError(no_text_files(path))
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
                raise UserError(no_text_files(path))
        elif kind == "tar":
            if spool_dir is None:
                raise ValueError("reading an archive needs a spool directory")
            found = spool_archive(path, unsup, spool_dir / f"spool-{i}", on_read)
            if not found:
                raise UserError(no_text_files(path))
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


LINE, OPEN, SPLIT = "line", "open", "split"  # how a segment ends (`segments`)

SPLIT_WINDOW = 1 << 20  # bytes searched for a safe place after a split offset (`split_place`)
_CUT_SEARCH = 1 << 16  # bytes searched back for a safe space when a long line is cut
_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")


def _space_char(buf: bytes, lo: int, hi: int) -> bool:
    """Whether buf[lo:hi], one UTF-8 character, is whitespace (Python's
    `str.isspace`, which holds every Unicode White_Space character)."""
    if hi - lo == 1 and buf[lo] < 0x80:
        return buf[lo] in _ASCII_SPACE
    try:
        return buf[lo:hi].decode("utf-8").isspace()
    except UnicodeDecodeError:
        return False  # an undecodable byte becomes U+FFFD, not a space


def _char_start(buf: bytes, i: int) -> int:
    """The start of the UTF-8 character whose last byte is buf[i]."""
    lo = i
    while lo > max(0, i - 3) and buf[lo] & 0xC0 == 0x80:
        lo -= 1
    return lo


def _char_end(buf: bytes, i: int) -> int:
    """The end of the UTF-8 character that starts at buf[i]."""
    b, hi = buf[i], i + 1
    width = 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
    while hi < min(len(buf), i + width) and buf[hi] & 0xC0 == 0x80:
        hi += 1
    return hi


def safe_space(buf: bytes, j: int) -> bool:
    """Whether text may be cut before the space buf[j] without changing its
    tokens: a single " " between two characters that are not whitespace
    (a pre-token boundary of both tokenizers), and not the space of
    "<br />", which the word standardization removes as a whole."""
    if j < 1 or j + 1 >= len(buf) or buf[j] != 0x20:
        return False
    if _space_char(buf, _char_start(buf, j - 1), j) or _space_char(buf, j + 1, _char_end(buf, j + 1)):
        return False
    return not (buf[j + 1 : j + 3] == b"/>" and buf[max(0, j - 3) : j].lower() == b"<br")


def _char_boundary(buf: bytes, i: int) -> int:
    """The first UTF-8 character boundary at or after i (len(buf) at most)."""
    i = min(i, len(buf))
    stop = min(len(buf), i + 3)
    while i < stop and buf[i] & 0xC0 == 0x80:
        i += 1
    return i


def line_cut(buf: bytes, force: bool) -> int | None:
    """Where a line longer than a block is cut (0 < cut < len(buf)): before
    the last safe space (`safe_space`) among the buffer's last 64 KiB, so the
    pieces' tokens are the line's. Without one, None (the caller reads on)
    unless `force`: then a run without such a space (a long word, a run of
    several spaces) is cut at a UTF-8 character boundary, and a word there
    becomes two tokens: the price of bounded memory."""
    end = len(buf) - 8  # the character after a space is wholly in buf
    floor = max(0, end - _CUT_SEARCH)
    j = buf.rfind(b" ", floor, end)
    while j > 0:
        if safe_space(buf, j):
            return j
        j = buf.rfind(b" ", floor, j)
    if not force:
        return None
    cut = _char_start(buf, end) if end > 0 else len(buf) // 2
    return cut if cut > 0 else max(1, end)


def split_place(buf: bytes, at: int) -> int:
    """Where a document split at byte `at` is cut: the first safe place in
    [at, at + SPLIT_WINDOW): just after a "\\n" or before a safe space,
    whichever comes first; else the first UTF-8 character boundary at or
    after `at`. The part before ends there (without the "\\n" at its end,
    if any); the other part begins there."""
    if at >= len(buf):
        return len(buf)
    lim = min(len(buf), at + SPLIT_WINDOW)
    nl = buf.find(b"\n", at, lim)
    bound = nl if nl >= 0 else lim
    j = buf.find(b" ", at, bound)
    while j >= 0:
        if safe_space(buf, j):
            return j
        j = buf.find(b" ", j + 1, bound)
    return nl + 1 if nl >= 0 else _char_boundary(buf, at)


def _line_pieces(buf: bytes, last_end: str):
    """buf (the end of a document or of its training part) as segments:
    the lines up to its last "\\n", then the rest ending as last_end."""
    cut = buf.rfind(b"\n")
    if cut >= 0:
        yield buf[:cut], LINE
        buf = buf[cut + 1 :]
    yield buf, last_end


def segments(
    doc: Document,
    block: int = 1 << 20,
    on_read=lambda n: None,
    spools: dict | None = None,
    split_at: int | None = None,
):
    """The document's bytes in segments of about a block or less, read as a
    stream: memory is bounded by the block, whatever the length of a line.

    Yields (segment, was_valid_utf8, end). The segments' lines (split at
    "\\n") are the document's lines, in order; end says how the segment's
    last line goes on: LINE: it ends there (the "\\n" after it is left out;
    the document's last segment ends LINE too); OPEN: a line longer than the
    block was cut (`line_cut`) and goes on at the start of the next segment
    (nothing is left out); SPLIT: the document is split there
    (`split_place` of byte offset split_at): the segment ends its first
    part, the next segments are the rest. Undecodable UTF-8 becomes U+FFFD,
    as `bytes.decode(errors="replace")` of the whole file would make it
    (cuts are at "\\n", at a space or at a character boundary, where no
    valid sequence is split). `spools` (path -> descriptor) lets the
    documents of a spool share one open file."""
    f, left = _open(doc, on_read, spools)
    counted = doc.kind in ("plain", "spool")
    rest, pos, eof = b"", 0, False
    try:
        while True:
            data = b""
            if left != 0:
                data = _read(f, block if left < 0 else min(block, left), doc)
            if not data:
                eof = True
            else:
                if counted:
                    on_read(len(data))
                if left > 0:
                    left -= len(data)
            buf = rest + data if rest else data
            if split_at is not None and (eof or pos + len(buf) >= split_at):
                at = split_at - pos
                if not eof and len(buf) < at + SPLIT_WINDOW + 8:
                    rest = buf  # the search needs the window after the split
                    continue
                c = split_place(buf, at)
                head = buf[: c - 1] if c and buf[c - 1] == 0x0A else buf[:c]
                for piece, end in _line_pieces(head, SPLIT):
                    yield (*_valid(piece), end)
                buf, pos, split_at = buf[c:], pos + c, None
            if eof:
                for piece, end in _line_pieces(buf, LINE):
                    yield (*_valid(piece), end)
                return
            cut = buf.rfind(b"\n")
            if cut >= 0:
                yield (*_valid(buf[:cut]), LINE)
                rest, pos = buf[cut + 1 :], pos + cut + 1
            elif len(buf) >= max(block, 16) and (cut := line_cut(buf, len(buf) >= block + _CUT_SEARCH)):
                yield (*_valid(buf[:cut]), OPEN)
                rest, pos = buf[cut:], pos + cut
            else:
                rest = buf
    finally:
        f.close()


def pieces(doc: Document, block: int = 1 << 20, on_read=lambda n: None, spools: dict | None = None):
    """The document as line-aligned pieces: (piece, was_valid_utf8), the
    pieces' lines being the document's lines (`segments` joined back into
    whole lines, so memory grows with the longest line)."""
    open_parts, valid = [], True
    for piece, ok, end in segments(doc, block, on_read, spools):
        if end == OPEN:
            open_parts.append(piece)
            valid &= ok
            continue
        if open_parts:
            piece, ok = b"".join(open_parts) + piece, ok and valid
            open_parts, valid = [], True
        yield piece, ok


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


@dataclasses.dataclass(frozen=True)
class Scan:
    """A document counted: its lines ("\\n" bytes plus one), how many of them
    hold at least one byte, and its bytes (decompressed)."""

    lines: int
    text_lines: int
    bytes: int


def scan(doc: Document, block: int = 8 << 20, on_read=lambda n: None) -> Scan:
    """Counts the document's lines, non-empty lines and bytes in one pass."""
    f, left = _open(doc, on_read)
    newlines = empty = total = 0
    after_newline = True  # the document's start is a line's start
    with f:
        while left != 0:
            data = _read(f, block if left < 0 else min(block, left), doc)
            if not data:
                break
            if doc.kind != "gzip":
                on_read(len(data))
            left -= len(data) if left > 0 else 0
            total += len(data)
            nl = np.frombuffer(data, np.uint8) == 0x0A
            newlines += int(np.count_nonzero(nl))
            # An empty line: a newline right after the previous one (or at the start).
            empty += int(np.count_nonzero(nl[1:] & nl[:-1])) + int(bool(nl[0]) and after_newline)
            after_newline = bool(nl[-1])
    empty += after_newline  # the last line, after the last newline, is empty
    return Scan(newlines + 1, newlines + 1 - empty, total)


def count_lines(doc: Document, block: int = 8 << 20, on_read=lambda n: None) -> int:
    """How many lines the document has: its "\\n" bytes plus one."""
    return scan(doc, block, on_read).lines
