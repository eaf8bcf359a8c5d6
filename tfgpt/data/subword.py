"""Byte-level BPE subwords: training and fast encoding with the `tokenizers`
package, and the same encoding in the TensorFlow graph (`SubwordTokenizer`).

A text becomes tokens in two steps, identical on both sides:

1. Pre-tokenization cuts the text into pre-tokens by character classes
   (`PRETOKENIZE`, defined once here): a "\\n" is a pre-token of its own; a
   run of characters of one class is a pre-token, at most `max_run`
   characters of the class long; a single space " " that follows a character
   outside the "space" class (or begins the text) and precedes a "letter",
   "digit" or "other" character begins the pre-token of that character's run
   (" world"). Classes go by codepoint ranges, not Unicode properties, so
   that the implementations (a regular expression made from PRETOKENIZE
   for `tokenizers`' Oniguruma, and codepoint arithmetic in TensorFlow) agree on any text whatever Unicode
   version each one knows.
2. Each pre-token's UTF-8 bytes start as one token per byte (every byte is
   in the vocabulary, so nothing is unknown); then the adjacent pair with
   the lowest merge rank is merged, all its non-overlapping occurrences from
   left to right, until no pair of the pre-token has a merge.

Id 0 is reserved (padding, the end of a document) and never produced by
encoding. Decoding joins the tokens' bytes and replaces invalid UTF-8 with
U+FFFD, so decode(encode(text)) == text for any valid text.

Invalid UTF-8 input: the offline side receives `str`s, decoded with
`errors="replace"`; the graph side first transcodes with ICU's replacement.
Both replace each maximal ill-formed subpart by one U+FFFD (the practice the
Unicode standard recommends), so they see the same characters.

`tokenizers` encodes batches on all cores unless TOKENIZERS_PARALLELISM says
otherwise; the setting is left to the user. (Left unset, a process forked
after a parallel encoding encodes on one thread, to avoid deadlocks, and
`tokenizers` prints a note saying so.)
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.config import write_text_atomic
from tfgpt.data import pieces
from tfgpt.errors import UserError

SUBWORD_FILE = "subword.json"
FORMAT = "tfgpt-subword"
VERSION = 1

# The token of id 0 (padding / end of a document). Encoding never yields
# it: it is not registered as a special token, so the text "<|pad|>" is
# encoded as ordinary bytes.
PAD_TOKEN = "<|pad|>"

# The most text a vocabulary is learned from: a larger training part gives
# an evenly spread sample of this size (tfgpt/data/store_build.py). Learning
# takes time in proportion to the text, and a larger sample hardly changes
# how many tokens text takes (docs/performance.md, "subword preparation at
# 0.5 GB").
TRAIN_SAMPLE_BYTES = 8 << 20

# encode_text forgets the pieces it remembers (about 200 bytes each) when
# they are more than this before a text.
CACHE_WORDS = 1_000_000
# The entry always in encode_text's cache: an empty text.
_EMPTY = 0

# The pre-tokenization rule. "ascii" gives the codepoint ranges (inclusive)
# of the ASCII characters in each class; every codepoint from 0x80 on is in
# class "non_ascii". A space joins the run that follows it when that run's
# class is in "space_joins" and the character before the space is not in
# class "space_class"; "alone" classes are one character per pre-token.
PRETOKENIZE = {
    "ascii": {
        "letter": [[0x41, 0x5A], [0x61, 0x7A]],
        "digit": [[0x30, 0x39]],
        "space": [[0x09, 0x09], [0x0B, 0x0D], [0x20, 0x20]],
        "newline": [[0x0A, 0x0A]],
        "other": [[0x00, 0x08], [0x0E, 0x1F], [0x21, 0x2F], [0x3A, 0x40], [0x5B, 0x60], [0x7B, 0x7F]],
    },
    "non_ascii": "letter",
    "space_class": "space",
    "space_joins": ["letter", "digit", "other"],
    "alone": ["newline"],
    "max_run": 64,
}

# The whitespace of the cut rule: a cut of a line before a " " whose
# neighbours are both outside WHITESPACE is a pre-token boundary ("a| b"),
# so the pieces' tokens concatenate to the line's tokens.
WHITESPACE = "".join(
    chr(c) for name in ("space", "newline") for lo, hi in PRETOKENIZE["ascii"][name] for c in range(lo, hi + 1)
)

_CLASS_NAMES = list(PRETOKENIZE["ascii"])  # class id = index


def _check_rule() -> None:
    """Every ASCII codepoint is in exactly one class (a broken table would make
    the encoders disagree silently), and a single space before any character
    other than whitespace begins a pre-token."""
    joined = {PRETOKENIZE["space_class"], "newline", *PRETOKENIZE["space_joins"]}
    if set(PRETOKENIZE["ascii"]) != joined or PRETOKENIZE["alone"] != ["newline"]:
        raise ValueError("every class but space and newline must join a space before it (cuts at spaces rely on it)")
    seen = [c for ranges in PRETOKENIZE["ascii"].values() for lo, hi in ranges for c in range(lo, hi + 1)]
    if sorted(seen) != list(range(128)):
        raise ValueError("PRETOKENIZE's ASCII classes must cover each of 0..127 exactly once")


_check_rule()


def ascii_classes() -> np.ndarray:
    """int32 [128]: the class id of each ASCII codepoint."""
    table = np.zeros([128], np.int32)
    for k, name in enumerate(_CLASS_NAMES):
        for lo, hi in PRETOKENIZE["ascii"][name]:
            table[lo : hi + 1] = k
    return table


def _regex_class(name: str) -> str:
    """The character class of a class name, as `[...]` in Oniguruma's syntax
    (the `tokenizers` package's regular expressions)."""
    ranges = list(PRETOKENIZE["ascii"][name])
    if PRETOKENIZE["non_ascii"] == name:
        ranges.append([0x80, 0x10FFFF])
    char = lambda c: f"\\x{{{c:X}}}"  # noqa: E731
    return "[" + "".join(char(lo) + (f"-{char(hi)}" if hi > lo else "") for lo, hi in ranges) + "]"


def pretokenize_regex() -> str:
    """PRETOKENIZE as one regular expression whose successive matches are the
    pre-tokens (every character matches some alternative; the first
    characters of the alternatives differ, except that a joining space is
    tried before the run of spaces)."""
    n = PRETOKENIZE["max_run"]
    space = _regex_class(PRETOKENIZE["space_class"])
    alts = []
    for name in PRETOKENIZE["space_joins"]:
        run = f"{_regex_class(name)}{{1,{n}}}"
        alts += [f"(?<!{space}) {run}", run]
    alts += [_regex_class(name) for name in PRETOKENIZE["alone"]]
    alts += [f"{_regex_class(name)}{{1,{n}}}" for name in _CLASS_NAMES if _is_run(name)]
    return "|".join(alts)


def _is_run(name: str) -> bool:
    """Classes that form plain runs (neither alone nor joined by a space)."""
    return name not in PRETOKENIZE["alone"] and name not in PRETOKENIZE["space_joins"]


def byte_chars() -> list[str]:
    """The byte-level alphabet: byte b -> one printable character. Bytes that
    are printable Latin-1 characters stand for themselves; the others, in
    increasing order, take the characters from U+0100 on (the mapping the
    `tokenizers` ByteLevel pre-tokenizer uses)."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + extra))
            extra += 1
    return chars


def _tokenizers():
    """The `tokenizers` package (imported lazily, not at the top: the graph
    side, `SubwordTokenizer`, needs only TensorFlow)."""
    import tokenizers  # lazy: TensorFlow-only users of this module never load it

    return tokenizers


def _pipeline(model):
    """A `tokenizers.Tokenizer` around a BPE model with PRETOKENIZE and the
    byte-level mapping and decoder."""
    tk = _tokenizers()
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(pretokenize_regex()), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def train_subword(texts: Iterable[str], vocab_size: int, on_text: Callable[[str], None] | None = None) -> SubwordVocab:
    """Trains a byte-level BPE vocabulary of at most vocab_size tokens (id 0,
    the 256 bytes, then merges) on texts, read once as a stream; memory grows
    with the distinct pre-tokens, not with the text. on_text(text) is called
    for each text as it is read (for progress)."""
    vocab_size = int(vocab_size)
    if vocab_size < 257:
        raise UserError(
            f"--vocab-size {vocab_size} is too small for subwords: it needs at least 257 (the 256 bytes and id 0)"
        )
    tk = _tokenizers()
    tok = _pipeline(tk.models.BPE())
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )

    def stream():
        for text in texts:
            if on_text is not None:
                on_text(text)
            yield text

    tok.train_from_iterator(stream(), trainer)
    model = json.loads(tok.to_str())["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    index = {t: i for i, t in enumerate(tokens)}
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    return SubwordVocab(tokens, [[index[a], index[b]] for a, b in merges])


def _gather(ids: np.ndarray, offsets: np.ndarray, lens: np.ndarray, entry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids of entries entry[0], entry[1], ... concatenated (entry e's
    ids: ids[offsets[e] : offsets[e] + lens[e]]) -> (int32 ids, the output
    position where each entry's ids end)."""
    n = lens[entry]
    ends = np.cumsum(n)
    # Output position j reads entry e's ids at offsets[e] plus j minus the
    # position where e's ids begin in the output.
    at = np.repeat(offsets[entry] - (ends - n), n) + np.arange(int(ends[-1]) if ends.size else 0)
    return ids[at].astype(np.int32, copy=False), ends


class SubwordVocab:
    """A trained subword vocabulary: tokens (byte-level strings, index = id,
    id 0 the padding token) and merges (pairs of ids, in rank order), with
    the offline encoder and decoder."""

    def __init__(self, tokens: list[str], merges: list[list[int]]):
        self.tokens = list(tokens)
        self.merges = [[int(a), int(b)] for a, b in merges]
        _validate(self.tokens, self.merges)
        chars = byte_chars()
        to_byte = {c: b for b, c in enumerate(chars)}
        # The bytes of each token (id 0: none).
        self.token_bytes = [b""] + [bytes(to_byte[c] for c in t) for t in self.tokens[1:]]
        index = {t: i for i, t in enumerate(self.tokens)}
        self.byte_ids = [index[c] for c in chars]  # byte -> its token id
        self.merged_ids = [index[self.tokens[a] + self.tokens[b]] for a, b in self.merges]  # rank -> id
        self.newline_id = self.byte_ids[ord("\n")]
        self._tok = None
        self._lock = threading.Lock()
        self._clear_cache()

    @property
    def size(self) -> int:
        """Number of ids (the model's vocabulary size)."""
        return len(self.tokens)

    def _encoder(self):
        """The `tokenizers` pipeline, built on first use. Options that would
        change BPE's result are pinned: no dropout, merges always applied
        (ignore_merges=False), no unknown token, no prefixes or suffixes."""
        if self._tok is None:
            tk = _tokenizers()
            model = tk.models.BPE(
                vocab={t: i for i, t in enumerate(self.tokens)},
                merges=[(self.tokens[a], self.tokens[b]) for a, b in self.merges],
                cache_capacity=100_000,
                dropout=None,
                unk_token=None,
                fuse_unk=False,
                byte_fallback=False,
                ignore_merges=False,
            )
            self._tok = _pipeline(model)
        return self._tok

    def encode(self, text: str) -> list[int]:
        """The ids of text (a str; decode bytes with errors="replace" first)."""
        return self._encoder().encode(text, add_special_tokens=False).ids

    def encode_lines(self, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encodes lines -> (flat int32 ids, int64 number of ids per line). A
        line's "\\n", if any, is encoded like any character; callers pass lines
        without it. The same ids as `encode` line by line, faster
        (`encode_text`)."""
        if not lines:
            return np.zeros([0], np.int32), np.zeros([0], np.int64)
        text = "\n".join(lines)
        if text.count("\n") == len(lines) - 1:
            return self.encode_text(text)
        # Some line holds a "\n": encode line by line, its rows joined by the newline's id.
        parts = [self.encode_text(line) for line in lines]
        ids = [np.insert(i, np.cumsum(n)[:-1], self.newline_id) for i, n in parts]
        lengths = np.asarray([n.sum() + len(n) - 1 for _, n in parts], np.int64)
        return np.concatenate(ids).astype(np.int32, copy=False), lengths

    def encode_text(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
        """Encodes the rows of text (its "\\n"-separated lines, the "\\n"s
        left out; bytes must be UTF-8) -> (flat int32 ids, int64 number of
        ids per row): the ids of `encode` row by row.

        Fast in Python: the text is cut at every space and "\\n" into pieces,
        each distinct piece is encoded once (by `tokenizers`, then
        remembered) with the space before it, and all the pieces of the text
        are looked up at once (`PieceTable`; pieces longer than its keys in a
        dict). A cut before a " " whose neighbours are both outside
        WHITESPACE is a pre-token boundary, so such pieces' ids concatenate
        to the row's; pieces on either side of any other space (runs of
        spaces, a space next to a tab or at the end of a row) are joined and
        encoded together. The ids are gathered with NumPy. Calls from several
        threads run one at a time (they share the memory of pieces)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        with self._lock:
            return self._encode_bytes(data)

    def _encode_bytes(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        if self._lens.size > CACHE_WORDS:
            self._clear_cache()
        buf = pieces.padded(data)
        text = buf[: len(data)]
        cuts = np.flatnonzero((text == 0x20) | (text == 0x0A))  # [C] the spaces and "\n"s
        row_end = text[cuts] == 0x0A  # [C] the cut ends a row
        ends = np.append(cuts, len(data))  # [P = C + 1] where each piece ends
        # A piece's text begins with the space before it, except a row's first piece.
        starts = np.concatenate([[0], cuts + row_end])  # [P]
        entry = self._entries(data, buf, starts, ends - starts)  # [P]
        # A space between two pieces is a pre-token boundary unless either
        # side of it is whitespace (or the piece is empty).
        join = ~row_end & (self._bad_end[entry[:-1]] | self._bad_start[entry[1:]])  # [C]
        if join.any():
            self._join_pieces(data, buf, entry, starts, ends, join)
        ids, out_ends = _gather(self._ids, self._offsets, self._lens, entry)
        row_ends = np.concatenate([[0], out_ends[:-1][row_end], [ids.size]])
        return ids, np.diff(row_ends)

    def _entries(self, data: bytes, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The cache entries of the texts data[starts[i] : starts[i] +
        lengths[i]] (buf: data, `pieces.padded`), encoding the ones not
        remembered yet."""
        entry = np.full(starts.size, -1, np.int64)
        short = np.flatnonzero(lengths <= pieces.MAX_BYTES)
        entry[short] = self._table.find(*pieces.pack(buf, starts[short], lengths[short]))
        missing = np.flatnonzero(entry < 0)
        if missing.size:
            at = starts[missing].tolist()
            texts = [data[a:b] for a, b in zip(at, (starts[missing] + lengths[missing]).tolist())]
            long = self._long  # the long texts remembered (new ones are added to it)
            new = list(dict.fromkeys(t for t in texts if t not in long))
            fresh = self._remember(new) if new else {}
            entry[missing] = [fresh[t] if t in fresh else long[t] for t in texts]
        return entry

    def _join_pieces(self, data, buf, entry: np.ndarray, starts, ends, join: np.ndarray) -> None:
        """Joins the pieces on both sides of each cut where join is set (cut
        i lies between pieces i and i + 1) into one text, encoded whole; its
        entry goes to its first piece, its other pieces get the empty entry."""
        head = np.concatenate([[True], ~join])  # [P] the piece begins a text
        first = np.flatnonzero(head)  # [G]
        last = np.append(first[1:], head.size) - 1  # [G]
        many = last > first
        a, z = first[many], last[many]
        entry[a] = self._entries(data, buf, starts[a], ends[z] - starts[a])
        entry[~head] = _EMPTY

    def _remember(self, texts: list[bytes]) -> dict[bytes, int]:
        """Encodes texts (distinct, none holding "\\n", none remembered yet)
        and adds them to the cache -> {text: its entry}. They are encoded
        joined by "\\n" in a few long texts (one `tokenizers` result per
        text rather than per piece): "\\n" is a pre-token of its own and the
        only one holding that byte, so its id marks where each text's ids end."""
        strings = [t.decode("utf-8") for t in texts]
        tok = self._encoder()
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        groups = np.array_split(np.arange(len(strings)), min(len(strings), 64))
        joined = ["".join(strings[i] + "\n" for i in g.tolist()) for g in groups]
        flat = np.concatenate([np.asarray(e.ids, np.int32) for e in batch(joined, add_special_tokens=False)])
        ends = np.flatnonzero(flat == self.newline_id)  # [W] the separator after each text
        lens = np.diff(np.concatenate([[-1], ends])) - 1  # [W]
        first = self._lens.size
        self._add(flat[flat != self.newline_id], lens, strings)
        entries = dict(zip(texts, range(first, first + len(texts))))
        short = [t for t in texts if len(t) <= pieces.MAX_BYTES]
        if short:
            self._table.insert(*pieces.pack_strings(short), [entries[t] for t in short])
        self._long.update((t, e) for t, e in entries.items() if len(t) > pieces.MAX_BYTES)
        return entries

    def _add(self, ids: np.ndarray, lens: np.ndarray, texts: list[str]) -> None:
        """Appends entries (their ids, concatenated, and the texts they
        encode, for the whitespace flags)."""
        self._offsets = np.concatenate([self._offsets, self._ids.size + np.cumsum(lens) - lens])
        self._lens = np.concatenate([self._lens, lens])
        self._ids = np.concatenate([self._ids, ids])
        ws = WHITESPACE
        # A text that begins (ends) with whitespace, or is empty, cannot stand
        # next to a space that is a boundary. (Only a spaced piece begins with
        # a space it owns; a row's first piece has no space before it.)
        start = [not t or (t[0] in ws and not (len(t) > 1 and t[0] == " " and t[1] not in ws)) for t in texts]
        end = [not t or t[-1] in ws for t in texts]
        self._bad_start = np.concatenate([self._bad_start, np.asarray(start, bool)])
        self._bad_end = np.concatenate([self._bad_end, np.asarray(end, bool)])

    def _clear_cache(self) -> None:
        """Empties the piece cache of encode_text: entry e's ids are
        _ids[_offsets[e] : _offsets[e] + _lens[e]]; _table (short texts) and
        _long (the others) map a text's UTF-8 bytes to its entry. Entry
        _EMPTY, an empty text (a row's empty first piece, or a piece joined
        into the one before it), is always there, with no ids and no
        whitespace flags."""
        self._ids = np.zeros([0], np.int32)
        self._offsets, self._lens = np.zeros([0], np.int64), np.zeros([0], np.int64)
        self._bad_start, self._bad_end = np.zeros([0], bool), np.zeros([0], bool)
        self._add(np.zeros([0], np.int32), np.zeros([1], np.int64), ["x"])  # no whitespace flags
        self._table = pieces.PieceTable()
        self._table.insert(*pieces.pack_strings([b""]), [_EMPTY])
        self._long: dict[bytes, int] = {}

    def decode(self, ids) -> str:
        """The text of ids: their bytes joined (id 0 dropped), invalid UTF-8
        replaced by U+FFFD."""
        tb = self.token_bytes
        return b"".join(tb[i] for i in np.asarray(ids, np.int64).reshape([-1]).tolist()).decode(
            "utf-8", errors="replace"
        )

    def _payload(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "pretokenize": PRETOKENIZE,
            "tokens": self.tokens,
            "merges": self.merges,
        }

    def digest(self) -> str:
        """A stable hash of the tokens, merges and pre-tokenization rule."""
        text = json.dumps(self._payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()

    def save(self, path: str | Path) -> None:
        """Writes the vocabulary as one JSON file (replaced whole)."""
        write_text_atomic(path, json.dumps(self._payload(), ensure_ascii=False, indent=None) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SubwordVocab:
        """Reads a file written by `save`; a missing, corrupt or foreign file,
        or one written with another pre-tokenization rule, is a UserError."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"cannot read the subword vocabulary {path}: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is not a subword vocabulary (not JSON)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f'{path} is not a subword vocabulary (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise UserError(f"{path} is a subword vocabulary of version {data.get('version')!r}, not {VERSION}")
        if data.get("pretokenize") != PRETOKENIZE:
            raise UserError(f"{path} was made with another pre-tokenization rule than this tfgpt's")
        try:
            return cls(data["tokens"], data["merges"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is a corrupt subword vocabulary: {e}") from None


def _validate(tokens, merges) -> None:
    """Raises ValueError unless tokens and merges form a byte-level BPE
    vocabulary: distinct strings, id 0 the padding token, every byte
    character present, each token built of byte characters, each merge of
    two existing ids whose joined token is in the vocabulary."""
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError("tokens must be a list of non-empty strings")
    if not tokens or tokens[0] != PAD_TOKEN:
        raise ValueError(f"id 0 must be {PAD_TOKEN!r}")
    if len(set(tokens)) != len(tokens):
        raise ValueError("tokens repeat")
    alphabet = set(byte_chars())
    if not alphabet <= set(tokens):
        raise ValueError("some of the 256 byte tokens are missing")
    if not all(set(t) <= alphabet for t in tokens[1:]):
        raise ValueError("a token holds a character outside the byte alphabet")
    if len({tuple(m) for m in merges}) != len(merges):
        raise ValueError("merges repeat")
    index = {t: i for i, t in enumerate(tokens)}
    for m in merges:
        if len(m) != 2 or not all(0 < i < len(tokens) for i in m):
            raise ValueError(f"merge {m} does not name two token ids")
        if tokens[m[0]] + tokens[m[1]] not in index:
            raise ValueError(f"merge {m}'s result is not a token")


class SubwordTokenizer(tf.Module):
    """Text <-> subword ids in the TensorFlow graph, with core ops only; the
    result equals `SubwordVocab.encode` token for token.

    The vocabulary is held as constants (and the JSON file as an asset), so
    a SavedModel holding a SubwordTokenizer loads in a process that has only
    TensorFlow, TensorFlow Serving included. Tables are created here, not in
    a tf.function."""

    def __init__(self, path: str | Path, name="subword_tokenizer"):
        super().__init__(name=name)
        vocab = SubwordVocab.load(path)
        self.vocab_file = tf.saved_model.Asset(str(path))
        self.size = vocab.size
        self.max_run = PRETOKENIZE["max_run"]
        cls_id = {name: k for k, name in enumerate(_CLASS_NAMES)}
        self._non_ascii = cls_id[PRETOKENIZE["non_ascii"]]
        self._space = cls_id[PRETOKENIZE["space_class"]]
        self._joins = [cls_id[n] for n in PRETOKENIZE["space_joins"]]
        self._alone = [cls_id[n] for n in PRETOKENIZE["alone"]]
        self.ascii_class = tf.constant(ascii_classes())  # [128]
        self.byte_ids = tf.constant(vocab.byte_ids, tf.int32)  # [256]
        self.merged_ids = tf.constant(vocab.merged_ids + [0], tf.int32)  # [R + 1], rank -> id
        self.no_rank = len(vocab.merges)
        keys = [a * vocab.size + b for a, b in vocab.merges]
        self.ranks = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, tf.int64, shape=[len(keys)]),
                tf.range(len(keys), dtype=tf.int32),
            ),
            default_value=self.no_rank,
        )
        self.token_bytes = tf.constant(vocab.token_bytes, tf.string)  # [V]

    def __call__(self, text):
        """string [N] -> ragged int32 [N, None]."""
        text = tf.convert_to_tensor(text, tf.string)
        text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
        cps = tf.strings.unicode_decode(text, "UTF-8")  # [N, None] codepoints
        nrows = tf.shape(text, out_type=tf.int64)[0]
        chars = cps.flat_values  # [C]
        char_rows = cps.value_rowids()  # [C]
        piece = self._pretokens(chars, char_rows)  # [C] pre-token index, ascending
        nbytes = 1 + tf.cast(chars >= 0x80, tf.int32) + tf.cast(chars >= 0x800, tf.int32)
        nbytes += tf.cast(chars >= 0x10000, tf.int32)  # UTF-8 length of each character
        ids = tf.gather(self.byte_ids, _utf8_bytes(chars, nbytes))  # [B] one token per byte
        seg = tf.repeat(piece, nbytes)  # [B]
        rows = tf.repeat(char_rows, nbytes)  # [B]
        ids, rows = self._merge(ids, seg, rows)
        return tf.RaggedTensor.from_value_rowids(ids, rows, nrows=nrows)

    def _pretokens(self, chars, rows):
        """int32 [C] codepoints, int64 [C] row of each -> int32 [C]: the index
        of each character's pre-token (PRETOKENIZE), pre-tokens numbered in
        order over the whole batch."""
        n = tf.size(chars)
        cls = tf.where(chars < 128, tf.gather(self.ascii_class, tf.minimum(chars, 127)), self._non_ascii)  # [C]
        first = tf.concat([[True], rows[1:] != rows[:-1]], 0)  # [C] first character of its row
        last = tf.concat([rows[1:] != rows[:-1], [True]], 0)  # [C] last character of its row
        none = -1
        prev_cls = tf.where(first, none, tf.concat([[none], cls[:-1]], 0))
        next_cls = tf.where(last, none, tf.concat([cls[1:], [none]], 0))
        joins = tf.reduce_any(tf.equal(next_cls[:, None], tf.constant(self._joins)[None, :]), axis=1)
        attached = (chars == 0x20) & joins & (prev_cls != self._space)  # [C] a space that begins " word"
        eff = tf.where(attached, next_cls, cls)  # [C] the class of the run a character belongs to
        alone = tf.reduce_any(tf.equal(cls[:, None], tf.constant(self._alone)[None, :]), axis=1)
        prev_eff = tf.concat([[none], eff[:-1]], 0)
        run_start = first | attached | alone | (eff != prev_eff)  # [C]
        run = tf.cumsum(tf.cast(run_start, tf.int32)) - 1  # [C] run index
        starts = tf.cast(tf.where(run_start)[:, 0], tf.int32)  # [runs] index of each run's first character
        head = tf.gather(starts, run)
        skip = tf.cast(tf.gather(attached, head), tf.int32)  # the joining space is not counted in the cap
        k = tf.range(n) - head - skip  # [C] position within the run's class characters
        chunk = run_start | ((k > 0) & (k % self.max_run == 0))
        return tf.cumsum(tf.cast(chunk, tf.int32)) - 1

    def _merge(self, ids, seg, rows):
        """BPE over all pre-tokens at once: each step merges, in every
        pre-token, all non-overlapping occurrences (from the left) of its
        lowest-ranked pair. int32 ids [B], seg [B] (ascending), rows [B] ->
        merged ids [M], rows [M]."""
        npieces = tf.reduce_max(tf.concat([seg, [-1]], 0)) + 1
        size = tf.cast(self.size, tf.int64)
        no_rank = self.no_rank

        def step(ids, seg, rows, _):
            keys = tf.cast(ids[:-1], tf.int64) * size + tf.cast(ids[1:], tf.int64)  # [B - 1] pair keys
            same = seg[:-1] == seg[1:]
            rank = tf.where(same, self.ranks.lookup(keys), no_rank)  # [B - 1]
            best = tf.math.unsorted_segment_min(rank, seg[:-1], npieces)  # [P]
            match = (rank == tf.gather(best, seg[:-1])) & (rank < no_rank)  # [B - 1]
            # Consecutive matches are one pair repeated ("aaaa"): take every
            # other one from the first.
            m = tf.cast(match, tf.int32)
            run_start = match & (tf.concat([[0], m[:-1]], 0) == 0)
            run = tf.cumsum(tf.cast(run_start, tf.int32)) - 1
            starts = tf.concat([[0], tf.cast(tf.where(run_start)[:, 0], tf.int32)], 0)  # [1 + runs]
            offset = tf.range(tf.size(m)) - tf.gather(starts, run + 1)
            pick = match & (offset % 2 == 0)  # [B - 1] pair i merges into position i
            merged = tf.gather(self.merged_ids, tf.where(pick, rank, no_rank))
            pick_at = tf.concat([pick, [False]], 0)  # [B]
            new_ids = tf.where(pick_at, tf.concat([merged, [0]], 0), ids)
            keep = ~tf.concat([[False], pick], 0)  # the right element of a merged pair goes
            return (
                tf.boolean_mask(new_ids, keep),
                tf.boolean_mask(seg, keep),
                tf.boolean_mask(rows, keep),
                tf.reduce_any(pick),
            )

        ids, seg, rows, _ = tf.while_loop(
            lambda ids, seg, rows, more: more,
            step,
            (ids, seg, rows, tf.constant(True)),
            shape_invariants=(tf.TensorShape([None]),) * 3 + (tf.TensorShape([]),),
        )
        return ids, rows

    def detokenize(self, ids):
        """int [N, T] (0 = padding, dropped) -> string [N]: the tokens' bytes
        joined, invalid UTF-8 replaced by U+FFFD."""
        ids = tf.cast(ids, tf.int32)
        valid = (ids > 0) & (ids < self.size)
        pieces = tf.gather(self.token_bytes, tf.where(valid, ids, 0))
        text = tf.strings.reduce_join(pieces, axis=-1)
        return tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)


def _utf8_bytes(chars, nbytes):
    """int32 codepoints [C] and their UTF-8 lengths [C] -> int32 [B]: the
    UTF-8 bytes of all characters in order."""
    cp = tf.repeat(chars, nbytes)  # [B] the codepoint each byte belongs to
    n = tf.repeat(nbytes, nbytes)  # [B]
    starts = tf.repeat(tf.cumsum(nbytes, exclusive=True), nbytes)
    k = tf.range(tf.size(cp)) - starts  # [B] byte index within its character
    shift = 6 * (n - 1 - k)
    lead = tf.gather([0, 0x00, 0xC0, 0xE0, 0xF0], n)  # first byte's marker
    lead_mask = tf.gather([0, 0x7F, 0x1F, 0x0F, 0x07], n)
    payload = tf.bitwise.right_shift(cp, shift)
    return tf.where(
        k == 0,
        tf.bitwise.bitwise_or(lead, tf.bitwise.bitwise_and(payload, lead_mask)),
        tf.bitwise.bitwise_or(0x80, tf.bitwise.bitwise_and(payload, 0x3F)),
    )
