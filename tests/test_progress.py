"""The progress line of long data passes (tfgpt.data.progress)."""

from helpers import log_messages

from tfgpt.data.progress import Progress


def test_progress_line():
    with log_messages() as lines:
        p = Progress("tokenizing", 100_000_000, live=False, every=0.0)
        p.start -= 10.0
        p.add(40_000_000)
    assert lines == ["tokenizing: 40 of 100 MB (40%), 4.0 MB/s, ETA 0:15"]
