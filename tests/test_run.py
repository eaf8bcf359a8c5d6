"""A whole run (tfgpt.train.run) never loses work: exact resume, signals, kill -9,
corrupt checkpoints, divergence. The run lock is tests/test_runlock.py; the
one-line errors for bad input are tests/test_cli.py."""

import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import TINY, checkpoint_step, model_weights, read_events, run_train_py, start_train_py, write_corpus

from tfgpt.cli import main

# Every test here trains end to end, starts train.py or a TensorBoard server.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 120 lines, batch 16: 7 steps per epoch, so 12 steps cross an epoch boundary.
    return write_corpus(tmp_path_factory.mktemp("corpus") / "reviews.txt", 120)


def assert_same_weights(a: dict, b: dict, tol: float, context: str = ""):
    assert a.keys() == b.keys() and a
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= tol, f"weights differ by {worst}{context}"


def step_losses(run: Path) -> dict[int, float]:
    """The training loss of every logged step, from the run's event files."""
    return {step: float(v) for step, v in read_events(run / "train").get("loss", [])}


def loss_report(a: dict[int, float], b: dict[int, float]) -> str:
    """Where two runs' per-step losses part, for a failure message."""
    steps = sorted(set(a) | set(b))
    first = next((s for s in steps if a.get(s) != b.get(s)), None)
    rows = ", ".join(f"{s}: {a.get(s)} / {b.get(s)}" for s in steps)
    return f"; first step whose loss differs: {first}; per-step losses (straight / split): {rows}"


# Each packing once, and one and two replicas: the four combinations take the
# same code paths as these two. Without the per-epoch samples, most of a run's
# time: that taking them moves none of training's random numbers is checked
# by test_kill_9_at_random_moments_then_resume.
@pytest.mark.parametrize("packing, replicas", [("truncate", 1), ("pack", 2)])
def test_exact_resume(corpus, tmp_path, replicas, packing, no_samples):
    """n steps straight == k steps, then --resume to n (dropout on)."""
    common = [
        "--data",
        str(corpus),
        "--logdir",
        str(tmp_path),
        "--batch-size",
        "16",
        "--epochs",
        "5",
        "--packing",
        packing,
        "--cpu-replicas",
        str(replicas),
    ] + TINY
    assert main(common + ["--run-name", "straight", "--max-steps", "12"]) == 0
    assert main(common + ["--run-name", "split", "--max-steps", "5"]) == 0
    assert checkpoint_step(tmp_path / "split") == 5
    assert main(["--logdir", str(tmp_path), "--run-name", "split", "--resume", "--max-steps", "12"]) == 0
    assert checkpoint_step(tmp_path / "split") == 12
    losses = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 13))
    assert_same_weights(
        model_weights(tmp_path / "straight"), model_weights(tmp_path / "split"), 1e-6, loss_report(*losses)
    )
    assert losses[0] == losses[1], loss_report(*losses)


