"""`python -m tfgpt.evaluate`: the held-out loss of a run directory and of
its export, against a reference computed from the model's full forward pass,
one target at a time."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import tensorflow as tf
from helpers import TINY, write_imdb_tree

from tfgpt.config import GPTConfig, TrainConfig, save_config
from tfgpt.data.text import PAD, UNK, write_vocab
from tfgpt.model.gpt import GPT
from tfgpt.serving import evaluate as evaluate_cli
from tfgpt.serving.export import export_run

WORDS = [PAD, UNK] + [f"w{i}" for i in range(2, 30)]
CONFIG = GPTConfig(vocab_size=len(WORDS), maxlen=6, embed_dim=16, num_heads=2, ff_dim=16, dropout=0.0)


def reference_loss(model: GPT, texts: list[str], max_tokens: int | None) -> tuple[float, int]:
    """Mean -log p over every token but the first of each text (cut to
    max_tokens), each from at most maxlen tokens before it; unknown words are [UNK]."""
    total, count, n = 0.0, 0, CONFIG.maxlen
    for text in texts:
        ids = [WORDS.index(w) if w in WORDS else 1 for w in text.split()][:max_tokens]
        # Targets 1..n from one causal pass over the first n tokens, then each
        # later target from its own window of the n tokens before it.
        first = tf.nn.log_softmax(model(tf.constant([ids[:n]]))[0]).numpy()
        total -= sum(first[i - 1, ids[i]] for i in range(1, min(len(ids), n + 1)))
        for i in range(n + 1, len(ids)):
            total -= float(tf.nn.log_softmax(model(tf.constant([ids[i - n : i]]))[0, -1])[ids[i]])
        count += len(ids) - 1
    return total / count, count


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a random model's checkpoint, and its export."""
    root = tmp_path_factory.mktemp("run")
    model = GPT(CONFIG, seed=3)
    for v in model.trainable_variables:  # sharper logits than a fresh model's
        v.assign(v * 3.0)
    write_vocab(WORDS, root / "vocab.txt")
    save_config(root / "config.json", CONFIG, TrainConfig(precision="float32", compute_precision="float32"))
    tf.train.Checkpoint(model=model).write(str(root / "ckpt" / "ckpt-7"))
    (root / "ckpt" / "checkpoint").write_text('model_checkpoint_path: "ckpt-7"\n')
    export_run(root)
    return root, model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(5)
    lines = [" ".join(rng.choice(WORDS[2:] + ["Unknown"]) for _ in range(rng.randint(2, 15))) for _ in range(40)]
    lines += ["w3", "", "W4 w5, w6!"]  # one word and none: nothing to score; punctuation: tokens of its own
    path = tmp_path_factory.mktemp("data") / "held_out.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


@pytest.mark.parametrize("windows", ["truncate", "sliding"])
@pytest.mark.parametrize("target", ["run", "export"])
def test_loss_per_token_matches_the_full_model(run, corpus, tmp_path, windows, target, capsys):
    root, model = run
    path, lines = corpus
    texts = evaluate_cli.cut_texts(lines, None)  # standardized (tested below); the reference cuts them
    want, count = reference_loss(model, texts, CONFIG.maxlen + 1 if windows == "truncate" else None)
    assert any(len(t.split()) > CONFIG.maxlen + 1 for t in texts)  # truncation and sliding both matter
    out_json = tmp_path / "out.json"
    model_dir = root if target == "run" else root / "export" / "1"
    assert evaluate_cli.main([str(model_dir), "--data", str(path), "--windows", windows, "--json", str(out_json)]) == 0
    got = json.loads(out_json.read_text())
    assert got["tokens"] == count and got["texts"] == len(texts) == len(lines) - 2
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)
    assert f"loss {got['loss']:.4f} nats per token" in capsys.readouterr().out


def test_cut_texts_standardizes_and_truncates():
    assert evaluate_cli.cut_texts(["Don't STOP<br />now, ok", "one", "a b c d"], 4) == ["don 't stop now", "a b c d"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/run"], "no such file or directory"),
        (["{tmp}"], "neither a run directory (no config.json) nor a SavedModel"),
        (["{run}", "--limit", "0"], "--limit must be positive"),
        (["{export}", "--step", "3"], "--step applies to a run directory"),
        (["{run}", "--step", "3"], "no checkpoint for step 3"),
        (["{bare}"], "vocab.txt is missing: is"),
    ],
)
def test_bad_input_is_one_line(run, corpus, tmp_path, capsys, args, message):
    root, _ = run
    bare = tmp_path / "bare"  # a run directory without its vocabulary
    bare.mkdir()
    (bare / "config.json").write_text((root / "config.json").read_text())
    args = [a.format(tmp=tmp_path, run=root, export=root / "export" / "1", bare=bare) for a in args]
    assert evaluate_cli.main(args + ["--data", str(corpus[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("evaluate: error: ") and message in err


@pytest.mark.slow
def test_heldout_protocol_trains_in_a_process_of_its_own(tmp_path, monkeypatch):
    """The protocol's training runs as `python -m tfgpt.cli` (found as an
    installed module, from any folder), then its test reviews are scored."""
    base = write_imdb_tree(tmp_path / "src", per_split=8)
    monkeypatch.setattr(evaluate_cli, "PROTOCOL_TEST", 8)
    monkeypatch.chdir(tmp_path)
    result = evaluate_cli.heldout_protocol(base, [*TINY, "--batch-size", "4"], steps=2)
    assert result["steps"] == 2 and result["texts"] == 8 and result["tokens"] > 8
    assert math.isfinite(result["loss"]) and result["perplexity"] == pytest.approx(math.exp(result["loss"]))
