"""One process per run directory (tfgpt.train.runlock): a second holder is refused
with the first one's pid in the message, the lock is free again once
released, and train.py refuses a run another process trains."""

import os

import pytest
from helpers import TINY, write_corpus

from tfgpt.cli import main
from tfgpt.train.runlock import RunLock, RunLocked


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    # flock locks belong to an open file: two opens conflict within one process too.
    first, second = RunLock(tmp_path / "r"), RunLock(tmp_path / "r")
    first.acquire()
    assert (tmp_path / "r" / "lock").read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(RunLocked, match=rf"is in use by another training process \(pid {os.getpid()} on "):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
    first.release()  # a second release does nothing


@pytest.mark.slow
def test_second_process_on_a_run_is_refused(tmp_path, capsys, no_samples):
    corpus = write_corpus(tmp_path / "reviews.txt", 120)
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
