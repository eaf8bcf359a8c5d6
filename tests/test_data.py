"""Corpus forms, standardization, vocabulary, windows and the input pipeline."""

import hashlib
import http.server
import re
import socket
import string
import threading

import numpy as np
import pytest
import tensorflow as tf
from helpers import log_messages, tar_folder, write_imdb_tree

from tfgpt import errors
from tfgpt.data.corpus import (
    IMDB_SHA256,
    TextDocument,
    held_out,
    read_corpus,
    resolve_imdb,
    split_lines,
    train_val_split,
)
from tfgpt.data.text import Tokenizer, build_vocab, read_vocab, split_words, write_vocab
from tfgpt.data.windows import batches_per_epoch, eval_dataset, make_windows, split_window, train_dataset


def reference_words(text: str) -> list[str]:
    """The example's standardization, in plain Python."""
    text = text.lower().replace("<br />", " ")
    text = re.sub(f"([{re.escape(string.punctuation)}])", r" \1", text)
    return text.split()


def tf_words(text: str) -> list[str]:
    return [w.decode() for w in split_words(tf.constant([text]))[0].numpy()]


@pytest.mark.parametrize(
    "text",
    [
        'Don\'t STOP!<br /><br />It was (really) "great"...',
        "a-b_c{d}e[f]g\\h|i~j`k^l@m#n$o%p&q*r+s=t<u>v?w/x;y:z,",
        "  spaces   and\ttabs  ",
        "Émile's café",
    ],
)
def test_standardize_matches_python_reference(text):
    assert tf_words(text) == reference_words(text)


def test_standardize_splits_contractions_and_punctuation():
    assert tf_words("Don't<br />stop.") == ["don", "'t", "stop", "."]


def test_standardize_keeps_text_after_a_nul_byte():
    assert tf_words("before\x00AFTER") == ["before", "after"]


def test_vocab_order_counts_then_word_and_cap():
    lines = ["b a a c c c", "d d e e", "z"]
    # counts: c3, a2, d2, e2, b1, z1 ; ties by the word
    words, counts = build_vocab(lines, 100)
    assert words == ["", "[UNK]", "c", "a", "d", "e", "b", "z"]
    assert counts == [0, 0, 3, 2, 2, 2, 1, 1]
    words, counts = build_vocab(lines, 4)
    assert words == ["", "[UNK]", "c", "a"]
    assert counts == [0, 6, 3, 2]  # [UNK] stands for the 6 words left out


def test_vocab_file_round_trip_and_tokenizer(tmp_path):
    vocab = ["", "[UNK]", "the", "movie", "'s", "."]
    path = tmp_path / "vocab.txt"
    write_vocab(vocab, path, [0, 0, 9, 8, 7, 6])
    assert read_vocab(path) == vocab
    assert path.read_text().splitlines()[:3] == ["\t0", "[UNK]\t0", "the\t9"]
    tok = Tokenizer(path)
    assert tok.size == 6
    ids = tok(tf.constant(["The movie's unknownword.", ""]))
    assert ids.to_list() == [[2, 3, 4, 1, 5], []]
    text = tok.detokenize(tf.constant([[2, 3, 0, 0], [5, 1, 0, 0]]))
    assert [t.decode() for t in text.numpy()] == ["the movie", ". [UNK]"]


def test_each_tokenizer_reads_its_own_vocabulary(tmp_path):
    """Tokenizers made one after another in one process, over two vocabularies
    in turn, each dropped while a handle of its table lives on (as a traced
    function's capture would keep it): every one maps the words by its own
    file. Tables shared by name made about a quarter of them answer with an
    earlier Tokenizer's vocabulary."""
    orders = {"abc": ["a", "b", "c"], "cba": ["c", "b", "a"]}
    for name, words in orders.items():
        write_vocab(["", "[UNK]"] + words, tmp_path / f"{name}.txt")
    handles, wrong = [], []
    for i in range(60):
        name = "abc" if i % 2 == 0 else "cba"
        tok = Tokenizer(tmp_path / f"{name}.txt")
        ids = tok(tf.constant(["a b c"])).to_list()[0]
        expected = [orders[name].index(w) + 2 for w in "abc"]
        if ids != expected:
            wrong.append((i, ids, expected))
        handles.append(tok.to_id.resource_handle)
        del tok  # frees its file object, whose address the next one may get
    assert not wrong, wrong[:3]


