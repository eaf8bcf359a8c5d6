"""The subword tokenizer through train.py, the run directory, the sampler,
the export, generate, evaluate and prepare: texts keep their case and
spacing end to end, a run keeps its tokenizer, and word runs and stores are
what they were."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, run_python

from tfgpt.cli import main
from tfgpt.config import GPTConfig, TrainConfig, save_config
from tfgpt.data import prepare, sources
from tfgpt.data.store import VERSION
from tfgpt.data.subword import SubwordVocab, train_subword
from tfgpt.model.gpt import GPT
from tfgpt.serving import evaluate as evaluate_cli
from tfgpt.serving import generate as generate_cli
from tfgpt.serving.sampler import Sampler
from tfgpt.train.summaries import sample_markdown

NAMES = ["Alpha", "beta", "GammaRay", "delta_x"]


def write_code_corpus(folder: Path, files: int = 4, seed: int = 0) -> Path:
    """Python-like files (.txt, and one .py read through a glob) whose case,
    indentation and runs of spaces matter."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        blocks = []
        for j in range(30):
            name = rng.choice(NAMES)
            blocks.append(f"def {name}_{j}(x, y):\n    if x  >  {j}:\n\treturn {name}(y) * {j}\n    return None\n")
        suffix = ".py" if i == files - 1 else ".txt"
        (folder / f"mod{i}{suffix}").write_text("\n".join(blocks))
    return folder


# --- the store key ---------------------------------------------------------------------


def test_a_word_store_keeps_its_key(tmp_path):
    """The key of a word store is the hash of the parameters it always had
    (written out here as they were before the tokenizer choice); subword
    stores get keys of their own."""
    path = tmp_path / "r.txt"
    path.write_text("one line\nanother line\n")
    paths = sources.expand(str(path))
    inputs = sources.input_files(paths, False)
    settings = dict(imdb_unsup=False, vocab_size=300, val_fraction=0.1, seed=0)
    before = dict(
        format=VERSION,
        data=[str(path.resolve())],
        inputs=[[f.path, f.size, f.mtime_ns] for f in inputs],
        imdb_unsup=False,
        vocab_size=300,
        val_fraction=0.1,
        seed=0,
        standardization=prepare.standardization_id(),
        vocab=None,
    )
    expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:24]
    word = prepare.store_params(paths, inputs, **settings, tokenizer="word")
    assert prepare.key_of(word) == expected
    assert prepare.key_of(prepare.store_params(paths, inputs, **settings)) == expected
    subword = prepare.store_params(paths, inputs, **settings, tokenizer="subword")
    assert subword["tokenizer"] == "subword" and prepare.key_of(subword) != expected
    assert prepare.family_of(subword) != prepare.family_of(word)  # neither is the other's stale store


