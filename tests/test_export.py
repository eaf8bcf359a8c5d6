"""The exported SavedModel: its layout, a TensorFlow-only process that serves
it, saved_model_cli, and the export and generate commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfgpt import export as export_cli
from tfgpt import generate as generate_cli
from tfgpt.config import GPTConfig, TrainConfig, save_config
from tfgpt.data import PAD, UNK, read_vocab, write_vocab
from tfgpt.model import GPT
from tfgpt.sampler import SIGNATURES, export_model, next_version

WORDS = [PAD, UNK] + [f"w{i}" for i in range(2, 40)]
CONFIG = GPTConfig(vocab_size=len(WORDS), maxlen=8, embed_dim=16, num_heads=2, ff_dim=32,
                   num_layers=1, dropout=0.0, head_dim=8)
PROMPT = "w5 w9 w2"


def make_model(seed=1, scale=4.0) -> GPT:
    """A random model with well-separated logits that never samples the padding id."""
    model = GPT(CONFIG, seed=seed)
    for v in model.trainable_variables:
        v.assign(v * scale)
    model.head.b.assign(tf.tensor_scatter_nd_update(model.head.b, [[0]], [-1e9]))
    return model


def reference_greedy(model: GPT, text: str, steps: int) -> str:
    """Greedy continuation by the full model on the sliding sequence, no cache."""
    seq = [WORDS.index(w) for w in text.split()]
    for _ in range(steps):
        seq.append(int(np.argmax(model(tf.constant([seq[-CONFIG.maxlen:]]))[0, -1])))
    return " ".join(WORDS[i] for i in seq)


def reference_log_prob(model: GPT, text: str) -> float:
    ids = [WORDS.index(w) for w in text.split()]
    return sum(float(tf.nn.log_softmax(model(tf.constant([ids[max(0, i - CONFIG.maxlen):i]]))[0, -1])[ids[i]])
               for i in range(1, len(ids)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, export base, version dir). The vocabulary file it was exported
    from is deleted afterwards: the SavedModel must carry its own copy."""
    root = tmp_path_factory.mktemp("export")
    vocab = root / "vocab.txt"
    write_vocab(WORDS, vocab)
    model = make_model()
    path = export_model(model, vocab, root / "export")
    vocab.unlink()
    return model, root / "export", path


def test_export_writes_integer_versions(exported, tmp_path):
    model, base, path = exported
    assert path == base / "1"
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    assert read_vocab(path / "assets" / "vocab.txt") == WORDS
    assert [p.name for p in base.iterdir()] == ["1"]  # nothing half-written left behind

    (tmp_path / "4").mkdir()
    (tmp_path / "notes").mkdir()
    assert next_version(tmp_path) == 5  # one past the largest integer directory
    with pytest.raises(FileExistsError):
        export_model(model, path / "assets" / "vocab.txt", tmp_path, version=4)