def _names(docs):
    return sorted(d.name.split("aclImdb/")[-1] for d in docs)


def test_imdb_folder_reads_four_splits_and_unsup_only_on_request(tmp_path):
    base = write_imdb_tree(tmp_path, per_split=3, unsup=2)
    (base / "imdb.vocab").write_text("the\nmovie\n")
    (base / "README").write_text("readme")
    docs = read_corpus(base)
    assert len(docs) == 12
    assert all("unsup" not in d.name for d in docs)
    with_unsup = read_corpus(base, imdb_unsup=True)
    assert len(with_unsup) == 14
    # The parent folder (holding aclImdb/) reads the same reviews.
    assert _names(read_corpus(tmp_path)) == _names(docs)


def test_official_and_shared_archive_layouts(tmp_path):
    base = write_imdb_tree(tmp_path / "src", per_split=2, unsup=3)
    official = tar_folder(
        base,
        tmp_path / "aclImdb_v1.tar.gz",
        extra={"aclImdb/imdb.vocab": "the\n", "aclImdb/README": "x", "aclImdb/train/labeledBow.feat": "0:1"},
    )
    docs = read_corpus(official)
    assert len(docs) == 8 and all("unsup" not in d.name for d in docs)
    assert len(read_corpus(official, imdb_unsup=True)) == 11
    # The development archive: the same four folders and nothing else.
    import shutil

    shutil.rmtree(base / "train" / "unsup")
    shared = tar_folder(base, tmp_path / "aclImdb.tar.gz")
    assert _names(read_corpus(shared)) == _names(docs)
    assert [d.text for d in read_corpus(shared)] == [d.text for d in docs]


def test_plain_folder_of_txt_files_recursive_and_single_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.txt").write_text("first line\nsecond line\n")
    (tmp_path / "a" / "b" / "two.txt").write_text("third")
    (tmp_path / "a" / "skip.md").write_text("not text")
    docs = read_corpus(tmp_path / "a")
    assert [d.name for d in docs] == ["b/two.txt", "one.txt"]
    assert split_lines(docs) == ["third", "first line", "second line", ""]
    single = read_corpus(tmp_path / "a" / "one.txt")
    assert len(single) == 1 and single[0].text.startswith("first")


def test_gzip_text_files_alone_in_folders_and_in_archives(tmp_path):
    import gzip
    import tarfile

    text = "first line\nsecond caf\u00e9 line\n"
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    docs = read_corpus(tmp_path / "a.txt.gz")
    assert [(d.name, d.text) for d in docs] == [("a.txt.gz", text)]  # decompressed, not decoded as bytes
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "b.txt").write_text("plain\n")
    (folder / "a.txt.gz").write_bytes(gzip.compress(b"packed\n"))
    assert [(d.name, d.text) for d in read_corpus(folder)] == [("a.txt.gz", "packed\n"), ("b.txt", "plain\n")]
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        tar.add(folder, arcname="f")
    assert [d.text for d in read_corpus(tmp_path / "t.tar")] == ["packed\n", "plain\n"]
    whole = gzip.compress(" ".join(str(i) for i in range(5000)).encode())
    (tmp_path / "broken.txt.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(errors.UserError, match="not a readable gzip file"):
        read_corpus(tmp_path / "broken.txt.gz")


def test_several_paths_and_globs(tmp_path):
    import os

    for name in ("b.txt", "a.txt", "c.log"):
        (tmp_path / name).write_text(name)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "z.txt").write_text("z")
    docs = read_corpus(f"{tmp_path / 'd'}{os.pathsep}{tmp_path / '*.txt'}")
    assert [d.text for d in docs] == ["z", "a.txt", "b.txt"]  # in the order given, a glob's matches sorted
    with pytest.raises(errors.UserError, match="matches no file"):
        read_corpus(str(tmp_path / "*.csv"))
    with pytest.raises(errors.UserError, match="no such file"):
        read_corpus(f"{tmp_path / 'a.txt'}{os.pathsep}{tmp_path / 'missing.txt'}")


