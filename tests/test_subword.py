"""Subword tokenization (tfgpt.data.subword): the `tokenizers`-based encoder,
the fast line encoder and the in-graph encoder agree with each other and
with a plain-Python reference (a character scanner for the pre-tokenization
rule and the textbook BPE loop), decoding is lossless, and the vocabulary
file survives a SavedModel loaded by TensorFlow alone."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tfgpt.data.subword import (
    PAD_TOKEN,
    SUBWORD_FILE,
    WHITESPACE,
    SubwordTokenizer,
    SubwordVocab,
    byte_chars,
    train_subword,
)
from tfgpt.errors import UserError

WORDS = "the a of and to in is it that was movie film this for with as on but not you are his have be one".split()


def make_corpus(seed: int, n: int) -> list[str]:
    """Lines of three kinds: prose with punctuation and contractions, code
    with indentation and operators, and numbers with units."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 18))]
            words[0] = words[0].capitalize()
            if rng.random() < 0.3:
                words.insert(rng.randint(0, len(words)), rng.choice(["don't", "it's", "(really)", '"great"', "--"]))
            lines.append(" ".join(words) + rng.choice([".", "!", "?", "...", ","]))
        elif kind == 1:
            indent = " " * (4 * rng.randint(0, 3)) + rng.choice(["", "\t"])
            name = rng.choice(["x", "value", "count_2", "self.total"])
            lines.append(f"{indent}{name} = {name} * {rng.randint(0, 99)} + f({rng.choice(WORDS)!r})  # note")
        else:
            lines.append(f"{rng.randint(0, 10 ** rng.randint(1, 9))} items at {rng.random() * 100:.2f} km, 3/4 done")
    return lines


def random_unicode(rng: random.Random, n: int) -> str:
    """A string of n characters drawn from many kinds: ASCII, control
    characters and NUL, whitespace runs, Latin-1, combining marks, CJK,
    emoji, supplementary planes, U+FFFD and non-characters (no surrogates:
    text decoded from UTF-8 has none)."""
    pools = [
        (0x20, 0x7E),
        (0x00, 0x1F),
        (0x7F, 0xA0),
        (0xA1, 0x2FF),
        (0x300, 0x36F),
        (0x4E00, 0x9FFF),
        (0x1F300, 0x1F64F),
        (0x10000, 0x10FFFF),
        (0xFFF0, 0xFFFF),
        (0x2000, 0x206F),
    ]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\t", " \n ", "\r\n", "\x0b", "\x0c"]))
            continue
        lo, hi = rng.choice(pools)
        c = rng.randint(lo, hi)
        out.append(chr(c if not 0xD800 <= c <= 0xDFFF else 0xFFFD))
    return "".join(out)


