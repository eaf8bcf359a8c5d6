"""tfgpt/train/checkpoint.py: checkpoints written and read back, the newest one
restored first, and the scratch folder of the workers other than the chief."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import log_messages

from tfgpt.train.checkpoint import Checkpoints

ROOT = Path(__file__).resolve().parents[1]


def objects():
    """A weight matrix and a step counter, as the trainer's objects would be."""
    module = tf.Module()
    module.w = tf.Variable(np.zeros([3, 4], np.float32), name="w")
    step = tf.Variable(0, dtype=tf.int64, name="step")
    return {"model": module, "step": step}, module.w, step


def test_save_and_restore_round_trip(tmp_path):
    objs, w, step = objects()
    ckpt = Checkpoints(objs, tmp_path, step, keep=3)
    assert ckpt.save() is None and ckpt.latest is None  # nothing before open()
    ckpt.open()
    want = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    w.assign(want)
    step.assign(5)
    path = ckpt.save()
    assert path == str(tmp_path / "ckpt" / "ckpt-5") and ckpt.latest == path

    objs2, w2, step2 = objects()
    other = Checkpoints(objs2, tmp_path, step2)
    other.open()
    assert other.restore_latest() == path
    np.testing.assert_array_equal(w2.numpy(), want)
    assert int(step2.numpy()) == 5


def test_restore_latest_picks_the_newest_and_skips_unreadable(tmp_path):
    objs, w, step = objects()
    ckpt = Checkpoints(objs, tmp_path, step, keep=2)
    ckpt.open()
    for n in (1, 2, 3):
        w.assign(tf.fill([3, 4], float(n)))
        step.assign(n)
        ckpt.save()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ckpt-*.index")) == ["ckpt-2.index", "ckpt-3.index"]

    objs2, w2, step2 = objects()
    reader = Checkpoints(objs2, tmp_path, step2)
    reader.open()
    assert reader.restore_latest().endswith("ckpt-3")
    assert float(w2.numpy()[0, 0]) == 3.0 and int(step2.numpy()) == 3

    # A damaged newest checkpoint: the one before it, with a warning naming the file.
    for part in (tmp_path / "ckpt").glob("ckpt-3.data-*"):
        part.write_bytes(b"damaged")
    objs3, w3, step3 = objects()
    reader = Checkpoints(objs3, tmp_path, step3)
    reader.open()
    with log_messages() as warnings:
        assert reader.restore_latest().endswith("ckpt-2")
    assert float(w3.numpy()[0, 0]) == 2.0
    assert len(warnings) == 1 and "ckpt-3" in warnings[0] and warnings[0].startswith("warning: skipping")


def test_no_checkpoint_restores_nothing(tmp_path):
    objs, _, step = objects()
    ckpt = Checkpoints(objs, tmp_path, step)
    assert ckpt.restore_latest() is None  # not open
    ckpt.open()
    assert ckpt.restore_latest() is None


def test_other_worker_saves_to_scratch_and_restores_from_the_run(tmp_path):
    objs, w, step = objects()
    chief = Checkpoints(objs, tmp_path, step)
    chief.open()
    w.assign(tf.fill([3, 4], 7.0))
    step.assign(4)
    chief.save()

    objs2, w2, step2 = objects()
    worker = Checkpoints(objs2, tmp_path, step2, chief=False)
    worker.open()
    assert worker.restore_latest().endswith(os.path.join("ckpt", "ckpt-4"))  # the chief's
    assert float(w2.numpy()[0, 0]) == 7.0
    step2.assign(9)
    path = Path(worker.save())
    assert tmp_path not in path.parents and path.name == "ckpt-9"  # never in the run directory
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.index")) == ["ckpt-4.index"]
    worker.close()
    assert not path.parent.exists()  # its scratch checkpoints are removed
    chief.close()
    assert (tmp_path / "ckpt" / "ckpt-4.index").exists()  # the chief's stay


@pytest.mark.slow  # starts a process
def test_worker_scratch_is_removed_at_exit(tmp_path):
    code = (
        "from tfgpt.train.checkpoint import worker_scratch; s = worker_scratch(); assert worker_scratch() == s; "
        "(s / 'vocab.txt').write_text('x'); print(s)"
    )
    env = dict(os.environ, TMPDIR=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scratch = Path(proc.stdout.strip().splitlines()[-1])
    assert scratch.parent == tmp_path and scratch.name.startswith("tfgpt-worker-")
    assert not scratch.exists() and list(tmp_path.iterdir()) == []