def test_bad_paths_and_non_utf8(tmp_path):
    with pytest.raises(errors.UserError, match="no such file"):
        read_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.UserError, match="no .txt files"):
        read_corpus(tmp_path / "empty")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "bad.txt").write_bytes(b"caf\xe9 ok\n")
    (tmp_path / "t" / "good.txt").write_text("fine\n")
    with log_messages() as messages:
        docs = read_corpus(tmp_path / "t")
    assert docs[0].text == "caf\ufffd ok\n"
    assert len(messages) == 1 and "1 file(s)" in messages[0]


def test_split_is_deterministic_and_holds_out_files(tmp_path):
    docs = [TextDocument(f"{i}.txt", f"review {i}") for i in range(100)]
    a = train_val_split(docs, 0.1, seed=3)
    b = train_val_split(docs, 0.1, seed=3)
    c = train_val_split(docs, 0.1, seed=4)
    assert a == b and a != c
    assert len(a[1]) == 10 and len(a[0]) == 90
    assert not set(a[0]) & set(a[1])
    assert train_val_split(docs, 0.0, seed=3)[1] == []
    # A single document is split by lines.
    one = [TextDocument("all.txt", "\n".join(f"l{i}" for i in range(50)))]
    train, val = train_val_split(one, 0.1, seed=0)
    assert len(val) == 5 and len(train) == 45


@pytest.mark.parametrize(
    "n, fraction, count", [(100, 0.1, 10), (100, 0.001, 1), (100, 0.0, 0), (7, 0.5, 4), (50, 0.03, 2)]
)
def test_held_out_takes_the_rounded_share_and_at_least_one(n, fraction, count):
    val = held_out(n, fraction, seed=5)
    assert len(val) == count and len(set(val.tolist())) == count
    assert val.tolist() == sorted(val.tolist()) and all(0 <= i < n for i in val.tolist())


@pytest.mark.parametrize("n, fraction", [(1, 0.1), (2, 0.9), (10, 0.96)])
def test_held_out_refuses_to_leave_no_training_data(n, fraction):
    with pytest.raises(errors.UserError, match=f"leaves no training data \\({n} documents\\)"):
        held_out(n, fraction, seed=0)


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_caches(tmp_path, server, monkeypatch):
    base = write_imdb_tree(tmp_path / "src", per_split=1)
    archive = tar_folder(base, tmp_path / "a.tar.gz")
    _Handler.payload = archive.read_bytes()
    url = f"http://127.0.0.1:{server.server_port}/aclImdb_v1.tar.gz"
    sha = hashlib.sha256(_Handler.payload).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)  # no ./aclImdb here
    got = resolve_imdb(url, sha, cache)
    assert got == cache / "aclImdb_v1.tar.gz" and got.read_bytes() == _Handler.payload
    assert len(read_corpus(got)) == 4
    # Cached now: no second download even with a wrong URL.
    assert resolve_imdb("http://127.0.0.1:1/none", sha, cache) == got


