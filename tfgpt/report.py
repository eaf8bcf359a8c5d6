"""What a user watches: the terminal progress and the TensorBoard summaries.

`Reporter` receives the trainer's per-step and per-epoch records on the chief
and writes them out; on other workers it stays silent.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import tensorflow as tf

from tfgpt.trainer import epoch_line, perplexity, progress_line


class Reporter:
    """Terminal progress plus `train/` and `validation/` event files.

    Scalars are written at every `log_every`-th step and at the last step of
    each epoch (train/loss is the mean since the previous write), and the
    writers are flushed each time, so a run killed at any moment keeps its curve.
    """

    def __init__(self, run_dir, epochs: int, log_every: int = 10, quiet: bool = False,
                 chief: bool = True, sample_fn=None, out=None):
        self.epochs, self.log_every, self.quiet, self.chief = epochs, max(1, log_every), quiet, chief
        self.sample_fn = sample_fn
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if hasattr(self.out, "isatty") else False
        self._pending = []
        self._live = False
        if chief:
            self.train_writer = tf.summary.create_file_writer(str(run_dir / "train"))
            self.val_writer = tf.summary.create_file_writer(str(run_dir / "validation"))

    def print(self, text: str):
        if not self.chief:
            return
        if self._live:
            print(file=self.out)
            self._live = False
        print(text, file=self.out, flush=True)

    def on_step(self, info):
        if not self.chief:
            return
        self._pending.append(info)
        if not self.quiet:
            line = progress_line(info, self.tty)
            if self.tty:
                print("\r" + line.ljust(100), end="", file=self.out, flush=True)
                self._live = True
            elif info["step"] % self.log_every == 0:
                print(line, file=self.out, flush=True)
        last_of_epoch = info["batch"] >= info["batches"]
        if info["step"] % self.log_every == 0 or last_of_epoch:
            self.write_train(info)

    def write_train(self, info):
        """Writes the scalars for the steps since the last write."""
        if not self._pending:
            return
        loss = float(np.mean([p["loss"] for p in self._pending]))
        step_time = float(np.mean([p["step_time"] for p in self._pending]))
        tokens = info["tokens_per_second"] * info["step_time"]  # positions per step
        with self.train_writer.as_default(step=info["step"]):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("perplexity", perplexity(loss))
            tf.summary.scalar("learning_rate", info["lr"])
            tf.summary.scalar("grad_norm", info["grad_norm"])
            tf.summary.scalar("tokens_per_second", tokens / step_time)
            tf.summary.scalar("step_time_ms", 1000 * step_time)
        self.train_writer.flush()
        self._pending = []

    def on_epoch(self, info):
        if not self.chief:
            return
        if self._pending:
            self.write_train(self._pending[-1])
        self.print(epoch_line(info, self.epochs))
        if info["val_loss"] is not None:
            with self.val_writer.as_default(step=info["step"]):
                tf.summary.scalar("loss", info["val_loss"])
                tf.summary.scalar("perplexity", perplexity(info["val_loss"]))
            self.val_writer.flush()
        if self.sample_fn is not None:
            t0 = time.perf_counter()
            prompt, text, settings = self.sample_fn(info["step"])
            self.print(f"sample: {text}")
            with self.train_writer.as_default(step=info["step"]):
                shown = f"**{_md(prompt)}**{_md(text[len(prompt):])}" if text.startswith(prompt) else _md(text)
                tf.summary.text("samples", f"{shown}\n\n_{settings}, {time.perf_counter() - t0:.2f}s_")
            self.train_writer.flush()

    def close(self):
        if self.chief:
            self.train_writer.close()
            self.val_writer.close()


def _md(text: str) -> str:
    """Escapes the characters Markdown would interpret."""
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!<>|" else c for c in text)