def test_prepare_command_builds_a_subword_store(tmp_path, capsys):
    corpus = write_code_corpus(tmp_path / "code", files=3)
    out = tmp_path / "store"
    argv = ["--data", str(corpus), "--out", str(out), "--tokenizer", "subword", "--vocab-size", "300"]
    assert prepare.main(argv) == 0
    text = capsys.readouterr().out
    assert f"built {out}" in text and "subword vocabulary: 300 entries" in text
    vocab = SubwordVocab.load(out / "subword.json")
    assert vocab.size == 300 and not (out / "vocab.txt").exists()
    # Too small for the 256 bytes and id 0: one line.
    assert prepare.main(argv[:-1] + ["100", "--out", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.strip() == (
        "prepare: error: --vocab-size 100 is too small for subwords: it needs at least 257 (the 256 bytes and id 0)"
    )


# --- train.py's flags -----------------------------------------------------------------------


def test_resume_with_another_tokenizer_is_one_line(tmp_path, capsys):
    run = tmp_path / "logs" / "r"
    run.mkdir(parents=True)
    train = TrainConfig(tokenizer="subword", run_name="r", logdir=str(tmp_path / "logs"))
    save_config(run / "config.json", GPTConfig(vocab_size=300), train)
    assert main(["--logdir", str(tmp_path / "logs"), "--run-name", "r", "--resume", "--tokenizer", "word"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "train.py: error: --resume: --tokenizer word conflicts with the saved config.json (tokenizer = subword); "
        "leave it out or start a new run"
    )


def test_a_subword_vocabulary_needs_the_bytes(tmp_path, capsys):
    assert main(["--tokenizer", "subword", "--vocab-size", "256", "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "train.py: error: --vocab-size 256 is too small for subwords: it needs at least 257 (the 256 bytes and id 0)"
    ]


# --- the sampler ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subword_sampler(tmp_path_factory):
    """A random model on a subword vocabulary learned from the code corpus."""
    folder = write_code_corpus(tmp_path_factory.mktemp("corpus") / "code", files=2)
    texts = [p.read_text() for p in sorted(folder.iterdir())]
    vocab = train_subword(iter(texts), 320)
    path = tmp_path_factory.mktemp("vocab") / "subword.json"
    vocab.save(path)
    config = GPTConfig(vocab_size=vocab.size, maxlen=10, embed_dim=16, num_heads=2, ff_dim=16, dropout=0.0)
    model = GPT(config, seed=2)
    return Sampler(model, str(path)), vocab, model


def generate(sampler, prompts, max_tokens=6, seed=1):
    n = len(prompts)
    return sampler.generate(
        prompt=tf.constant(prompts),
        max_tokens=tf.fill([n], max_tokens),
        top_k=tf.fill([n], 20),
        top_p=tf.fill([n], 1.0),
        temperature=tf.fill([n], 1.0),
        repetition_penalty=tf.fill([n], 1.0),
        seed=tf.range(seed, seed + n, dtype=tf.int64),
    )


def test_subword_text_is_the_prompt_then_the_completion(subword_sampler):
    sampler, vocab, _ = subword_sampler
    prompts = ["  def GammaRay(x):\n\treturn  X", "Ünïcode  ", "x"]
    out = generate(sampler, prompts, max_tokens=6)
    for prompt, text, completion, ids, n in zip(
        prompts, out["text"].numpy(), out["completion"].numpy(), out["token_ids"].numpy(), out["lengths"].numpy()
    ):
        text, completion = text.decode(), completion.decode()
        assert text == prompt + completion  # no space put between them, none taken away
        assert completion == vocab.decode(ids[:n])  # the offline decoder's text of the ids
        assert n == 6 or (n < 6 and ids[n:].sum() == 0)


def test_subword_prompts_need_a_token(subword_sampler):
    sampler, _, _ = subword_sampler
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        generate(sampler, ["x", ""])
    assert "every prompt needs at least one token" in str(raised.value) and "row 1" in str(raised.value)


def test_subword_score_is_the_models_log_probability(subword_sampler):
    """score against the model's forward pass over the offline encoder's ids."""
    sampler, vocab, model = subword_sampler
    text = "def Alpha(x):\n  return"
    ids = vocab.encode(text)
    assert 2 <= len(ids) <= model.config.maxlen
    out = sampler.score(tf.constant([text]))
    logits = model(tf.constant([ids]))[0].numpy().astype(np.float64)  # [T, V]
    top = logits.max(-1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # log softmax
    expected = sum(log_p[i - 1, ids[i]] for i in range(1, len(ids)))
    assert int(out["num_tokens"].numpy()[0]) == len(ids) - 1
    np.testing.assert_allclose(out["log_prob"].numpy()[0], expected, rtol=1e-4, atol=1e-4)


def test_exact_sample_markdown_keeps_spacing():
    md = sample_markdown("def f(x):", ["def f(x):\n    return  x"], "4 tokens", exact=True)
    first = md.split("\n\n")[0]
    assert first == "**def f\\(x\\):**  \n&nbsp;&nbsp;&nbsp;&nbsp;return &nbsp;x"


# --- end to end -----------------------------------------------------------------------------

# Loads an export with TensorFlow alone and prints what its signatures return, as JSON.
LOAD_EXPORT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    prompts = json.loads(sys.argv[2])
    served = model.signatures["serving_default"](prompt=tf.constant(prompts))
    n = len(prompts)
    generated = model.generate(
        prompt=tf.constant(prompts), max_tokens=tf.fill([n], 5), top_k=tf.fill([n], 10),
        top_p=tf.fill([n], 1.0), temperature=tf.fill([n], 1.0), repetition_penalty=tf.fill([n], 1.0),
        seed=tf.range(n, dtype=tf.int64))
    scored = model.score(text=tf.constant(prompts))
    print(json.dumps({
        "served": [t.decode() for t in served["text"].numpy()],
        "generated": [t.decode() for t in generated["text"].numpy()],
        "num_tokens": scored["num_tokens"].numpy().tolist(),
        "tfgpt": sorted(m for m in sys.modules if m.split(".")[0] == "tfgpt"),
    }))
    """
)


@pytest.mark.slow
def test_train_export_and_serve_a_subword_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFGPT_CACHE", str(tmp_path / "cache"))
    corpus = write_code_corpus(tmp_path / "code", files=4)
    data = f"{corpus}:{corpus}/*.py"  # the folder's .txt files, and the .py file by a glob
    logs = tmp_path / "logs"
    argv = ["--data", data, "--tokenizer", "subword", "--vocab-size", "300", "--max-steps", "2"]
    argv += "--batch-size 8 --maxlen 16 --embed-dim 16 --ff-dim 16 --gen-tokens 4 --peak-flops 1e11".split()
    argv += ["--prompt", "def GammaRay(", "--logdir", str(logs), "--run-name", "s"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    run = logs / "s"
    assert "subword vocabulary: 300 entries (byte-level BPE), kept as subword.json" in out
    assert "sample: def GammaRay(" in out  # the prompt as given: its case kept
    assert json.loads((run / "config.json").read_text())["train"]["tokenizer"] == "subword"
    assert (run / "subword.json").is_file() and not (run / "vocab.txt").exists()
    export = run / "export" / "1"
    assert (export / "assets" / "subword.json").read_bytes() == (run / "subword.json").read_bytes()
    assert "tokenizer is subword" in (run / "export" / "models.config").read_text()

    # The export, in a process with TensorFlow alone.
    prompts = ["  def  GammaRay(X):\n\tReturn", "Beta"]
    done = run_python(["-c", LOAD_EXPORT, str(export), json.dumps(prompts)], cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["tfgpt"] == []
    for key in ("served", "generated"):
        for prompt, text in zip(prompts, got[key]):
            assert text.startswith(prompt) and len(text) > len(prompt), (key, prompt, text)
    vocab = SubwordVocab.load(run / "subword.json")
    assert got["num_tokens"] == [len(vocab.encode(p)) - 1 for p in prompts]

    # generate --stream prints the text generate prints.
    common = [str(export), "--prompt", "def  Alpha", "--max-tokens", "6", "--seed", "5"]
    assert generate_cli.main(common) == 0
    whole = capsys.readouterr().out
    assert whole.startswith("def  Alpha")
    assert generate_cli.main(common + ["--stream"]) == 0
    assert capsys.readouterr().out == whole
    loaded = tf.saved_model.load(str(export))
    args = argparse.Namespace(max_tokens=6, top_k=10, top_p=1.0, temperature=1.0, repetition_penalty=1.0)
    parts = io.StringIO()
    generate_cli.stream(loaded, "def  Alpha", args, 5, out=parts, exact=True)
    assert parts.getvalue() == whole

    # evaluate scores the run's documents, from the run directory and from the export alike.
    figures = []
    for model in (run, export):
        assert evaluate_cli.main([str(model), "--data", str(corpus), "--windows", "sliding"]) == 0
        figures.append(capsys.readouterr().out)
    assert figures[0].startswith("3 texts,") and figures[1].startswith("3 texts,")

    # The run keeps its tokenizer: another one is refused, in one line.
    resume = ["--logdir", str(logs), "--run-name", "s", "--resume"]
    assert main(resume + ["--tokenizer", "word"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer word conflicts" in err[0] and "tokenizer = subword" in err[0]
