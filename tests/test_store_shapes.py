"""Text of any shape in the token store: lines longer than a chunk (one line
of a whole corpus, lines without spaces), read as a stream; the validation
split of a single document; the automatic choice of --packing pack; the
error for a folder without .txt files. The stores are checked against the
in-memory path (whole lines, `corpus.train_val_split`, the Tokenizer,
`make_windows`), which never cuts a line."""

import random
from pathlib import Path

import pytest
from helpers import make_review
from test_store import assert_store_equals_reference, build, reference_docs

from tfgpt import errors
from tfgpt.data import sources, store_build
from tfgpt.data.corpus import read_corpus, split_by_share, train_val_split
from tfgpt.data.windows import choose_packing


def one_line(rng: random.Random, words: int) -> str:
    """Review words without any newline (text8's shape)."""
    out = []
    while len(out) < words:
        out.extend(make_review(rng).split(" "))
    return " ".join(out[:words])


def doc_of(path: Path) -> sources.Document:
    return sources.Document(path.name, str(path), "plain")


def joined(segs) -> bytes:
    """Segments back into the text: LINE and SPLIT ends were a "\\n" (or the
    end), OPEN ends nothing."""
    out = []
    for piece, _, end in segs:
        out.append(piece + (b"" if end == sources.OPEN else b"\n"))
    return b"".join(out)[:-1]


# --- reading long lines as a stream ------------------------------------------


@pytest.mark.parametrize("block", [16, 100, 4096])
def test_segments_give_back_the_text_and_cut_lines_between_words(tmp_path, block):
    rng = random.Random(block)
    lines = [one_line(rng, rng.choice([3, 40, 900])) for _ in range(12)] + [
        "",
        "x",
        "caf\u00e9 na\u00efve \u4e16\u754c ok",
    ]
    rng.shuffle(lines)
    text = "\n".join(lines).encode("utf-8")
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    segs = list(sources.segments(doc_of(path), block))
    assert joined(segs) == text
    for piece, ok, _ in segs:
        assert ok and len(piece) <= 2 * block + 16
    for (piece, _, end), (after, _, _) in zip(segs, segs[1:]):
        if end == sources.OPEN:  # these lines have a space between words within every few bytes
            assert after[:1] == b" " and after[1:2] not in (b" ", b"") and piece[-1:] not in (b" ", b"")
    # The old interface joins the parts of a line back together.
    whole = [p for p, _ in sources.pieces(doc_of(path), block)]
    assert b"\n".join(whole) == text  # whole lines again


def test_a_run_without_spaces_is_cut_at_character_boundaries(tmp_path):
    """Memory stays bounded: a word longer than the block and the 64 KiB
    searched back for a space is cut where a character starts."""
    text = ("\u00e9\u4e16" * 60_000).encode("utf-8") + b" end"
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    segs = list(sources.segments(doc_of(path), 4096))
    assert len(segs) >= 4 and joined(segs) == text
    for piece, ok, _ in segs:
        assert ok
        piece.decode("utf-8")  # whole characters


@pytest.mark.parametrize(
    "text, cuts",
    [
        (b"aaaa bbbb", [4]),
        (b"aaaa  bbbb", []),  # two spaces: no cut between them
        (b"aa\tbb cc", [5]),
        (b"aa <br />bb", [2]),  # not inside "<br />", which the word standardization removes whole
        (b"aa <BR />bb", [2]),
        ("x\u00a0 y z".encode("utf-8"), [5]),  # a no-break space is whitespace
        ("\u4e16 \u754c".encode("utf-8"), [3]),
    ],
)
def test_safe_spaces(text, cuts):
    assert [j for j in range(len(text)) if sources.safe_space(text, j)] == cuts


def reference_split_place(data: bytes, at: int) -> int:
    """The definition, position by position: the first "\\n" or safe space at
    or after `at` within the window; else the first character start."""
    for k in range(at, min(len(data), at + sources.SPLIT_WINDOW)):
        if data[k] == 0x0A:
            return k + 1
        if data[k] == 0x20 and sources.safe_space(data, k):
            return k
    k = at
    while k < len(data) and data[k] & 0xC0 == 0x80:
        k += 1
    return k


