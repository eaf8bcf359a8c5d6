"""End to end: train.py on a generated corpus, its run directory, resume, errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import read_events
from tfgpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "16", "--maxlen", "16", "--embed-dim", "32", "--ff-dim", "32",
         "--vocab-size", "100", "--log-every", "5", "--gen-tokens", "8", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small two-epoch run, shared by the tests that only read it."""
    import random

    from conftest import make_review

    tmp = tmp_path_factory.mktemp("run")
    rng = random.Random(1)
    corpus = tmp / "reviews.txt"
    corpus.write_text("\n".join(make_review(rng) for _ in range(800)) + "\n")
    status = main(["--data", str(corpus), "--logdir", str(tmp / "logs"), "--run-name", "r",
                   "--epochs", "2", "--checkpoint-every", "20"] + SMALL)
    return status, tmp / "logs" / "r", corpus


def test_run_directory_layout(trained):
    status, run, _ = trained
    assert status == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["embed_dim"] == 32 and cfg["train"]["batch_size"] == 16
    # As asked ("auto"), and what it resolved to on this machine.
    assert cfg["train"]["precision"] == "auto" and cfg["train"]["compute_precision"] in ("float32", "bfloat16")
    vocab = (run / "vocab.txt").read_text().splitlines()
    assert vocab[0] == "\t0" and vocab[1].startswith("[UNK]\t")
    assert tf.train.latest_checkpoint(str(run / "ckpt")) is not None
    assert (run / "export" / "1" / "saved_model.pb").exists()


def test_every_tag_is_written_and_loss_falls(trained):
    _, run, _ = trained
    train = read_events(run / "train")
    val = read_events(run / "validation")
    for tag in ("loss", "perplexity", "learning_rate", "tokens_per_second", "grad_norm", "samples"):
        assert tag in train, tag
    for tag in ("loss", "perplexity"):
        assert tag in val, tag
    losses = [float(v) for _, v in train["loss"]]
    assert losses[-1] < 0.7 * losses[0]
    val_losses = [float(v) for _, v in val["loss"]]
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    np.testing.assert_allclose([float(v) for _, v in val["perplexity"]], np.exp(val_losses), rtol=1e-5)
    assert all(float(v) == pytest.approx(1e-3) for _, v in train["learning_rate"])
    steps = [s for s, _ in train["loss"]]
    assert steps == sorted(steps) and steps[0] == 5
    sample = train["samples"][-1][1].item().decode()
    assert "this movie is" in sample.replace("\\", "")


def test_resume_continues_from_saved_step(trained, tmp_path):
    _, _, corpus = trained
    args = ["--data", str(corpus), "--logdir", str(tmp_path), "--run-name", "r"] + SMALL
    assert main(args + ["--epochs", "3", "--max-steps", "30", "--no-export"]) == 0
    ckpt = tf.train.latest_checkpoint(str(tmp_path / "r" / "ckpt"))
    assert ckpt.endswith("ckpt-30")
    reader = tf.train.load_checkpoint(ckpt)
    step_key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("optimizer/step"))
    assert reader.get_tensor(step_key) == 30
    # New flags that may change (max-steps), the rest from config.json.
    assert main(["--logdir", str(tmp_path), "--run-name", "r", "--resume", "--max-steps", "45",
                 "--no-export", "--quiet"]) == 0
    assert tf.train.latest_checkpoint(str(tmp_path / "r" / "ckpt")).endswith("ckpt-45")
    steps = [s for s, _ in read_events(tmp_path / "r" / "train")["loss"]]
    assert max(steps) == 45 and 35 in steps


def test_cli_errors_are_one_line(tmp_path, capsys):
    base = ["--data", str(tmp_path), "--logdir", str(tmp_path / "logs")]
    cases = [
        (["--vocab-size", "2"], "--vocab-size"),
        (["--maxlen", "1"], "--maxlen"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "-1"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--dropout", "1.0"], "--dropout"),
        (["--resume"], "--run-name"),
    ]
    for extra, word in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err


def test_existing_run_is_not_overwritten_and_resume_conflicts(trained, capsys):
    _, run, corpus = trained
    logdir = str(run.parent)
    assert main(["--data", str(corpus), "--logdir", logdir, "--run-name", "r"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--logdir", logdir, "--run-name", "r", "--resume", "--embed-dim", "64"]) == 2
    err = capsys.readouterr().err
    assert "embed-dim" in err and "conflicts" in err


def test_missing_data_is_a_clean_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "nope"),
                           "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no such file" in proc.stderr.strip().splitlines()[-1]


def test_epoch_line_format():
    from tfgpt.trainer import epoch_line

    line = epoch_line(dict(epoch=2, steps_run=391, batches=391, seconds=17.2, loss=4.45331,
                           val_loss=4.5102), epochs=25)
    assert line == "Epoch 3/25 - 391/391 - 17s - 44ms/step - loss: 4.4533 - val_loss: 4.5102 - val_perplexity: 90.9"


def test_no_keras_after_a_training_step(trained):
    """Importing tfgpt and training must not load Keras (this process trained above)."""
    assert trained[0] == 0
    loaded = [m for m in sys.modules if m.split(".")[0] in ("keras", "tf_keras")]
    assert loaded == []


def test_no_source_file_imports_keras():
    banned = re.compile(r"^\s*(import|from)\s+(keras|tf_keras)\b|tf\.keras|tensorflow\.keras", re.M)
    files = [ROOT / "train.py", *(ROOT / "tfgpt").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    offenders = [str(f) for f in files if f.name != Path(__file__).name and banned.search(f.read_text())]
    assert offenders == []


def test_help_lists_flags():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for flag in ("--data", "--packing", "--gpus", "--xla", "--resume", "--max-steps", "--prompt"):
        assert flag in proc.stdout
    flat = " ".join(proc.stdout.split())
    assert re.search(r"--vocab-size VOCAB_SIZE [^-]*\(default: 20000\)", flat)