SERVE = r"""
import json, sys
import tensorflow as tf

model = tf.saved_model.load(sys.argv[1])
prompt, texts = sys.argv[2], sys.argv[3:]
out = {"signatures": sorted(model.signatures.keys())}
d = model.signatures["serving_default"](prompt=tf.constant([prompt, prompt]))
out["serving_default"] = [t.decode() for t in d["text"].numpy()]
g = model.signatures["generate"](prompt=tf.constant([prompt]), max_tokens=tf.constant(12),
                                 top_k=tf.constant(10), temperature=tf.constant(0.0),
                                 seed=tf.constant([1, 2], tf.int64))
out["generate"] = g["text"].numpy()[0].decode()
out["lengths"] = g["lengths"].numpy().tolist()
s = model.signatures["score"](text=tf.constant(texts))
out["log_prob"] = s["log_prob"].numpy().tolist()
out["num_tokens"] = s["num_tokens"].numpy().tolist()
# The functions are also methods of the loaded object.
a = model.generate(tf.constant([prompt]), tf.constant(5), tf.constant(3), tf.constant(1.0),
                   tf.constant([7, 7], tf.int64))
b = model.generate(tf.constant([prompt]), tf.constant(5), tf.constant(3), tf.constant(1.0),
                   tf.constant([7, 7], tf.int64))
out["same_seed_same_text"] = a["text"].numpy().tolist() == b["text"].numpy().tolist()
try:
    model.signatures["generate"](prompt=tf.constant([prompt]), max_tokens=tf.constant(5),
                                 top_k=tf.constant(3), temperature=tf.constant(float("nan")),
                                 seed=tf.constant([1, 2], tf.int64))
    out["nan"] = "accepted"
except tf.errors.InvalidArgumentError as e:
    out["nan"] = e.message
out["tfgpt_modules"] = sorted(m for m in sys.modules if m == "tfgpt" or m.startswith("tfgpt."))
print("RESULT " + json.dumps(out))
"""


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def test_a_tensorflow_only_process_serves_the_export(exported, tmp_path):
    model, _, path = exported
    texts = ["w3 w4", " ".join(f"w{2 + (5 * i) % 37}" for i in range(14))]  # the second slides past maxlen
    done = subprocess.run([sys.executable, "-c", SERVE, str(path), PROMPT, *texts], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert out["tfgpt_modules"] == []
    assert out["signatures"] == sorted(SIGNATURES)
    for text in out["serving_default"]:
        assert text.startswith(PROMPT + " ") and len(text.split()) == 3 + 40
    assert out["generate"] == reference_greedy(model, PROMPT, 12)
    assert out["lengths"] == [12]
    assert out["num_tokens"] == [1, 13]
    np.testing.assert_allclose(out["log_prob"], [reference_log_prob(model, t) for t in texts], rtol=1e-4)
    assert out["same_seed_same_text"]
    assert "temperature must be a finite number" in out["nan"]


def test_saved_model_cli_lists_and_runs_the_signatures(exported):
    _, _, path = exported
    cli = str(Path(sys.executable).with_name("saved_model_cli"))
    show = subprocess.run([cli, "show", "--dir", str(path), "--all"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-3000:]
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in show.stdout
    for field in ("prompt", "max_tokens", "top_k", "temperature", "seed", "text", "completion",
                  "token_ids", "lengths", "log_prob", "num_tokens", "perplexity"):
        assert f"['{field}']" in show.stdout, field
    run = subprocess.run([cli, "run", "--dir", str(path), "--tag_set", "serve",
                          "--signature_def", "serving_default", "--input_exprs", f'prompt=["{PROMPT}"]'],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Result for output key text:" in run.stdout
    assert f"b'{PROMPT} w" in run.stdout


# --- python -m tfgpt.export -------------------------------------------------------

def _run_dir(root: Path) -> Path:
    """A run directory as training leaves it: config, vocabulary, and
    checkpoints at steps 30 (weights of make_model(seed=5)) and 60 (changed)."""
    run = root / "run"
    run.mkdir()
    save_config(run / "config.json", CONFIG, TrainConfig())
    write_vocab(WORDS, run / "vocab.txt")
    model = make_model(seed=5)
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, step=step), run / "ckpt",
                                         max_to_keep=3, checkpoint_name="ckpt")
    step.assign(30)
    manager.save(checkpoint_number=30)
    model.head.b.assign(model.head.b + tf.random.stateless_normal(model.head.b.shape, seed=[9, 9]) * 50.0)
    step.assign(60)
    manager.save(checkpoint_number=60)
    return run


def test_export_command_restores_the_chosen_checkpoint(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert export_cli.find_checkpoint(run, None).endswith("ckpt-60")
    assert export_cli.main([str(run), "--step", "30", "--version", "3"]) == 0
    assert "exported SavedModel" in capsys.readouterr().out
    loaded = tf.saved_model.load(str(run / "export" / "3"))
    out = loaded.generate(tf.constant([PROMPT]), tf.constant(10), tf.constant(5), tf.constant(0.0),
                          tf.constant([0, 0], tf.int64))
    assert out["text"].numpy()[0].decode() == reference_greedy(make_model(seed=5), PROMPT, 10)


def test_export_computes_in_the_runs_precision_unless_told(tmp_path, capsys):
    run = _run_dir(tmp_path)
    save_config(run / "config.json", CONFIG, TrainConfig(precision="bfloat16"))
    assert export_cli.main([str(run), "--version", "1"]) == 0
    assert export_cli.main([str(run), "--version", "2", "--precision", "float32"]) == 0
    assert "bfloat16 matrix products" in capsys.readouterr().out
    text = " ".join(f"w{i}" for i in (5, 9, 2, 30, 17, 4, 11))
    scores = {}
    for version, dtype in ((1, tf.bfloat16), (2, tf.float32)):
        model = GPT(CONFIG, compute_dtype=dtype)
        tf.train.Checkpoint(model=model).read(str(run / "ckpt" / "ckpt-60")).expect_partial()
        loaded = tf.saved_model.load(str(run / "export" / str(version)))
        scores[version] = float(loaded.score(tf.constant([text]))["log_prob"][0])
        np.testing.assert_allclose(scores[version], reference_log_prob(model, text), rtol=1e-4)
    # bfloat16 products round the logits: the two exports are different models.
    assert abs(scores[1] - scores[2]) > 1e-4 * abs(scores[2])


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_checkpoint", "no checkpoint in"),
    ("no_step", "no checkpoint for step 99"),
])
def test_export_command_errors_are_one_line(tmp_path, capsys, case, message):
    if case == "missing":
        args = [str(tmp_path / "nowhere")]
    elif case == "no_checkpoint":
        (tmp_path / "run").mkdir()
        save_config(tmp_path / "run" / "config.json", CONFIG, TrainConfig())
        write_vocab(WORDS, tmp_path / "run" / "vocab.txt")
        args = [str(tmp_path / "run")]
    else:
        args = [str(_run_dir(tmp_path)), "--step", "99"]
    assert export_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    if case == "no_step":
        assert "available steps: 30, 60" in err


