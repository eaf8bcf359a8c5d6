"""The subword token store: lossless (the streams decode to the corpus's
text, documents in order, split as planned), documents as units, a
one-line corpus, a given (resumed) vocabulary, and old manifests read as
word stores."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import make_review

from tfgpt.data import store_build
from tfgpt.data.corpus import held_out, split_text
from tfgpt.data.store import Store, TokenStream
from tfgpt.data.subword import SUBWORD_FILE, SubwordVocab

VOCAB = 300


def build(folder: Path, paths, tokenizer="subword", **kw) -> Store:
    folder.mkdir()
    kw.setdefault("val_fraction", 0.2)
    store_build.build(
        folder,
        [Path(p) for p in paths],
        imdb_unsup=False,
        vocab_size=kw.pop("vocab_size", VOCAB),
        seed=3,
        params={"test": True},
        key="k",
        shard_tokens=101,
        workers=kw.pop("workers", 2),
        tokenizer=tokenizer,
        **kw,
    )
    return Store(folder, checksums="all")


def units(store: Store, split: str) -> list[list[int]]:
    """A split's stream cut at its 0s: the ids of each unit."""
    stream = TokenStream(store, split)
    ids = stream.tokens(0, stream.length).astype(np.int64)
    stream.close()
    assert len(ids) == 0 or ids[-1] == 0
    cuts = np.flatnonzero(ids == 0)
    return [ids[a + 1 : b].tolist() for a, b in zip(np.concatenate([[-1], cuts[:-1]]), cuts)]


def corpus_text(rng: random.Random) -> str:
    """A document of a few lines: words, tabs and runs of spaces, capitals,
    non-ASCII text, an empty line, sometimes a final newline."""
    lines = []
    for _ in range(rng.randint(1, 4)):
        line = make_review(rng)
        line = rng.choice([line, line.upper(), "  " + line + "\t!", "caf\u00e9 \u4e16\u754c " + line, ""])
        lines.append(line)
    return "\n".join(lines) + rng.choice(["", "\n"])


def corpus_folder(root: Path, rng: random.Random, documents: int) -> tuple[Path, list[str]]:
    """A folder of `documents` files of corpus_text, in name order; (folder, texts)."""
    root.mkdir()
    texts = [corpus_text(rng) for _ in range(documents)]
    for i, text in enumerate(texts):
        (root / f"d{i:02d}.txt").write_text(text)
    return root, texts


def test_a_subword_store_decodes_to_its_documents(tmp_path):
    root, texts = corpus_folder(tmp_path / "corpus", random.Random(0), 30)
    store = build(tmp_path / "store", [root], chunk_bytes=200)  # documents across chunks
    vocab = SubwordVocab.load(store.tokenizer_path)
    assert store.tokenizer == "subword" and store.tokenizer_path.name == SUBWORD_FILE
    assert store.manifest["tokenizer"] == "subword" and store.manifest["vocab_entries"] == vocab.size <= VOCAB
    val = set(held_out(30, 0.2, 3).tolist())  # the word store's split of documents
    for split, want in (
        ("train", [t for i, t in enumerate(texts) if i not in val]),
        ("val", [texts[i] for i in sorted(val)]),
    ):
        got = units(store, split)
        assert [vocab.decode(u) for u in got] == want, split
        assert store.split(split)["lines"] == len(want)
        assert all(u == vocab.encode(t) for u, t in zip(got, want))
        # truncate windows: each document of at least 2 tokens, from its start
        windows = store.windows(split, 8, "truncate").read(np.arange(store.split(split)["line_starts"]))
        expected = np.zeros([sum(len(u) >= 2 for u in got), 9], np.int32)
        for row, u in enumerate(u for u in got if len(u) >= 2):
            expected[row, : min(9, len(u))] = u[:9]
        np.testing.assert_array_equal(windows, expected)


@pytest.mark.parametrize("chunk_bytes", [300, 1 << 20])
def test_a_one_line_corpus_in_subwords(tmp_path, chunk_bytes):
    rng = random.Random(5)
    words = []
    while len(words) < 3000:
        words.extend(make_review(rng).split(" "))
    text = " ".join(words)
    path = tmp_path / "one.txt"
    path.write_text(text)
    store = build(tmp_path / "store", [path], chunk_bytes=chunk_bytes, val_fraction=0.05)
    vocab = SubwordVocab.load(store.tokenizer_path)
    (train,), (val,) = units(store, "train"), units(store, "val")
    head, tail = split_text(text.encode(), 0.05)
    assert (vocab.decode(train), vocab.decode(val)) == (head.decode(), tail.decode())
    assert head + tail == text.encode() and 0.03 < len(tail) / len(text) < 0.07
    assert train == vocab.encode(head.decode())  # cut where the tokens of the whole are cut too


