"""Finding, reusing and rebuilding token stores: the cache key, changed input,
damaged stores, a full disk, an interrupted build, `python -m tfgpt.prepare`,
and training on a store."""

import builtins
import hashlib
import os
import string
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, log_messages, run_python, write_corpus
from test_cli import ADDED, EXTENDED, REFERENCE, actions, unspaced, without_added

from tfgpt import errors
from tfgpt.cli import build_parser as build_train_parser
from tfgpt.data import prepare, store_build, text
from tfgpt.data.corpus import read_corpus, train_val_split
from tfgpt.data.text import Tokenizer, tokenize_lines, write_vocab
from tfgpt.data.windows import make_windows


def ensure(spec, tmp_path, messages=None, **kw):
    kw.setdefault("store_dir", tmp_path / "stores")
    kw.setdefault("vocab_size", 40)
    kw.setdefault("val_fraction", 0.1)
    with log_messages() as logged:
        prepared = prepare.ensure_store(str(spec), **kw)
    if messages is not None:
        messages.extend(logged)
    return prepared


def stores(tmp_path) -> list[Path]:
    """Every entry of the cache folder but the lock files."""
    return sorted(p for p in (tmp_path / "stores").iterdir() if not p.name.endswith(".lock"))


def all_windows(store, split="train", packing="pack"):
    w = store.windows(split, 8, packing)
    return w.read(np.arange(len(w)))


def test_second_call_reuses_the_store(tmp_path):
    path = write_corpus(tmp_path / "r.txt", 100)
    first = ensure(path, tmp_path)
    assert first.action == "built"
    second = ensure(path, tmp_path)
    assert second.action == "reused" and second.store.root == first.store.root
    # Other settings are another store; the key covers each of them.
    for change in (dict(vocab_size=30), dict(val_fraction=0.2), dict(seed=1), dict(imdb_unsup=True)):
        assert ensure(path, tmp_path, **change).store.root != first.store.root, change


def test_changed_input_gives_a_new_store_and_drops_the_stale_one(tmp_path):
    path = write_corpus(tmp_path / "r.txt", 100)
    old = ensure(path, tmp_path).store
    before = all_windows(old)
    with open(path, "a") as f:
        f.write("a brand new line with new words\n")
    messages = []
    new = ensure(path, tmp_path, messages)
    assert new.action == "built" and new.store.root != old.root
    assert "brand" in new.store.vocab()
    assert len(all_windows(new.store)) > len(before)
    assert stores(tmp_path) == [new.store.root]  # the stale store is gone
    assert any("older version" in m for m in messages)
    # Same size, other content, other modification time: a new store too.
    text = path.read_text().replace("brand", "BRAND")
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert ensure(path, tmp_path).store.root != new.store.root


# Each step of the standardization changed so that it changes the words of SAMPLE.
SAMPLE = "Émile<br />said:\x00Fine, ok!"
STEP_EDITS = [
    ("replace", "\\x00", " nul "),
    ("lower", ""),  # ASCII only: "É" stays
    ("replace", "<br />", " br "),
    ("replace", "([,:])", r" \1"),  # fewer punctuation characters
]


def test_the_store_key_follows_every_step_of_the_standardization(tmp_path, monkeypatch):
    """The key names text.STANDARDIZE, the steps `standardize` applies: a
    change of any one step changes the words and the key, so a store built
    with other steps is not reused. The present steps keep the key that
    stores already built have (the rules as they are spelled out below)."""
    punct = "[" + "".join("\\" + c for c in string.punctuation) + "]"
    rules = f"1|{punct}|<br />|lower utf-8|nul|{tf.__version__}"
    assert prepare.standardization_id() == hashlib.sha256(rules.encode()).hexdigest()[:16]

    def words():
        return [w.decode() for w in text.split_words(tf.constant([SAMPLE]))[0].numpy()]

    def key():
        return prepare.key_of(prepare.store_params([], [], imdb_unsup=False, vocab_size=40, val_fraction=0.1, seed=0))

    assert words() == ["émile", "said", ":", "fine", ",", "ok", "!"]
    seen = {key()}
    original = text.STANDARDIZE
    assert len(STEP_EDITS) == len(original)
    for i, edit in enumerate(STEP_EDITS):
        assert edit != original[i] and edit[0] == original[i][0]
        monkeypatch.setattr(text, "STANDARDIZE", original[:i] + (edit,) + original[i + 1 :])
        assert words() != ["émile", "said", ":", "fine", ",", "ok", "!"], edit
        seen.add(key())
        assert len(seen) == i + 2, edit

    path = write_corpus(tmp_path / "r.txt", 60)
    monkeypatch.setattr(text, "STANDARDIZE", original)
    first = ensure(path, tmp_path).store
    monkeypatch.setattr(text, "STANDARDIZE", original[:2] + (STEP_EDITS[2],) + original[3:])
    other = ensure(path, tmp_path)
    assert other.action == "built" and other.store.root != first.root
    assert "br" in other.store.vocab() and "br" not in first.vocab()