def invalid_utf8(rng: random.Random) -> bytes:
    """Bytes mixing valid UTF-8 with truncated sequences, lone continuation
    bytes, overlong forms, encoded surrogates, 0xFE/0xFF and values past
    U+10FFFF."""
    bad = [
        b"\xe2\x82",
        b"\xf0\x9f\x98",
        b"\xc3",
        b"\x80",
        b"\xbf\x80\x80",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xf0\x80\x80\xaf",
        b"\xed\xa0\x80",
        b"\xed\xbf\xbf",
        b"\xff",
        b"\xfe\xff",
        b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xe1\x80\xe2\x82\xac",
    ]
    good = [b"a", b" ", b"word", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\n", b" x", b"\x00"]
    return b"".join(rng.choice(bad if rng.random() < 0.4 else good) for _ in range(rng.randint(1, 12)))


# --- An independent reference: the rule as a character scanner, and the
# textbook BPE loop over the merges list.


def ref_class(c: str) -> str:
    if c == "\n":
        return "newline"
    if c in " \t\x0b\x0c\r":
        return "space"
    if "0" <= c <= "9":
        return "digit"
    if "a" <= c.lower() <= "z" or ord(c) >= 0x80:
        return "letter"
    return "other"


def ref_pretokens(text: str, cap: int = 64) -> list[str]:
    """The pre-tokenization rule read from its description, one character at
    a time."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] == "\n":
            out.append("\n")
            i += 1
            continue
        start = i
        after_space = i > 0 and ref_class(text[i - 1]) == "space"
        joins = i + 1 < n and ref_class(text[i + 1]) in ("letter", "digit", "other")
        if text[i] == " " and joins and not after_space:
            i += 1  # the space begins the pre-token of the run after it
        kind, j = ref_class(text[i]), i
        while j < n and ref_class(text[j]) == kind and j - i < cap:
            j += 1
        out.append(text[start:j])
        i = j
    return out


class RefBPE:
    """Byte-level BPE from the vocabulary's token bytes and merge list: in each
    pre-token, while some adjacent pair has a merge, replace every
    occurrence of the lowest-ranked one from left to right."""

    def __init__(self, vocab: SubwordVocab):
        by_bytes = {b: i for i, b in enumerate(vocab.token_bytes) if i}
        self.byte_id = [by_bytes[bytes([b])] for b in range(256)]
        self.rank = {}
        for r, (a, b) in enumerate(vocab.merges):
            self.rank[(a, b)] = (r, by_bytes[vocab.token_bytes[a] + vocab.token_bytes[b]])

    def word(self, piece: bytes) -> list[int]:
        ids = [self.byte_id[b] for b in piece]
        while len(ids) > 1:
            found = [self.rank[p] for p in zip(ids, ids[1:]) if p in self.rank]
            if not found:
                break
            best, new = min(found)
            pair = next(p for p in zip(ids, ids[1:]) if self.rank.get(p, (None,))[0] == best)
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def encode(self, text: str) -> list[int]:
        return [t for p in ref_pretokens(text) for t in self.word(p.encode("utf-8"))]


# --- Fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A vocabulary of 700 trained on the corpus, saved, and its graph
    encoder (as tf.functions)."""
    folder = tmp_path_factory.mktemp("subword")
    seen = []
    vocab = train_subword(iter(make_corpus(0, 3000)), 700, on_text=seen.append)
    assert len(seen) == 3000
    path = folder / SUBWORD_FILE
    vocab.save(path)
    tok = SubwordTokenizer(path)
    encode = tf.function(lambda t: tok(t), input_signature=[tf.TensorSpec([None], tf.string)])
    decode = tf.function(lambda i: tok.detokenize(i), input_signature=[tf.TensorSpec([None, None], tf.int32)])
    return vocab, path, tok, encode, decode


def graph_ids(encode, texts) -> list[list[int]]:
    return encode(tf.constant(texts, tf.string)).to_list()


def lines_ids(vocab, texts) -> list[list[int]]:
    ids, lens = vocab.encode_lines(texts)
    assert ids.dtype == np.int32 and lens.dtype == np.int64
    ends = np.cumsum(lens)
    return [ids[e - n : e].tolist() for e, n in zip(ends, lens)]


def check_agree(vocab, encode, texts, ref=None):
    """Every encoder gives the reference's ids for every text."""
    expect = [ref.encode(t) for t in texts] if ref else [vocab.encode(t) for t in texts]
    assert [vocab.encode(t) for t in texts] == expect
    assert lines_ids(vocab, texts) == expect
    got = graph_ids(encode, [t.encode("utf-8") for t in texts])
    for t, g, e in zip(texts, got, expect):
        assert g == e, repr(t)


# --- Tests


def test_training_result(trained):
    vocab, *_ = trained
    assert vocab.size == 700
    assert vocab.tokens[0] == PAD_TOKEN and len(vocab.merges) == 700 - 257
    assert vocab.token_bytes[vocab.newline_id] == b"\n"
    assert {vocab.token_bytes[i] for i in range(1, 257)} == {bytes([b]) for b in range(256)}
    # Merges learned the corpus's frequent words, with their leading space.
    assert vocab.encode(" the") == [vocab.token_bytes.index(b" the")]


def test_byte_alphabet_matches_tokenizers():
    from tokenizers.pre_tokenizers import ByteLevel  # lazy: only this test needs the package itself

    pre = ByteLevel(add_prefix_space=False, use_regex=False)
    chars = byte_chars()
    for b in range(256):
        text = bytes([b]).decode("latin-1") if b < 0x80 else None
        if text is not None:
            assert pre.pre_tokenize_str(text)[0][0] == chars[b]
    # Two-byte characters give their bytes' characters in order.
    assert pre.pre_tokenize_str("\u00e9")[0][0] == chars[0xC3] + chars[0xA9]
    assert sorted(chars) == sorted(ByteLevel.alphabet())


def test_pretokens_match_the_scanner(trained):
    vocab, *_ = trained
    from tokenizers import Regex  # lazy: only this test needs the package itself
    from tokenizers.pre_tokenizers import Split

    from tfgpt.data.subword import pretokenize_regex

    split = Split(Regex(pretokenize_regex()), behavior="isolated")
    rng = random.Random(1)
    texts = make_corpus(5, 300) + [random_unicode(rng, rng.randint(0, 80)) for _ in range(300)]
    texts += ["a" * 200, " " * 130 + "x", "\t" * 64 + " x", " " * 65 + "x", "x" + " " * 64 + " y", "1" * 65, "!" * 129]
    for t in texts:
        expect = ref_pretokens(t)
        assert "".join(expect) == t
        assert [p for p, _ in split.pre_tokenize_str(t)] == expect, repr(t)


def test_agreement_on_corpus(trained):
    vocab, _, _, encode, _ = trained
    texts = make_corpus(1, 3000)
    check_agree(vocab, encode, texts, ref=RefBPE(vocab))


def test_agreement_on_odd_text(trained):
    vocab, _, _, encode, _ = trained
    rng = random.Random(2)
    texts = [random_unicode(rng, rng.randint(0, 60)) for _ in range(600)]
    texts += ["", " ", "  ", "\n", "\n\n\n", " \n \t\r\n ", "\t" * 70, " " * 200, "\x00", "\x00 \x00", "<|pad|>"]
    texts += ["x" * 1500, "the" * 700, " " + "é" * 1100, "9" * 1001, "😀" * 300, "a" * 64 + " b", "e\u0301" * 40]
    check_agree(vocab, encode, texts, ref=RefBPE(vocab))


def test_agreement_on_invalid_utf8(trained):
    vocab, _, _, encode, _ = trained
    rng = random.Random(3)
    raw = [invalid_utf8(rng) for _ in range(600)] + [b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b"\xe2\x82"]
    texts = [r.decode("utf-8", errors="replace") for r in raw]
    expect = lines_ids(vocab, texts)
    assert expect == [vocab.encode(t) for t in texts]
    assert graph_ids(encode, raw) == expect
    assert all(vocab.decode(e) == t for e, t in zip(expect, texts))


def test_repeated_pair_merges_from_the_left(tmp_path):
    """Runs of one character, with merges ("a","a") then ("aa","a") and
    ("aa","aa"): the textbook loop, `tokenizers` and the graph agree."""
    chars = byte_chars()
    tokens = [PAD_TOKEN, *chars]
    a = chars[ord("a")]
    tokens += [a + a, a + a + a, a * 4]
    ida = tokens.index(a)
    merges = [[ida, ida], [257, ida], [257, 257]]
    vocab = SubwordVocab(tokens, merges)
    vocab.save(tmp_path / SUBWORD_FILE)
    tok = SubwordTokenizer(tmp_path / SUBWORD_FILE)
    texts = ["a" * n for n in range(12)] + ["baaab", "aa aaa aaaaa"]
    ref = RefBPE(vocab)
    # "aaaaa": (a,a) twice from the left -> aa aa a; then (aa,a) ranks
    # before (aa,aa) -> aa aaa.
    assert ref.encode("aaaaa") == [257, 258]
    check_agree(vocab, lambda t: tok(t), texts, ref=ref)


def test_round_trip(trained):
    vocab, _, _, encode, decode = trained
    rng = random.Random(4)
    texts = make_corpus(6, 200) + [random_unicode(rng, 50) for _ in range(200)] + ["", "\n", "  x  "]
    for t in texts:
        assert vocab.decode(vocab.encode(t)) == t
    ids = encode(tf.constant(texts)).to_tensor()  # padded with 0, dropped by detokenize
    assert [s.decode("utf-8") for s in decode(ids).numpy()] == texts
    # decode drops id 0 wherever it is.
    assert vocab.decode([0, *vocab.encode("ab"), 0]) == "ab"


def test_detokenize_replaces_invalid_utf8(trained):
    vocab, _, _, _, decode = trained
    half = [vocab.token_bytes.index(bytes([0xE2])), vocab.token_bytes.index(bytes([0x82]))]
    ids = [vocab.encode("a")[0], *half, vocab.encode("b")[0]]
    assert vocab.decode(ids) == "a\ufffdb"
    assert decode(tf.constant([ids], tf.int32)).numpy()[0].decode("utf-8") == "a\ufffdb"


def test_line_cache_forgets_and_still_agrees(trained, monkeypatch):
    """encode_lines remembers pieces across calls and empties its memory
    when it grows past CACHE_WORDS; the ids stay those of `encode`."""
    import tfgpt.data.subword as subword  # lazy: only this test changes the module's limit

    vocab, *_ = trained
    fresh = SubwordVocab(vocab.tokens, vocab.merges)
    monkeypatch.setattr(subword, "CACHE_WORDS", 40)
    sizes = []
    for seed in range(4):
        texts = make_corpus(20 + seed, 30)
        assert lines_ids(fresh, texts) == [vocab.encode(t) for t in texts]
        sizes.append(fresh._lens.size)
        # at most the fixed entry, 40 kept, and the pieces of this call
        assert sizes[-1] <= 1 + 40 + sum(len(t.split(" ")) for t in texts)
    assert min(sizes) < max(sizes)  # it was emptied on the way


def test_whitespace_next_to_spaces(trained):
    """Pieces cut at single spaces, where a space is not a pre-token boundary
    (runs of spaces, tabs, spaces at the ends of lines, lines of spaces),
    in texts of many lines at once: encode_text agrees with the reference
    row by row."""
    vocab, *_ = trained
    ref = RefBPE(vocab)
    rng = random.Random(11)
    alphabet = ["a", "the", "x1", "!", ",", " ", " ", " ", "  ", "\t", "\r", "\x0b", "\u00e9", "9", ""]
    rows = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(400)]
    rows += ["", " ", "  ", " a", "a ", " a ", "a  b", "a \tb", "a\t b", "\t a", "a b  c d", "   ", " \t "]
    for k in range(0, len(rows), 37):  # texts of several rows, repeated pieces remembered across calls
        part = rows[k : k + 37]
        ids, lens = vocab.encode_text("\n".join(part))
        assert len(lens) == len(part)
        ends = np.cumsum(lens)
        assert [ids[e - n : e].tolist() for e, n in zip(ends, lens)] == [ref.encode(r) for r in part]