# --- python -m tfgpt.generate ------------------------------------------------------

def test_generate_command(exported, capsys):
    _, _, path = exported
    args = [str(path), "--prompt", PROMPT, "--max-tokens", "6", "--top-k", "10", "--temperature", "1.0",
            "--seed", "7", "--num-samples", "4"]
    assert generate_cli.main(args) == 0
    first = capsys.readouterr().out.strip().split("\n")
    assert [line[:4] for line in first] == ["[1] ", "[2] ", "[3] ", "[4] "]
    assert all(line[4:].startswith(PROMPT + " ") and len(line[4:].split()) == 3 + 6 for line in first)
    assert generate_cli.main(args) == 0
    assert capsys.readouterr().out.strip().split("\n") == first  # same seed, same text

    assert generate_cli.main([str(path), "--prompt", PROMPT, "--max-tokens", "100000"]) == 2
    assert "max_tokens must be between 0 and" in capsys.readouterr().err

    assert generate_cli.main([str(path), "--prompt", "w3 w4 w5", "--score"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_export_a_mirrored_model(tmp_path):
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (tests/conftest.py sets them up)")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    with strategy.scope():
        mirrored = make_model(seed=6)
    write_vocab(WORDS, tmp_path / "vocab.txt")
    path = export_model(mirrored, tmp_path / "vocab.txt", tmp_path / "export")
    loaded = tf.saved_model.load(str(path))
    out = loaded.generate(tf.constant([PROMPT]), tf.constant(10), tf.constant(5), tf.constant(0.0),
                          tf.constant([0, 0], tf.int64))
    assert out["text"].numpy()[0].decode() == reference_greedy(make_model(seed=6), PROMPT, 10)