@pytest.mark.parametrize("damage", ["truncate", "delete", "same_size", "manifest"])
def test_damaged_store_is_rebuilt_with_a_warning(tmp_path, damage):
    path = write_corpus(tmp_path / "r.txt", 100)
    store = ensure(path, tmp_path, shard_tokens=200).store
    expected = all_windows(store)
    shard = store.root / store.split("train")["shards"][1]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-6])
    elif damage == "delete":
        (store.root / "train.starts").unlink()
    elif damage == "same_size":
        raw = bytearray(shard.read_bytes())
        raw[10] ^= 0xFF
        shard.write_bytes(bytes(raw))  # a new modification time: the checksum is checked
    else:
        (store.root / "manifest.json").write_text("{not json")
    messages = []
    again = ensure(path, tmp_path, messages, shard_tokens=200)
    assert again.action == "rebuilt"
    assert any(m.startswith("warning:") and "damaged" in m for m in messages), messages
    np.testing.assert_array_equal(all_windows(again.store), expected)


def full_disk_for(monkeypatch, suffix: str):
    """Store files whose name ends with suffix are written to /dev/full: the
    kernel fails their writes with ENOSPC."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kw):
        if "w" in mode and str(file).endswith(suffix):
            return real_open("/dev/full", mode, *args, **kw)
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(store_build, "open", fake_open, raising=False)


def test_full_disk_is_one_error_and_leaves_no_store(tmp_path, monkeypatch):
    """The second shard's file is /dev/full: its writes fail with ENOSPC,
    from the kernel."""
    path = write_corpus(tmp_path / "r.txt", 200)
    full_disk_for(monkeypatch, "train-00001.u32")
    with pytest.raises(errors.UserError) as e:
        ensure(path, tmp_path, shard_tokens=300)
    message = str(e.value)
    assert "no space left" in message and "nothing was kept" in message and "\n" not in message
    assert stores(tmp_path) == []  # neither a store nor a temporary folder
    assert not list((tmp_path / "stores").glob(".*tmp*"))
    monkeypatch.undo()
    assert ensure(path, tmp_path, shard_tokens=300).action == "built"


def test_prepare_command_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    path = write_corpus(tmp_path / "r.txt", 50)
    full_disk_for(monkeypatch, ".u32")
    out = tmp_path / "store"
    assert prepare.main(["--data", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: error: no space left"), err
    assert not out.exists() and not list(tmp_path.glob(".store*tmp*"))


def test_interrupted_build_leaves_nothing_and_the_next_one_builds(tmp_path, monkeypatch):
    path = write_corpus(tmp_path / "r.txt", 200)
    calls = []
    real = store_build.split_streams

    def interrupt(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(store_build, "split_streams", interrupt)
    monkeypatch.setattr(store_build, "CHUNK_BYTES", 500)
    with pytest.raises(KeyboardInterrupt):
        ensure(path, tmp_path)
    assert stores(tmp_path) == []
    # A build killed without any clean-up leaves its temporary folder: the next
    # build of the same store removes it.
    monkeypatch.undo()
    leftover = tmp_path / "stores" / f".{prepare.key_of(_params(path))}.tmp-999999"
    leftover.mkdir()
    (leftover / "train-00000.u32").write_bytes(b"half")
    assert ensure(path, tmp_path).action == "built"
    assert not leftover.exists()


def _params(path):
    from tfgpt.data import sources

    paths = sources.expand(str(path))
    return prepare.store_params(
        paths, sources.input_files(paths, False), imdb_unsup=False, vocab_size=40, val_fraction=0.1, seed=0
    )


def test_resumed_run_keeps_its_vocabulary(tmp_path):
    """A run's vocab.txt that the (changed) corpus no longer gives: the store
    holds that vocabulary's ids, as today's Tokenizer would give them."""
    path = write_corpus(tmp_path / "r.txt", 120)
    own = ensure(path, tmp_path).store
    assert ensure(path, tmp_path, vocab=own.vocab()).store.root == own.root  # the same vocabulary: the same store
    given = ["", "[UNK]", "the", "movie", "is", ".", "bad", "good"] + [f"x{i}" for i in range(32)]
    store = ensure(path, tmp_path, vocab=given).store
    assert store.root != own.root and store.vocab() == given
    assert ensure(path, tmp_path, vocab=given).action == "reused"
    assert ensure(path, tmp_path).action == "reused"  # both stores are kept
    write_vocab(given, tmp_path / "given.txt")
    tok = Tokenizer(tmp_path / "given.txt")
    train, _ = train_val_split(read_corpus(path), 0.1, 0)
    ids, lengths = tokenize_lines(tok, train)
    np.testing.assert_array_equal(all_windows(store, packing="truncate"), make_windows(ids, lengths, 8, "truncate"))


def test_named_store_is_used_as_it_is_and_rebuilt_when_its_input_changes(tmp_path):
    path = write_corpus(tmp_path / "r.txt", 100)
    out = tmp_path / "mystore"
    assert prepare.main(["--data", str(path), "--out", str(out), "--vocab-size", "40"]) == 0
    messages = []
    named = ensure(out, tmp_path, messages)
    assert named.action == "reused" and named.store.root == out and not (tmp_path / "stores").exists()
    with open(path, "a") as f:
        f.write("another line entirely\n")
    again = ensure(out, tmp_path, messages)
    assert again.action == "rebuilt" and "entirely" in again.store.vocab()
    assert any("changed" in m and "rebuilding" in m for m in messages), messages
    # Without its input it is used as it is.
    path.unlink()
    assert ensure(out, tmp_path).action == "reused"


def test_prepare_command_prints_its_messages(tmp_path):
    """`python -m tfgpt.prepare` in a process of its own: the warning about a
    damaged store reaches stdout, as the summary does."""
    path = write_corpus(tmp_path / "r.txt", 100)
    out = tmp_path / "s"
    assert prepare.main(["--data", str(path), "--out", str(out)]) == 0
    (out / "train.starts").unlink()
    done = run_python(["-m", "tfgpt.prepare", "--data", str(path), "--out", str(out)], cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"warning: the token store {out} is damaged (") and lines[0].endswith("; rebuilding it")
    assert lines[1].startswith(f"token store: rebuilt {out} in ")


def test_prepare_flags_are_the_reference_with_train_py_s_texts(monkeypatch):
    """The command line of prepare is the reference's (tests/data/cli_reference.json,
    see tests/test_cli.py), but the flags it shares with train.py now say what
    train.py's say: their help texts, like their defaults, come from the
    configs; --tokenizer, added since, is train.py's."""
    monkeypatch.setenv("COLUMNS", "80")
    parser = prepare.build_parser()
    assert without_added(actions(parser)) == REFERENCE["prepare_actions"]
    parsed = vars(parser.parse_args(["--data", "x"]))
    assert parsed.pop("tokenizer") == "word" and parsed == REFERENCE["prepare_parsed_defaults"]
    train_help = " ".join(REFERENCE["train_help"].split())
    expected = " ".join(REFERENCE["prepare_help"].split())
    for own, shared in [
        ("usage: python -m tfgpt.prepare", "usage: prepare"),  # the prog its errors name too
        ("the cache of stores (default:", "where token stores are kept (default:"),
        ("vocabulary entries (default: 20000)", "vocabulary entries, including padding and [UNK] (default: 20000)"),
        (
            "share of the documents held out (default: 0.02)",
            "fraction of files held out for validation; 0 for none (default: 0.02)",
        ),
    ]:
        assert expected.count(own) == 1 and (shared in train_help or own.startswith("usage"))
        expected = expected.replace(own, shared)
    shown = parser.format_help()
    tokenizer = [b for b in shown.split("\n  --") if b.startswith("tokenizer ")]
    train_tokenizer = [b for b in build_train_parser().format_help().split("\n  --") if b.startswith("tokenizer ")]
    assert len(tokenizer) == 1 and tokenizer == train_tokenizer  # train.py's --tokenizer, word for word
    # Without the added flag and words, the rest is the reference with train.py's texts.
    rest = unspaced(shown.replace("\n  --" + tokenizer[0], ""))
    extended = [words for flag, words in EXTENDED.items() if f"  {flag} " in shown]  # the flags prepare has
    for added in [*ADDED.values(), *extended]:
        assert rest.count(unspaced(added)) == 1, added
        rest = rest.replace(unspaced(added), "")
    assert rest == unspaced(expected)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vocab-size", "2"], "prepare: error: --vocab-size must be at least 3, got 2"),
        (["--val-fraction", "1"], "prepare: error: --val-fraction must be in [0, 1), got 1.0"),
        (["--workers", "0"], "prepare: error: --workers must be positive"),
    ],
)
def test_prepare_command_refuses_bad_values_in_one_line(tmp_path, capsys, flags, message):
    path = write_corpus(tmp_path / "c.txt", 20)
    assert prepare.main(["--data", str(path), "--out", str(tmp_path / "store")] + flags) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "store").exists()


