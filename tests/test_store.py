"""The token store against today's in-memory path: the same vocabulary, the
same training and validation windows in both packings, for every input form;
reading windows through the tf.data pipeline; per-worker reads. The epoch
order itself is tests/test_order.py."""

import gzip
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import make_review, write_imdb_tree

from tfgpt.data import prepare
from tfgpt.data.corpus import TextDocument, read_corpus, train_val_split
from tfgpt.data.order import EpochOrder
from tfgpt.data.store import StoreWindows
from tfgpt.data.text import Tokenizer, build_vocab, tokenize_lines, write_vocab
from tfgpt.data.windows import eval_dataset, make_windows, train_dataset

MAXLEN = 9


def reference_docs(paths: list[Path]) -> list[TextDocument]:
    """Documents read the simple way: each path's .txt files (or the file
    itself), sorted by name, decoded with replacement characters."""
    docs = []
    for path in paths:
        if path.is_dir():
            files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*.txt"))
        else:
            files = [(path.name, path)]
        for name, p in files:
            raw = p.read_bytes()
            docs.append(TextDocument(name, raw.decode("utf-8", errors="replace")))
    return docs


def reference_windows(docs, vocab_size, val_fraction, seed, folder: Path):
    """Today's path: split, vocabulary, Tokenizer, make_windows."""
    train, val = train_val_split(docs, val_fraction, seed)
    words, counts = build_vocab(train, vocab_size)
    write_vocab(words, folder / "ref_vocab.txt", counts)
    tok = Tokenizer(folder / "ref_vocab.txt")
    out = {}
    for name, lines in (("train", train), ("val", val)):
        ids, lengths = tokenize_lines(tok, lines)
        for packing in ("truncate", "pack"):
            out[name, packing] = make_windows(ids, lengths, MAXLEN, packing)
    return (folder / "ref_vocab.txt").read_text(), out, (len(train), len(val))


def build(spec, tmp_path, **kw):
    settings = dict(
        vocab_size=kw.pop("vocab_size", 50), val_fraction=kw.pop("val_fraction", 0.1), seed=kw.pop("seed", 3)
    )
    kw.setdefault("store_dir", tmp_path / "stores")
    kw.setdefault("shard_tokens", 97)  # many shards: windows cross their boundaries
    return prepare.ensure_store(str(spec), **settings, **kw).store, settings


def assert_store_equals_reference(store, docs, settings, tmp_path):
    vocab_text, ref, (n_train, n_val) = reference_windows(docs, folder=tmp_path, **settings)
    assert store.vocab_path.read_text() == vocab_text  # words, order and counts
    assert (store.split("train")["lines"], store.split("val")["lines"]) == (n_train, n_val)
    for (split, packing), expected in ref.items():
        windows = store.windows(split, MAXLEN, packing)
        assert len(windows) == len(expected), (split, packing)
        np.testing.assert_array_equal(windows.read(np.arange(len(windows))), expected, err_msg=f"{split} {packing}")


def write_lines(path: Path, n: int, seed: int = 1, end: str = "\n") -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(make_review(rng) for _ in range(n)) + end)
    return path


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 700])
def test_single_file_split_by_lines(tmp_path, chunk_bytes, monkeypatch):
    """One document: the validation lines are chosen among its lines. Small
    chunks put chunk boundaries everywhere."""
    from tfgpt.data import store_build

    monkeypatch.setattr(store_build, "CHUNK_BYTES", chunk_bytes)
    path = write_lines(tmp_path / "reviews.txt", 300)
    store, settings = build(path, tmp_path, workers=2)
    assert store.manifest["dtype"] == "uint16" and len(store.split("train")["shards"]) > 5
    assert_store_equals_reference(store, reference_docs([path]), settings, tmp_path)


def test_folder_of_files_split_by_documents(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "c").mkdir(parents=True)
    rng = random.Random(2)
    for i in range(40):
        sub = ["", "b", "b/c"][i % 3]
        # Several lines per file, an empty line, files with and without a final newline.
        text = "\n".join(make_review(rng) for _ in range(1 + i % 4)) + ("\n\n" if i % 5 == 0 else "")
        (root / sub / f"doc{i:02d}.txt").write_text(text)
    (root / "notes.md").write_text("not read")
    store, settings = build(root, tmp_path, val_fraction=0.2)
    assert store.manifest["documents"] == 40
    assert_store_equals_reference(store, reference_docs([root]), settings, tmp_path)