def test_pieces_around_the_table_key_size(trained):
    """Pieces just under, at and over the piece table's key size (short ones
    are looked up in the table, long ones in a dict), in bytes of one- to
    four-byte characters, as first pieces of rows and after a space, twice
    (encoded, then remembered): encode_text agrees with the reference row by
    row, and bytes give the ids of the same text as str."""
    from tfgpt.data.pieces import MAX_BYTES  # lazy: only this test needs the key size

    vocab, *_ = trained
    fresh = SubwordVocab(vocab.tokens, vocab.merges)
    ref = RefBPE(vocab)
    rng = random.Random(12)
    chars = ["a", "Z", "7", "!", "\u00e9", "\u4e2d", "\U0001f600"]
    words = []
    for n in range(MAX_BYTES - 4, MAX_BYTES + 6):  # bytes, with the space before it: n + 1
        for c in chars:
            w = ""
            while len((w + c).encode("utf-8")) <= n:
                w += c
            words.append(w)
    words += ["".join(rng.choice(chars) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    rows = [" ".join(rng.sample(words, rng.randint(1, 6))) for _ in range(300)]
    for _ in range(2):
        text = "\n".join(rows)
        ids, lens = fresh.encode_text(text)
        ends = np.cumsum(lens)
        assert [ids[e - n : e].tolist() for e, n in zip(ends, lens)] == [ref.encode(r) for r in rows]
        b_ids, b_lens = fresh.encode_text(text.encode("utf-8"))
        assert np.array_equal(b_ids, ids) and np.array_equal(b_lens, lens)
    assert fresh._long and fresh._table.size  # both kinds of look-up were used


def test_lines_joined_by_newline_equal_the_text(trained):
    vocab, *_ = trained
    rng = random.Random(7)
    lines = make_corpus(8, 40) + ["", "  ", " indented", "trailing  "]
    rng.shuffle(lines)
    whole = vocab.encode("\n".join(lines))
    ids, lens = vocab.encode_lines(lines)
    joined, start = [], 0
    for k, n in enumerate(lens):
        if k:
            joined.append(vocab.newline_id)
        joined += ids[start : start + n].tolist()
        start += n
    assert joined == whole


def test_cut_before_a_joining_space_keeps_tokens(trained):
    """A cut before " " whose neighbours are both outside WHITESPACE: the
    pieces' tokens concatenate to the line's tokens, at every such place."""
    vocab, *_ = trained
    rng = random.Random(9)
    lines = make_corpus(10, 30) + [random_unicode(rng, 80).replace("\n", "") for _ in range(30)]
    checked = 0
    for line in lines:
        whole = vocab.encode(line)
        for i in range(1, len(line) - 1):
            if line[i] == " " and line[i - 1] not in WHITESPACE and line[i + 1] not in WHITESPACE:
                assert vocab.encode(line[:i]) + vocab.encode(line[i:]) == whole
                checked += 1
    assert checked > 200


def test_digest_and_file(trained, tmp_path):
    vocab, path, *_ = trained
    again = SubwordVocab.load(path)
    assert again.digest() == vocab.digest() and len(vocab.digest()) == 64
    assert again.tokens == vocab.tokens and again.merges == vocab.merges
    other = SubwordVocab(vocab.tokens[:-1], vocab.merges[:-1])
    assert other.digest() != vocab.digest()
    data = json.loads(path.read_text(encoding="utf-8"))
    data["pretokenize"] = dict(data["pretokenize"], max_run=32)
    (tmp_path / "rule.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserError, match="pre-tokenization rule"):
        SubwordVocab.load(tmp_path / "rule.json")


def test_bad_input_is_a_user_error(trained, tmp_path):
    vocab, path, *_ = trained
    with pytest.raises(UserError, match="at least 257"):
        train_subword(iter(["abc"]), 256)
    cases = {
        "missing.json": None,
        "notjson.json": "{tokens",
        "foreign.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}),
        "list.json": "[1, 2]",
    }
    data = json.loads(path.read_text(encoding="utf-8"))
    cases["bad_merge.json"] = json.dumps(dict(data, merges=[*data["merges"], [5, 10**6]]))
    cases["no_pad.json"] = json.dumps(dict(data, tokens=["x", *data["tokens"][1:]]))
    cases["no_byte.json"] = json.dumps(dict(data, tokens=data["tokens"][:100]))
    cases["bad_result.json"] = json.dumps(dict(data, merges=[[1, 2], *data["merges"]]))
    cases["repeated.json"] = json.dumps(dict(data, merges=[*data["merges"], data["merges"][0]]))
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(UserError) as e:
            SubwordVocab.load(tmp_path / name)
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value), name


@pytest.mark.slow
def test_saved_model_loads_with_tensorflow_alone(trained, tmp_path):
    """A module holding a SubwordTokenizer, saved, then loaded by a process
    that imports only TensorFlow (the vocabulary file removed first): the
    same ids and texts as in this process."""
    vocab, path, *_ = trained
    copy = tmp_path / "vocab" / SUBWORD_FILE
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())

    class Holder(tf.Module):
        def __init__(self):
            super().__init__()
            self.tok = SubwordTokenizer(copy)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def encode(self, text):
            ids = self.tok(text)
            return {"ids": ids.flat_values, "lengths": ids.row_lengths()}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
        def decode(self, ids):
            return {"text": self.tok.detokenize(ids)}

    holder = Holder()
    rng = random.Random(11)
    texts = make_corpus(12, 20) + [random_unicode(rng, 30) for _ in range(20)] + [""]
    out = holder.encode(tf.constant(texts))
    expect_ids = out["ids"].numpy().tolist()
    padded = tf.RaggedTensor.from_row_lengths(out["ids"], out["lengths"]).to_tensor()
    expect_text = holder.decode(padded)["text"].numpy().tolist()
    assert expect_ids == [i for t in texts for i in vocab.encode(t)]
    export = tmp_path / "export"
    tf.saved_model.save(holder, str(export))
    copy.unlink()
    script = textwrap.dedent(
        """
        import json, sys
        import tensorflow as tf
        texts = json.loads(sys.stdin.read())
        m = tf.saved_model.load(sys.argv[1])
        out = m.encode(tf.constant(texts))
        padded = tf.RaggedTensor.from_row_lengths(out["ids"], out["lengths"]).to_tensor()
        back = m.decode(padded)["text"].numpy()
        assert not any(name.startswith("tfgpt") for name in sys.modules)
        print(json.dumps({"ids": out["ids"].numpy().tolist(), "text": [t.decode("latin-1") for t in back]}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(export)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["ids"] == expect_ids
    assert [t.encode("latin-1") for t in got["text"]] == expect_text
    assert [t.decode("utf-8") for t in expect_text] == texts