def test_prepare_command(tmp_path, capsys):
    path = write_corpus(tmp_path / "r.txt", 100)
    out = tmp_path / "s"
    assert prepare.main(["--data", str(path), "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert f"built {out}" in text and "vocabulary" in text and "uint16" in text
    assert prepare.main(["--data", str(path), "--out", str(out)]) == 0
    assert f"reused {out}" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    cases = [
        (["--data", str(tmp_path / "nope.txt")], "no such file"),
        (["--data", str(tmp_path / "*.nothing")], "matches no file"),
        (["--data", str(path), "--out", str(tmp_path / "other")], "not a token store"),
        (["--data", str(path), "--val-fraction", "1.5"], "--val-fraction"),
        (["--data", str(path), "--vocab-size", "2"], "--vocab-size"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((["--data", str(tmp_path / "empty")], "no .txt files"))
    import gzip

    whole = gzip.compress(path.read_bytes())
    (tmp_path / "broken.txt.gz").write_bytes(whole[: len(whole) // 2])
    cases.append((["--data", str(tmp_path / "broken.txt.gz")], "cannot read"))
    for argv, needle in cases:
        assert prepare.main(argv + ["--store-dir", str(tmp_path / "stores")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    one = tmp_path / "one_byte.txt"  # a single document is split by its bytes: one byte cannot be
    one.write_text("x")
    assert prepare.main(["--data", str(one), "--val-fraction", "0.9", "--store-dir", str(tmp_path / "st")]) == 2
    assert "leaves no training data" in capsys.readouterr().err


@pytest.mark.slow
def test_train_builds_then_reuses_and_trains_on_a_named_store(tmp_path, capsys, monkeypatch, no_samples):
    from tfgpt.cli import main

    monkeypatch.setenv("TFGPT_CACHE", str(tmp_path / "cache"))
    path = write_corpus(tmp_path / "r.txt", 200)
    tiny = [
        "--maxlen",
        "12",
        "--embed-dim",
        "16",
        "--ff-dim",
        "16",
        "--vocab-size",
        "60",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--gen-tokens",
        "3",
        "--peak-flops",
        "1e11",
        "--no-export",
        "--logdir",
        str(tmp_path / "logs"),
    ]
    assert main(["--data", str(path), "--run-name", "a"] + tiny) == 0
    out = capsys.readouterr().out
    assert "token store: built" in out and str(tmp_path / "cache" / "stores") in out
    assert main(["--data", str(path), "--run-name", "b"] + tiny) == 0
    assert "token store: reusing" in capsys.readouterr().out
    store_root = next(p for p in (tmp_path / "cache" / "stores").iterdir() if not p.name.startswith("."))
    assert (tmp_path / "logs" / "a" / "vocab.txt").read_text() == (store_root / "vocab.txt").read_text()
    assert main(["--data", str(store_root), "--run-name", "c"] + tiny) == 0
    assert "token store: reusing" in capsys.readouterr().out
    # A missing path is one line, exit status 2, as before.
    assert main(["--data", str(tmp_path / "missing.txt"), "--run-name", "d"] + tiny) == 2
    assert "no such file or directory" in capsys.readouterr().err