def test_imdb_archive(tmp_path):
    base = write_imdb_tree(tmp_path / "src", per_split=6, unsup=3)
    archive = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(base, arcname="aclImdb")
    store, settings = build(archive, tmp_path)
    docs = [d for d in reference_docs([base]) if "unsup" not in d.name]
    docs = [TextDocument("aclImdb/" + d.name, d.text) for d in docs]
    assert store.manifest["documents"] == 24
    assert_store_equals_reference(store, docs, settings, tmp_path)


def test_awkward_text(tmp_path, monkeypatch):
    """Undecodable bytes next to line ends, CRLF, NUL, <br />, capitals
    beyond ASCII, long lines and empty lines, in chunks of a few bytes."""
    from tfgpt.data import store_build

    monkeypatch.setattr(store_build, "CHUNK_BYTES", 16)
    lines = [
        b"caf\xe9 ok\r",
        b"\xe2\x82",
        b"broken \xf0\x9f\x98 end",
        b"",
        b"\xc3\x89MILE's CAF\xc3\x89!<br />next",
        b"a\x00b  c\td",
        b"\xff\xfe",
        b"<br /><br />x",
        b"ONE two" + b" w" * 200,
        b"\r",
        b"last line",
    ]
    path = tmp_path / "awkward.txt"
    path.write_bytes(b"\n".join(lines * 5))
    store, settings = build(path, tmp_path, val_fraction=0.2, vocab_size=30)
    assert store.manifest["bad_utf8"] == 1
    assert_store_equals_reference(store, reference_docs([path]), settings, tmp_path)


def test_gzip_files_read_like_their_text(tmp_path):
    plain = tmp_path / "plain"
    packed = tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    for i in range(12):
        write_lines(plain / f"{i:02d}.txt", 3, seed=i)
        (packed / f"{i:02d}.txt.gz").write_bytes(gzip.compress((plain / f"{i:02d}.txt").read_bytes()))
    a, _ = build(plain, tmp_path / "a")
    b, _ = build(packed, tmp_path / "b")
    assert a.vocab_path.read_text() == b.vocab_path.read_text()
    for split in ("train", "val"):
        wa, wb = a.windows(split, MAXLEN, "pack"), b.windows(split, MAXLEN, "pack")
        np.testing.assert_array_equal(wa.read(np.arange(len(wa))), wb.read(np.arange(len(wb))))
    # One .txt.gz file as --data: its lines, as the plain file's.
    one = write_lines(tmp_path / "one.txt", 200)
    gz = tmp_path / "one.txt.gz"
    gz.write_bytes(gzip.compress(one.read_bytes()))
    store, settings = build(gz, tmp_path / "c")
    assert_store_equals_reference(store, reference_docs([one]), settings, tmp_path)


def test_several_paths_and_globs(tmp_path):
    for i in range(6):
        write_lines(tmp_path / f"part{i}.txt", 20, seed=i)
    folder = tmp_path / "more"
    folder.mkdir()
    for i in range(3):
        write_lines(folder / f"x{i}.txt", 5, seed=10 + i)
    spec = f"{tmp_path / 'part[3-5].txt'}:{folder}:{tmp_path / 'part0.txt'}"
    store, settings = build(spec, tmp_path)
    paths = [tmp_path / f"part{i}.txt" for i in (3, 4, 5)] + [folder, tmp_path / "part0.txt"]
    docs = reference_docs(paths)
    assert store.manifest["documents"] == len(docs) == 7
    assert_store_equals_reference(store, docs, settings, tmp_path)
    assert [d.name for d in read_corpus(spec)] == [d.name for d in docs]