@pytest.mark.parametrize("block", [16, 50, 1 << 20])
def test_a_split_while_streaming_is_the_split_of_the_whole_text(tmp_path, block):
    rng = random.Random(7)
    text = ("\n".join(one_line(rng, rng.choice([2, 30, 200])) for _ in range(6)) + " \u4e16\u754c\u4e16  z").encode()
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    for at in sorted(rng.sample(range(1, len(text)), 40)) + [len(text) - 3, len(text) - 1]:
        c = sources.split_place(text, at)
        assert c == reference_split_place(text, at), at
        segs = list(sources.segments(doc_of(path), block, split_at=at))
        ends = [i for i, s in enumerate(segs) if s[2] == sources.SPLIT]
        assert len(ends) == 1, at
        head, tail = joined(segs[: ends[0] + 1]), joined(segs[ends[0] + 1 :])
        want_head = text[: c - 1] if text[c - 1 : c] == b"\n" else text[:c]
        assert (head, tail) == (want_head, text[c:]), at


def test_scan_counts_lines_text_lines_and_bytes(tmp_path):
    for text in [b"", b"\n", b"a", b"a\n", b"\n\na\n\nbb\n", b"x" * 100 + b"\n\n"]:
        path = tmp_path / "t.txt"
        path.write_bytes(text)
        lines = text.split(b"\n")
        for block in (1, 3, 1 << 20):
            assert sources.scan(doc_of(path), block) == sources.Scan(len(lines), sum(1 for x in lines if x), len(text))


# --- one long line in a word store ---------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [700, 1 << 20])
def test_a_one_line_corpus_is_the_whole_line_read_at_once(tmp_path, monkeypatch, chunk_bytes):
    """text8's shape: one line of words. Read in parts, the store is what the
    whole line gives; the validation part is the last share of the text."""
    monkeypatch.setattr(store_build, "CHUNK_BYTES", chunk_bytes)
    path = tmp_path / "one.txt"
    path.write_text(one_line(random.Random(1), 4000))
    store, settings = build(path, tmp_path, val_fraction=0.1, workers=2)
    docs = reference_docs([path])
    assert_store_equals_reference(store, docs, settings, tmp_path)
    train, val = store.split("train"), store.split("val")
    assert (train["lines"], val["lines"]) == (1, 1)
    assert 0.08 < val["tokens"] / (train["tokens"] + val["tokens"]) < 0.12
    # The in-memory split: the text cut once, before a space, nothing lost.
    head, tail = train_val_split(docs, 0.1, 3)
    assert len(head) == len(tail) == 1 and head[0] + tail[0] == docs[0].text and tail[0][0] == " "


@pytest.mark.parametrize("chunk_bytes", [300, 5000])
def test_long_lines_keep_their_counts_starts_and_validation_lines(tmp_path, monkeypatch, chunk_bytes):
    """Some lines much longer than a chunk among short ones (and a one-word
    line cut nowhere): lines held out at random as always; a long line's
    truncate window is its start, however many chunks it spans."""
    monkeypatch.setattr(store_build, "CHUNK_BYTES", chunk_bytes)
    rng = random.Random(chunk_bytes)
    lines = [one_line(rng, rng.choice([1, 1, 2, 5, 400, 1500])) for _ in range(60)]
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(lines) + "\n")
    store, settings = build(path, tmp_path, val_fraction=0.2, workers=2)
    assert store.split("train")["lines"] + store.split("val")["lines"] == 61
    assert_store_equals_reference(store, reference_docs([path]), settings, tmp_path)


def test_documents_of_long_lines_in_both_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(store_build, "CHUNK_BYTES", 256)
    root = tmp_path / "corpus"
    root.mkdir()
    rng = random.Random(4)
    for i in range(12):
        (root / f"d{i:02d}.txt").write_text("\n".join(one_line(rng, rng.choice([1, 3, 300])) for _ in range(1 + i % 3)))
    store, settings = build(root, tmp_path, val_fraction=0.3, workers=2)
    assert_store_equals_reference(store, reference_docs([root]), settings, tmp_path)


