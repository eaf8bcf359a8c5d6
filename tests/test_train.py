"""End to end: train.py on a generated corpus, its run directory, resume,
errors, and no Keras anywhere."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, SMALL, checkpoint_step, read_events, run_train_py, write_corpus

from tfgpt.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small two-epoch run, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("run")
    corpus = write_corpus(tmp / "reviews.txt", 800)
    status = main(
        [
            "--data",
            str(corpus),
            "--logdir",
            str(tmp / "logs"),
            "--run-name",
            "r",
            "--epochs",
            "2",
            "--checkpoint-every",
            "20",
        ]
        + SMALL
    )
    return status, tmp / "logs" / "r", corpus


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_continues_from_saved_step(trained, tmp_path, no_samples):
    _, _, corpus = trained
    args = ["--data", str(corpus), "--logdir", str(tmp_path), "--run-name", "r"] + SMALL
    assert main(args + ["--epochs", "3", "--max-steps", "30", "--no-export"]) == 0
    ckpt = tf.train.latest_checkpoint(str(tmp_path / "r" / "ckpt"))
    assert ckpt.endswith("ckpt-30")
    assert checkpoint_step(ckpt) == 30
    # New flags that may change (max-steps), the rest from config.json.
    assert (
        main(["--logdir", str(tmp_path), "--run-name", "r", "--resume", "--max-steps", "45", "--no-export", "--quiet"])
        == 0
    )
    assert tf.train.latest_checkpoint(str(tmp_path / "r" / "ckpt")).endswith("ckpt-45")
    steps = [s for s, _ in read_events(tmp_path / "r" / "train")["loss"]]
    assert max(steps) == 45 and 35 in steps


@pytest.mark.slow
def test_existing_run_is_not_overwritten_and_resume_conflicts(trained, capsys):
    _, run, corpus = trained
    logdir = str(run.parent)
    assert main(["--data", str(corpus), "--logdir", logdir, "--run-name", "r"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--logdir", logdir, "--run-name", "r", "--resume", "--embed-dim", "64"]) == 2
    err = capsys.readouterr().err
    assert "embed-dim" in err and "conflicts" in err


@pytest.mark.slow
def test_missing_data_is_a_clean_error(tmp_path):
    proc = run_train_py(["--data", str(tmp_path / "nope"), "--logdir", str(tmp_path)], timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no such file" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
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
