"""What the terminal shows: the training lines and the `tfgpt` logger.

The lines (`progress_line`, `epoch_line`) are plain functions of the
trainer's per-step and per-epoch records. Messages go through the standard
`logging` module: every module logs to `logging.getLogger(__name__)`, a child
of the "tfgpt" logger, whose handler prints each message as it is, with no
prefix, on standard output. Workers other than the chief of a multi-worker
run get a quiet "tfgpt" logger (`setup_logging(chief=False)`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys

LOGGER = "tfgpt"


def perplexity(loss: float) -> float:
    """exp(loss), the exponent capped at 80 so that a diverged loss stays finite."""
    return math.exp(min(loss, 80.0))


def duration(seconds: float) -> str:
    """'m:ss', or 'h:mm:ss' from an hour up; negative times show as 0:00."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(info) -> str:
    """One line for a step: step/steps, loss, ms/step, tokens/s, ETA of the epoch."""
    left = (info["batches"] - info["batch"]) * info["step_time"]
    return (
        f"{info['batch']}/{info['batches']} - step {info['step']} - loss: {info['loss']:.4f} - "
        f"{1000 * info['step_time']:.0f}ms/step - {info['tokens_per_second']:,.0f} tok/s - "
        f"ETA {duration(left)}"
    )


def epoch_line(info, epochs: int) -> str:
    """The Keras example's format: 'Epoch 3/25 - 391/391 - 17s - 42ms/step - loss: ...'."""
    n = max(1, info["steps_run"])
    parts = [
        f"Epoch {info['epoch'] + 1}/{epochs}",
        f"{info['steps_run']}/{info['batches']}",
        f"{info['seconds']:.0f}s",
        f"{1000 * info['seconds'] / n:.0f}ms/step",
        f"loss: {info['loss']:.4f}",
    ]
    if info["val_loss"] is not None:
        parts += [f"val_loss: {info['val_loss']:.4f}", f"val_perplexity: {perplexity(info['val_loss']):.1f}"]
    return " - ".join(parts)


# --- logging ----------------------------------------------------------------------


class PrintHandler(logging.Handler):
    """Writes a record's message alone, as `print` would, to the standard
    output of the moment (looked up at each message, so that a redirected or
    captured sys.stdout receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(record.getMessage(), file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001 - logging's convention: report, never raise
            self.handleError(record)


def setup_logging(chief: bool = True) -> logging.Logger:
    """The "tfgpt" logger, set up once per process with a PrintHandler and
    not passed on to the root logger's handlers. chief: messages at INFO and
    above are printed; False: none are (the quiet logger of the other
    workers). Returns the logger."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, PrintHandler) for h in logger.handlers):
        logger.addHandler(PrintHandler())
    logger.propagate = False
    logger.setLevel(logging.INFO if chief else logging.CRITICAL + 1)
    return logger


@contextlib.contextmanager
def quiet(name: str, level: int = logging.ERROR):
    """For the block, the logger `name` (a module's, e.g. "tfgpt.serving.export")
    passes on only messages at `level` and above: for a caller to which that
    module's notes and warnings say nothing useful."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(before)
