"""Never lose a run: exact resume, signals, kill -9, corrupt checkpoints,
divergence, the run lock, and one-line errors for bad input."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_review, read_events
from tfgpt.cli import main
from tfgpt.runlock import RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--maxlen", "12", "--embed-dim", "16", "--ff-dim", "16", "--vocab-size", "60",
        "--log-every", "1", "--gen-tokens", "4", "--quiet", "--no-export"]


def write_corpus(path: Path, lines: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(make_review(rng) for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # 120 lines, batch 16: 7 steps per epoch, so 12 steps cross an epoch boundary.
    return write_corpus(tmp_path_factory.mktemp("corpus") / "reviews.txt", 120)


def model_weights(run: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run / "ckpt"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("model/") and "OPTIMIZER_SLOT" not in k}


def checkpoint_step(run: Path) -> int:
    reader = tf.train.load_checkpoint(str(run / "ckpt"))
    key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("optimizer/step"))
    return int(reader.get_tensor(key))


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


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("packing", ["truncate", "pack"])
def test_exact_resume(corpus, tmp_path, replicas, packing):
    """n steps straight == k steps, then --resume to n (dropout on)."""
    common = ["--data", str(corpus), "--logdir", str(tmp_path), "--batch-size", "16", "--epochs", "5",
              "--packing", packing, "--cpu-replicas", str(replicas)] + TINY
    assert main(common + ["--run-name", "straight", "--max-steps", "12"]) == 0
    assert main(common + ["--run-name", "split", "--max-steps", "5"]) == 0
    assert checkpoint_step(tmp_path / "split") == 5
    assert main(["--logdir", str(tmp_path), "--run-name", "split", "--resume", "--max-steps", "12"]) == 0
    assert checkpoint_step(tmp_path / "split") == 12
    losses = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    assert sorted(losses[0]) == sorted(losses[1]) == list(range(1, 13))
    assert_same_weights(model_weights(tmp_path / "straight"), model_weights(tmp_path / "split"), 1e-6,
                        loss_report(*losses))
    assert losses[0] == losses[1], loss_report(*losses)


def _start(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py")] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kw)


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
    proc = _start(["--data", str(corpus), "--logdir", str(tmp_path), "--run-name", "r", "--batch-size", "8",
                   "--epochs", "1000"] + [a for a in TINY if a != "--quiet"])
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


def test_kill_9_at_random_moments_then_resume(corpus, tmp_path):
    """Hard kills, many of them during saves (a checkpoint every step); each
    --resume starts from a complete checkpoint and the run ends where an
    uninterrupted one does."""
    common = ["--data", str(corpus), "--logdir", str(tmp_path), "--batch-size", "16", "--epochs", "5"] + TINY
    assert main(common + ["--run-name", "straight", "--max-steps", "20"]) == 0
    args = common + ["--run-name", "killed", "--max-steps", "20", "--checkpoint-every", "1",
                     "--keep-checkpoints", "2"]
    rng = random.Random(7)
    kills = 0
    for attempt in range(3):
        proc = _start(args if attempt == 0 else
                      ["--logdir", str(tmp_path), "--run-name", "killed", "--resume", "--quiet"] + TINY[-6:-2])
        try:
            _wait_for_line(proc, "model:")
            time.sleep(rng.uniform(0.2, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += proc.returncode == -signal.SIGKILL
        finally:
            proc.kill()
    assert kills >= 1
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--logdir", str(tmp_path), "--run-name",
                              "killed", "--resume", "--quiet"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert checkpoint_step(tmp_path / "killed") == 20
    assert_same_weights(model_weights(tmp_path / "straight"), model_weights(tmp_path / "killed"), 1e-6)


def test_corrupt_latest_checkpoint_falls_back(corpus, tmp_path, capsys):
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
    args = ["--data", str(corpus), "--logdir", str(tmp_path), "--run-name", "r", "--batch-size", "16",
            "--lr", "1e30", "--checkpoint-every", "1", "--max-steps", "20"] + TINY
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "not finite at step" in err and "last good checkpoint" in err
    for path in (tmp_path / "r" / "ckpt").glob("ckpt-*.index"):
        reader = tf.train.load_checkpoint(str(path).removesuffix(".index"))
        for key in reader.get_variable_to_shape_map():
            value = reader.get_tensor(key)
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.all(np.isfinite(value)), (path, key)


def test_second_process_on_a_run_is_refused(corpus, tmp_path, capsys):
    common = ["--data", str(corpus), "--logdir", str(tmp_path), "--run-name", "r", "--batch-size", "16"] + TINY
    assert main(common + ["--max-steps", "2"]) == 0
    lock = RunLock(tmp_path / "r")
    lock.acquire()
    try:
        assert main(["--logdir", str(tmp_path), "--run-name", "r", "--resume", "--max-steps", "3"]) == 2
        assert "in use by another training process" in capsys.readouterr().err
    finally:
        lock.release()
    assert main(["--logdir", str(tmp_path), "--run-name", "r", "--resume", "--max-steps", "3", "--quiet"]) == 0


def test_bad_input_gives_one_line_and_status_2(corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    short = write_corpus(tmp_path / "short.txt", 3)
    base = ["--logdir", str(tmp_path / "logs")] + TINY
    cases = [
        (["--data", str(tmp_path / "missing")], "no such file"),
        (["--data", str(tmp_path / "empty")], "no .txt files"),
        (["--data", str(short), "--batch-size", "64"], "fewer than one global batch"),
        (["--data", str(corpus), "--vocab-size", "2"], "--vocab-size"),
        (["--data", str(corpus), "--maxlen", "1"], "--maxlen"),
        (["--data", str(corpus), "--batch-size", "-4"], "--batch-size"),
        (["--data", str(corpus), "--epochs", "0"], "--epochs"),
        (["--data", str(corpus), "--lr", "-1"], "--lr"),
        (["--data", str(corpus), "--lr", "nan"], "--lr"),
        (["--data", str(corpus), "--gen-tokens", "0"], "--gen-tokens"),
        (["--data", str(corpus), "--dropout", "1.5"], "--dropout"),
        (["--data", str(corpus), "--cpu-replicas", "2", "--batch-size", "15"], "not divisible"),
    ]
    for i, (extra, words) in enumerate(cases):
        assert main(base + ["--run-name", f"r{i}"] + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (extra, err)


def test_bad_tf_config_in_a_subprocess(corpus, tmp_path):
    env = dict(os.environ, TF_CONFIG="{not json", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--logdir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "TF_CONFIG is not valid JSON" in proc.stderr.strip().splitlines()[-1]