def test_large_vocabulary_takes_uint32(tmp_path):
    path = tmp_path / "many.txt"
    words = [f"w{i}" for i in range(70_000)]
    path.write_text("\n".join(" ".join(words[i : i + 50]) + " common" for i in range(0, len(words), 50)) + "\n")
    store, settings = build(path, tmp_path, vocab_size=80_000, val_fraction=0.0, shard_tokens=1 << 16)
    assert store.manifest["dtype"] == "uint32" and store.manifest["vocab_entries"] > 1 << 16
    assert_store_equals_reference(store, reference_docs([path]), settings, tmp_path)


def test_workers_and_chunks_do_not_change_the_bytes(tmp_path, monkeypatch):
    from tfgpt.data import store_build

    path = write_lines(tmp_path / "r.txt", 400)
    one, _ = build(path, tmp_path / "one", workers=1)
    monkeypatch.setattr(store_build, "CHUNK_BYTES", 300)
    two, _ = build(path, tmp_path / "two", workers=2)
    assert one.manifest["files"].keys() == two.manifest["files"].keys()
    for name in one.manifest["files"]:
        assert (one.root / name).read_bytes() == (two.root / name).read_bytes(), name


# --- reading: the pipeline, the order, the workers -----------------------------


def _batches(ds):
    return [tuple(t.numpy() for t in b) for b in ds]


def test_pipeline_reads_the_same_batches_from_store_and_memory(tmp_path):
    path = write_lines(tmp_path / "r.txt", 200)
    store, settings = build(path, tmp_path)
    _, ref, _ = reference_windows(reference_docs([path]), folder=tmp_path, **settings)
    for packing in ("truncate", "pack"):
        windows = store.windows("train", MAXLEN, packing)
        for epoch, skip in ((0, 0), (1, 0), (1, 3)):
            a = _batches(train_dataset(windows, 16, seed=5, epoch=epoch, packing=packing, skip=skip))
            b = _batches(train_dataset(ref["train", packing], 16, 5, epoch, packing, skip=skip))
            assert len(a) == len(b) == len(ref["train", packing]) // 16 - skip
            for x, y in zip(a, b):
                for p, q in zip(x, y):
                    np.testing.assert_array_equal(p, q)
        val = store.windows("val", MAXLEN, packing)
        a = _batches(eval_dataset(val, 16, packing))
        b = _batches(eval_dataset(ref["val", packing], 16, packing))
        assert len(a) == len(b) == -(-len(val) // 16)
        for x, y in zip(a, b):
            for p, q in zip(x, y):
                np.testing.assert_array_equal(p, q)
        assert sum(float(batch[2].sum()) for batch in a) == float(
            sum((w[1:] != 0).sum() if packing == "truncate" else MAXLEN for w in ref["val", packing])
        )


def test_each_worker_reads_only_its_slice(tmp_path):
    path = write_lines(tmp_path / "r.txt", 200)
    store, _ = build(path, tmp_path)
    full_windows = store.windows("train", MAXLEN, "pack")
    full = _batches(train_dataset(full_windows, 8, seed=2, epoch=0, packing="pack"))
    order = EpochOrder(len(full_windows), 2, 0).numpy(np.arange(len(full) * 8))
    parts, reads = [], []
    for worker in range(2):
        windows = store.windows("train", MAXLEN, "pack")
        seen = []
        original = windows.read
        windows.read = lambda rows, original=original, seen=seen: (seen.extend(rows.tolist()), original(rows))[1]
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=4)
        parts.append(_batches(train_dataset(windows, 8, seed=2, epoch=0, packing="pack", input_context=ctx)))
        reads.append(seen)
    for worker in range(2):
        # Worker w reads rows 4w..4w+3 of every global batch of 8, nothing else.
        mine = order.reshape(-1, 8)[:, 4 * worker : 4 * worker + 4].ravel().tolist()
        assert reads[worker] == mine
    for step, batch in enumerate(full):
        pieces = [parts[w][2 * step + r][0] for w in range(2) for r in range(2)]
        np.testing.assert_array_equal(np.concatenate(pieces), batch[0])


def test_store_windows_validate_packing(tmp_path):
    store, _ = build(write_lines(tmp_path / "r.txt", 30), tmp_path)
    with pytest.raises(ValueError, match="packing"):
        StoreWindows(store, "train", MAXLEN, "zip")
