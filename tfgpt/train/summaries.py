"""The TensorBoard files of a run. A run directory LOGDIR/RUN holds:

  RUN/                      the HParams plugin's session: the run's config
  RUN/train/                scalars loss, perplexity, learning_rate, grad_norm,
                            tokens_per_second, step_time_ms, mfu; text
                            samples; the graph of the train step
  RUN/train/plugins/profile the --profile-steps trace (Profile tab)
  RUN/validation/           scalars loss, perplexity

train/ and validation/ use the same tag names, so TensorBoard draws the
training and validation curves of a tag on one chart. Every write is flushed,
so a run killed at any moment keeps what was written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import summary_v2 as hp

from tfgpt.config import not_hparams

# Config fields that say where a run lives, not how it trains (declared hparam=False).
NOT_HPARAMS = not_hparams()


class Summaries:
    """The event writers of run_dir's train/ and validation/ subdirectories."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.train_writer = tf.summary.create_file_writer(str(self.run_dir / "train"))
        self.val_writer = tf.summary.create_file_writer(str(self.run_dir / "validation"))

    def train_scalars(self, step: int, values: dict) -> None:
        """Writes {tag: value} to train/ at `step`, in the dict's order."""
        _scalars(self.train_writer, step, values)

    def validation_scalars(self, step: int, values: dict) -> None:
        """Writes {tag: value} to validation/ at `step`."""
        _scalars(self.val_writer, step, values)

    def samples(self, step: int, markdown: str) -> None:
        """Writes the text summary "samples" (Markdown) to train/ at `step`."""
        with self.train_writer.as_default(step=step):
            tf.summary.text("samples", markdown)
        self.train_writer.flush()

    def trace_on(self) -> None:
        """Starts recording the graph of the next tf.function call."""
        tf.summary.trace_on(graph=True, profiler=False)

    def trace_export(self, step: int) -> None:
        """Writes the recorded graph to train/ as "train_step"."""
        with self.train_writer.as_default():
            tf.summary.trace_export("train_step", step=step)

    def trace_off(self) -> None:
        tf.summary.trace_off()

    def close(self) -> None:
        self.train_writer.close()
        self.val_writer.close()


def _scalars(writer, step: int, values: dict) -> None:
    with writer.as_default(step=step):
        for tag, value in values.items():
            tf.summary.scalar(tag, value)
    writer.flush()


# --- hyperparameters ----------------------------------------------------------------


def run_hparams(model_cfg, cfg, **extra) -> dict:
    """The hyperparameters of a run for the HParams plugin: every field of the
    model and train configs whose value is a bool, int, float or str (None
    fields are left out), head_dim resolved to the key size in use, and
    `extra` (e.g. num_params, flops_per_token). Names are the config field
    names, which the two configs do not share."""
    values = dataclasses.asdict(model_cfg) | {"head_dim": model_cfg.key_dim} | dataclasses.asdict(cfg)
    values = {k: v for k, v in values.items() if k not in NOT_HPARAMS}
    values |= extra
    return {k: _plain(v) for k, v in values.items() if isinstance(_plain(v), (bool, int, float, str))}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def write_hparams(run_dir: Path, hparams: dict):
    """Writes the run's hparams to run_dir itself, where the HParams plugin
    takes the run as one session and its train/ and validation/ subdirectories
    as the session's metric groups: every scalar there (validation loss and
    perplexity among them) is a metric, shown with its last value.

    The writer is the plugin's `summary_v2.hparams`, which its public module
    `tensorboard.plugins.hparams.api` re-exports; that module also defines a
    Keras callback and so cannot be imported without Keras."""

    run_dir = Path(run_dir)
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        hp.hparams(hparams, trial_id=run_dir.name)
    writer.close()


# --- samples ------------------------------------------------------------------------


def sample_markdown(prompt: str, texts: list[str], settings: str, exact: bool = False) -> str:
    """Markdown for the Text tab: one paragraph (line) per sample, its first
    len(prompt words) words (the prompt as the model read it) in bold, then
    the settings in italics. exact (subword samples, whose text keeps its
    own spacing): the prompt is the text's first characters, and the
    text's line breaks and runs of spaces are kept."""
    n = len(prompt.split())
    lines = []
    for text in texts:
        if exact:
            head, tail = (prompt, text[len(prompt) :]) if text.startswith(prompt) else ("", text)
            lines.append(_spaced_md(head, bold=True) + _spaced_md(tail))
            continue
        words = text.split()
        head, tail = _md(" ".join(words[:n])), _md(" ".join(words[n:]))
        lines.append(" ".join(part for part in (f"**{head}**" if head else "", tail) if part))
    return "\n\n".join(lines + [f"*{_md(settings)}*"])


# Where bold begins and ends, until the text is escaped (private-use characters).
_OPEN, _CLOSE = "\ue000", "\ue001"


def _spaced_md(text: str, bold: bool = False) -> str:
    """text as Markdown that shows its whitespace: a line break is a hard
    break, a tab or a space after a space (or at a line's start) a
    non-breaking space; bold marks each line's non-blank part."""
    out = []
    for line in text.split("\n"):
        core = line.strip()
        if bold and core:
            start = line.index(core)
            line = line[:start] + _OPEN + core + _CLOSE + line[start + len(core) :]
        line = _md(line.replace("\t", "    ")).replace(_OPEN, "**").replace(_CLOSE, "**")
        shown, previous = [], " "
        for c in line:
            shown.append("&nbsp;" if c == " " and previous == " " else c)
            previous = c
        out.append("".join(shown))
    return "  \n".join(out)


def _md(text: str) -> str:
    """Escapes the characters Markdown would interpret."""
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!<>|" else c for c in text)