def _wait_for_line(proc, needle: str, timeout: float = 120) -> list[str]:
    """Reads proc's output until a line containing needle; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {needle!r} in output:\n{''.join(lines)}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_128_plus_signal(tmp_path, sig):
    corpus = write_corpus(tmp_path / "c.txt", 400)
    proc = start_train_py(
        ["--data", str(corpus), "--logdir", str(tmp_path), "--run-name", "r", "--batch-size", "8", "--epochs", "1000"]
        + [a for a in TINY if a != "--quiet"]
    )
    try:
        _wait_for_line(proc, "step 3 ")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, out
    assert "checkpoint:" in out and "--resume" in out, out
    stopped = int(out.split("after step ")[1].split(";")[0])
    assert checkpoint_step(tmp_path / "r") == stopped >= 3


def test_kill_9_at_random_moments_then_resume(corpus, tmp_path, no_samples):
    """Hard kills, many of them during saves (a checkpoint every step); each
    --resume starts from a complete checkpoint and the run ends where an
    uninterrupted one does. The killed run's processes write their per-epoch
    samples, the uninterrupted run in this process does not: taking them must
    not move training's random numbers."""
    common = ["--data", str(corpus), "--logdir", str(tmp_path), "--batch-size", "16", "--epochs", "5"] + TINY
    assert main(common + ["--run-name", "straight", "--max-steps", "20"]) == 0
    args = common + ["--run-name", "killed", "--max-steps", "20", "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    resume = ["--logdir", str(tmp_path), "--run-name", "killed", "--resume", "--quiet", "--log-every", "1"]
    rng = random.Random(7)
    kills = 0
    for attempt in range(3):
        proc = start_train_py(args if attempt == 0 else resume + ["--gen-tokens", "4"])
        try:
            _wait_for_line(proc, "model:")
            time.sleep(rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += proc.returncode == -signal.SIGKILL
        finally:
            proc.kill()
    assert kills >= 1
    resumed = run_train_py(["--logdir", str(tmp_path), "--run-name", "killed", "--resume", "--quiet"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert checkpoint_step(tmp_path / "killed") == 20
    assert_same_weights(model_weights(tmp_path / "straight"), model_weights(tmp_path / "killed"), 1e-6)


def test_corrupt_latest_checkpoint_falls_back(corpus, tmp_path, capsys, no_samples):
    common = ["--data", str(corpus), "--logdir", str(tmp_path), "--run-name", "r", "--batch-size", "16"] + TINY
    assert main(common + ["--max-steps", "6", "--checkpoint-every", "3"]) == 0
    data_file = next((tmp_path / "r" / "ckpt").glob("ckpt-6.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert main(["--logdir", str(tmp_path), "--run-name", "r", "--resume", "--max-steps", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out and "ckpt-6" in out
    assert "resumed from" in out and "ckpt-3" in out
    assert checkpoint_step(tmp_path / "r") == 8


def test_divergence_stops_without_saving_poisoned_weights(corpus, tmp_path, capsys):
    args = [
        "--data",
        str(corpus),
        "--logdir",
        str(tmp_path),
        "--run-name",
        "r",
        "--batch-size",
        "16",
        "--lr",
        "1e30",
        "--checkpoint-every",
        "1",
        "--max-steps",
        "20",
    ] + TINY
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "not finite at step" in err and "last good checkpoint" in err
    for path in (tmp_path / "r" / "ckpt").glob("ckpt-*.index"):
        reader = tf.train.load_checkpoint(str(path).removesuffix(".index"))
        for key in reader.get_variable_to_shape_map():
            value = reader.get_tensor(key)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.all(np.isfinite(value)), (path, key)


def test_a_run_asks_its_devices_once_and_says_how_long_its_start_took(tmp_path, monkeypatch, capsys, no_samples):
    """One run asks tfgpt.runtime.devices whether its replicas are GPUs once
    (the plan, tfgpt/train/plan.py; the trainer and the device line read
    it), and prints when its data was ready and when its first step came."""
    from tfgpt.runtime import devices

    calls = []
    real = devices.all_gpus

    def counted(strategy):
        calls.append(strategy)
        return real(strategy)

    monkeypatch.setattr(devices, "all_gpus", counted)
    corpus = write_corpus(tmp_path / "c.txt", 40)
    args = [
        "--data",
        str(corpus),
        "--logdir",
        str(tmp_path),
        "--run-name",
        "r",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
    ]
    args += TINY
    assert main(args) == 0
    assert len(calls) == 1
    out = capsys.readouterr().out.splitlines()
    data = [i for i, line in enumerate(out) if re.fullmatch(r"data: ready in \d+\.\d\d s", line)]
    first = [i for i, line in enumerate(out) if re.fullmatch(r"first step: \d+\.\d s after the process started", line)]
    assert len(data) == len(first) == 1 and data[0] < first[0], out
    assert out[0].startswith("devices: ")