def test_a_single_document_of_many_lines_is_split_by_share(tmp_path):
    """Its one unit is the document: lines are not held out, its tail is."""
    rng = random.Random(8)
    text = "\n".join(make_review(rng) for _ in range(200)) + "\n"
    path = tmp_path / "many.txt"
    path.write_text(text)
    store = build(tmp_path / "store", [path], chunk_bytes=500, val_fraction=0.1)
    vocab = SubwordVocab.load(store.tokenizer_path)
    (train,), (val,) = units(store, "train"), units(store, "val")
    head, tail = split_text(text.encode(), 0.1)
    assert (vocab.decode(train), vocab.decode(val)) == (head.decode(), tail.decode())
    assert text.encode() in (head + tail, head + b"\n" + tail)  # nothing lost but a newline at the cut
    assert 0.08 < len(tail) / len(text) < 0.12


def test_a_given_vocabulary_gives_its_ids(tmp_path):
    rng = random.Random(2)
    first = tmp_path / "first.txt"
    first.write_text("\n".join(make_review(rng) for _ in range(100)))
    own = build(tmp_path / "own", [first])
    given = own.tokenizer_path
    other = tmp_path / "other"
    other.mkdir()
    texts = ["zebra quagga okapi\nthe end", "numbers 12345 and caf\u00e9"]
    for i, t in enumerate(texts):
        (other / f"{i}.txt").write_text(t)
    store = build(tmp_path / "resumed", [other], given_subword=given, val_fraction=0.0)
    assert (store.root / SUBWORD_FILE).read_text() == given.read_text()
    assert store.manifest["own_vocab"] is False
    vocab = SubwordVocab.load(given)
    assert units(store, "train") == [vocab.encode(t) for t in texts]


def test_manifests_without_a_tokenizer_are_word_stores(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("\n".join(make_review(random.Random(1)) for _ in range(20)))
    store = build(tmp_path / "word", [path], tokenizer="word", vocab_size=50)
    assert "tokenizer" not in store.manifest  # word manifests are as they were
    assert store.tokenizer == "word" and store.tokenizer_path == store.root / "vocab.txt"
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["tokenizer"] = "subword"
    store.manifest = manifest
    assert store.tokenizer_path == store.root / SUBWORD_FILE


def test_worker_processes_encode_as_this_process_does(tmp_path, monkeypatch):
    """The same store from forked encoding processes as from one thread, and
    the vocabulary saved is the one the processes encoded with."""
    root, texts = corpus_folder(tmp_path / "corpus", random.Random(4), 40)
    one = build(tmp_path / "one", [root], chunk_bytes=300, workers=1)
    monkeypatch.setattr(store_build, "POOL_MIN_BYTES", 0)
    started = []
    real = store_build._Encoders.__init__

    def spy(self, workers):
        real(self, workers)
        started.append(self.pool is not None)

    monkeypatch.setattr(store_build._Encoders, "__init__", spy)
    pooled = build(tmp_path / "pooled", [root], chunk_bytes=300)
    assert started == [True]
    assert pooled.tokenizer_path.read_text() == one.tokenizer_path.read_text()
    for split in ("train", "val"):
        assert units(pooled, split) == units(one, split)
    vocab = SubwordVocab.load(pooled.tokenizer_path)
    assert [vocab.decode(u) for u in units(pooled, "train") + units(pooled, "val")] == sorted(
        texts, key=lambda t: (texts.index(t) in set(held_out(40, 0.2, 3).tolist()), texts.index(t))
    )


@pytest.mark.parametrize("shape", ["files", "one line"])
def test_the_vocabulary_is_learned_from_an_even_sample(tmp_path, shape):
    """Past the budget, the text learned from is about budget bytes, drawn
    from the beginning, the middle and the end of the training part."""
    rng = random.Random(6)
    if shape == "files":
        root = tmp_path / "corpus"
        root.mkdir()
        for i in range(200):
            (root / f"d{i:03d}.txt").write_text(f"doc{i:03d} " + make_review(rng))
        paths, chunk = [root], 1 << 20
    else:
        root = tmp_path / "one.txt"
        root.write_text(" ".join(f"doc{i:03d} " + make_review(rng) for i in range(200)))
        paths, chunk = [root], 400
    docs = store_build.sources.list_documents(paths, False, spool_dir=tmp_path)
    plan = store_build.plan_split(docs, 0.0, 0, by_share=True)
    whole = "".join(store_build.training_text(plan, lambda n: None, chunk))
    budget = len(whole.encode()) // 5
    counted = []
    sample = "".join(store_build.training_text(plan, counted.append, chunk, budget=budget))
    assert 0.7 * budget < len(sample.encode()) < 1.3 * budget
    assert 0 <= len(sample.encode()) - sum(counted) <= sample.count("\n")  # the line ends yielded on their own
    marks = sorted(int(m) for m in re.findall(r"doc(\d{3})", sample))
    assert marks[0] < 40 and marks[-1] > 160 and any(80 <= m < 120 for m in marks)
    assert "".join(store_build.training_text(plan, lambda n: None, chunk, budget=10 * budget)) == whole