def test_download_checksum_mismatch_deletes_file(tmp_path, server, monkeypatch):
    _Handler.payload = b"not the archive"
    url = f"http://127.0.0.1:{server.server_port}/x.tar.gz"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UserError, match="checksum mismatch"):
        resolve_imdb(url, IMDB_SHA256, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_without_network_says_pass_data(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UserError, match="--data PATH"):
        resolve_imdb(f"http://127.0.0.1:{port}/a.tar.gz", IMDB_SHA256, tmp_path / "c")


def test_local_acl_imdb_folder_is_used_first(tmp_path, monkeypatch):
    write_imdb_tree(tmp_path, per_split=1)
    monkeypatch.chdir(tmp_path)
    assert str(resolve_imdb("http://127.0.0.1:1/none", "0", tmp_path / "c")) == "aclImdb"


def test_truncate_windows():
    ids = np.array([5, 6, 7, 8, 9, 3, 4, 2], np.int32)
    lengths = np.array([5, 1, 2], np.int64)  # rows: 5 6 7 8 9 | 3 | 4 2
    w = make_windows(ids, lengths, maxlen=3, packing="truncate")
    np.testing.assert_array_equal(w, [[5, 6, 7, 8], [4, 2, 0, 0]])
    x, y, weight = split_window(tf.constant(w), "truncate")
    np.testing.assert_array_equal(x, [[5, 6, 7], [4, 2, 0]])
    np.testing.assert_array_equal(y, [[6, 7, 8], [2, 0, 0]])
    np.testing.assert_array_equal(weight, [[1, 1, 1], [1, 0, 0]])


def test_pack_windows_keep_every_token_once():
    ids = np.array([5, 6, 7, 8, 9, 3, 4, 2], np.int32)
    lengths = np.array([5, 1, 2], np.int64)
    w = make_windows(ids, lengths, maxlen=3, packing="pack")
    stream = [5, 6, 7, 8, 9, 0, 3, 0, 4, 2, 0]
    np.testing.assert_array_equal(w, [stream[0:4], stream[3:7], stream[6:10]])
    _, y, weight = split_window(tf.constant(w), "pack")
    assert np.asarray(y).ravel().tolist() == stream[1:10]  # each target once, in order
    assert float(tf.reduce_min(weight)) == 1.0


def _batches(ds):
    return [tuple(t.numpy() for t in b) for b in ds]


def test_train_dataset_order_is_a_function_of_seed_and_epoch():
    windows = np.arange(40 * 5, dtype=np.int32).reshape(40, 5)
    a = _batches(train_dataset(windows, 8, seed=1, epoch=0, packing="truncate"))
    b = _batches(train_dataset(windows, 8, seed=1, epoch=0, packing="truncate"))
    c = _batches(train_dataset(windows, 8, seed=1, epoch=1, packing="truncate"))
    assert len(a) == 5 and all(x[0].shape == (8, 4) for x in a)
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))
    seen = np.sort(np.concatenate([x[0][:, 0] for x in a]))
    np.testing.assert_array_equal(seen, np.sort(windows[:, 0]))  # a permutation
    skipped = _batches(train_dataset(windows, 8, seed=1, epoch=0, packing="truncate", skip=2))
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(a[2:], skipped))


def test_replica_slices_reassemble_the_global_batch():
    windows = np.arange(32 * 5, dtype=np.int32).reshape(32, 5)
    full = _batches(train_dataset(windows, 8, seed=2, epoch=0, packing="truncate"))
    # Two workers with two replicas each: every worker yields its replicas' slices in order.
    parts = []
    for worker in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=4)
        parts.append(_batches(train_dataset(windows, 8, seed=2, epoch=0, packing="truncate", input_context=ctx)))
    for step, batch in enumerate(full):
        pieces = [parts[w][2 * step + r][0] for w in range(2) for r in range(2)]
        assert all(p.shape == (2, 4) for p in pieces)
        np.testing.assert_array_equal(np.concatenate(pieces), batch[0])
    with pytest.raises(errors.UserError, match="not divisible"):
        ctx = tf.distribute.InputContext(1, 0, 3)
        train_dataset(windows, 8, seed=2, epoch=0, packing="truncate", input_context=ctx)


def test_eval_dataset_pads_with_zero_weight_windows():
    windows = np.ones([10, 5], np.int32)
    for packing in ("truncate", "pack"):
        batches = _batches(eval_dataset(windows, 4, packing))
        assert len(batches) == 3
        assert sum(float(b[2].sum()) for b in batches) == 10 * 4


def test_batches_per_epoch_drops_the_partial_batch_and_refuses_none():
    assert batches_per_epoch(300, 128) == 2
    with pytest.raises(errors.UserError, match="fewer than one global batch of 128"):
        batches_per_epoch(127, 128)