# --- the validation split of a single document ----------------------------------


@pytest.mark.parametrize(
    "lines, text_lines, fraction, by_share",
    [
        (1, 1, 0.02, True),  # one line: holding out a line leaves nothing
        (2, 1, 0.02, True),  # one line and the empty one after its "\n"
        (3, 3, 0.9, True),  # the lines held out would be all of them
        (50, 50, 0.1, False),  # today's split by lines
        (2, 2, 0.02, False),
        (1, 1, 0.0, False),  # no validation
    ],
)
def test_split_by_share_only_where_lines_cannot_be_held_out(lines, text_lines, fraction, by_share):
    assert split_by_share(lines, text_lines, fraction) == by_share


def test_a_document_of_many_lines_is_split_by_lines_as_before(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("\n".join(f"line {i} words" for i in range(1200)))
    train, val = train_val_split(read_corpus(path), 0.02, seed=5)
    assert len(val) == 24 and len(train) == 1176 and set(val) <= {f"line {i} words" for i in range(1200)}


def test_a_short_single_document_gets_a_validation_part(tmp_path):
    store, _ = build(_write(tmp_path / "w.txt", "just a few words here and there"), tmp_path, val_fraction=0.02)
    assert store.split("val")["tokens"] >= 1 and store.split("train")["tokens"] >= 5


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- the packing ------------------------------------------------------------------


def test_choose_packing():
    long_lines = dict(line_starts=3, stream=10_000)
    assert choose_packing(long_lines, 64, 32, "truncate", explicit=False)[0] == "pack"
    note = choose_packing(long_lines, 64, 32, "truncate", explicit=False)[1]
    assert "\n" not in note and "--packing pack" in note and "156 windows" in note
    with pytest.raises(errors.UserError, match="--packing pack gives 156"):
        choose_packing(long_lines, 64, 32, "truncate", explicit=True)
    assert choose_packing(dict(line_starts=40, stream=10_000), 64, 32, "truncate", False) == ("truncate", None)
    assert choose_packing(dict(line_starts=3, stream=100), 64, 32, "truncate", False) == ("truncate", None)
    assert choose_packing(long_lines, 64, 32, "pack", explicit=True) == ("pack", None)


def test_subword_documents_much_longer_than_the_context_are_packed():
    """whole_text: pack when truncate would keep under half the tokens, unless
    --packing was given; the word tokenizer's choice is unchanged."""
    long_docs = dict(line_starts=500, stream=500 * 2001, tokens=500 * 2000)  # 2,000 tokens a document
    packing, note = choose_packing(long_docs, 64, 32, "truncate", explicit=False, whole_text=True)
    assert packing == "pack" and "at most 3% of the text" in note and "--packing truncate" in note
    assert choose_packing(long_docs, 64, 32, "truncate", explicit=True, whole_text=True) == ("truncate", None)
    assert choose_packing(long_docs, 64, 32, "truncate", explicit=False) == ("truncate", None)
    short_docs = dict(line_starts=500, stream=500 * 101, tokens=500 * 100)  # 65 of 100 tokens kept
    assert choose_packing(short_docs, 64, 32, "truncate", explicit=False, whole_text=True) == ("truncate", None)


def test_choose_packing_on_a_one_line_store(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(one_line(random.Random(2), 3000))
    store, _ = build(path, tmp_path, val_fraction=0.1)
    packing, note = choose_packing(store.split("train"), 16, 8, "truncate", explicit=False)
    assert packing == "pack" and note
    assert len(store.windows("train", 16, packing)) >= 8


# --- what a folder gives ----------------------------------------------------------


def test_a_folder_without_text_files_names_the_way_to_read_others(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("print('a')\n")
    for read in (lambda: sources.input_files([src], False), lambda: read_corpus(src)):
        with pytest.raises(errors.UserError, match=r"no \.txt files found.*--data '.*src/\*\*/\*\.py'"):
            read()
    docs = read_corpus(f"{src}/**/*.py")
    assert [d.text for d in docs] == ["print('a')\n"]
