"""What a user watches, and when: the terminal progress and the TensorBoard summaries.

`Reporter` receives the trainer's per-step and per-epoch records on the chief
and decides what to show and write at each: the lines come from
tfgpt/console.py, the TensorBoard files (their layout is described there) are
written by tfgpt/train/summaries.py. On other workers it stays silent.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.console import epoch_line, perplexity, progress_line
from tfgpt.model.gpt import count_params
from tfgpt.runtime.flops import flops_per_token
from tfgpt.train.summaries import Summaries, run_hparams, sample_markdown, write_hparams


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """What a Reporter shows and writes.

    epochs: of the run, for the epoch lines. log_every: a progress line (when
    not on a terminal) and the scalars every this many steps. quiet: only the
    epoch lines. tokens_per_step: positions per global batch (batch_size *
    maxlen). flops_per_token and peak_flops (FLOP/s of all training devices
    together) give the mfu scalar; it is left out when either is None.
    hparams: {name: bool | int | float | str} for the HParams plugin.
    profile_steps: (A, B), global steps to profile, or None. trace_graph:
    write the graph of the first train step this process runs."""

    epochs: int
    log_every: int = 10
    quiet: bool = False
    tokens_per_step: int | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None
    hparams: dict | None = None
    profile_steps: tuple[int, int] | None = None
    trace_graph: bool = True


class Reporter:
    """Terminal progress plus the TensorBoard summaries of a run.

    Scalars are written at every `log_every`-th step, at the last step of each
    epoch and when the reporter is closed (train/loss is the mean since the
    previous write, tokens_per_second and step_time_ms use the mean step time
    since then), and the writers are flushed each time, so a run killed at any
    moment keeps its curve up to its last `log_every` steps.

    run_dir: the run directory. config: a ReportConfig. chief: False on the
    other workers, which report nothing. sample_fn: step -> (prompt, texts,
    settings), the per-epoch samples. out: the terminal (sys.stdout).
    """

    def __init__(self, run_dir, config: ReportConfig, chief: bool = True, sample_fn=None, out=None):
        self.run_dir = Path(run_dir)
        self.config, self.chief, self.sample_fn = config, chief, sample_fn
        self.epochs, self.log_every, self.quiet = config.epochs, max(1, config.log_every), config.quiet
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if hasattr(self.out, "isatty") else False
        self.profile_steps = config.profile_steps
        self._pending = []
        self._live = False
        self._closed = False
        self._trace_pending = config.trace_graph  # trace the next step
        self._tracing = False
        self._profiling = False
        self._warned_mfu = False
        if chief:
            self.summaries = Summaries(self.run_dir)
            if config.hparams:
                write_hparams(self.run_dir, config.hparams)

    @classmethod
    def for_run(
        cls, trainer, model_cfg, cfg, run_dir, chief: bool = True, sample_fn=None, peak_flops: float | None = None
    ):
        """The reporter of a training run: its hparams and the FLOPs per token
        of the model. peak_flops: of all training devices together (for mfu),
        or None."""

        fpt = flops_per_token(model_cfg)
        extra = {"num_params": count_params(trainer.model), "flops_per_token": fpt}
        if peak_flops is not None:
            extra["mfu_peak_flops"] = peak_flops
        config = ReportConfig(
            cfg.epochs,
            cfg.log_every,
            cfg.quiet,
            tokens_per_step=cfg.batch_size * model_cfg.maxlen,
            flops_per_token=fpt,
            peak_flops=peak_flops,
            hparams=run_hparams(model_cfg, cfg, **extra),
            profile_steps=cfg.profile_range(),
        )
        return cls(run_dir, config, chief, sample_fn)

    def print(self, text: str):
        if not self.chief:
            return
        if self._live:
            print(file=self.out)
            self._live = False
        print(text, file=self.out, flush=True)

    # --- per step ---------------------------------------------------------------

    def before_step(self, step: int):
        """Called just before global step `step` runs: starts the graph trace
        (first step of this process) and the profiler (step A)."""
        if not self.chief or self._closed:
            return
        if self._trace_pending:
            self._trace_pending = False
            self.summaries.trace_on()
            self._tracing = True
        if self.profile_steps and not self._profiling:
            first, last = self.profile_steps
            if first <= step <= last:
                self._start_profiler(step)

    def on_step(self, info):
        if not self.chief:
            return
        step = info["step"]
        if self._tracing:
            self._tracing = False
            self.summaries.trace_export(step)
        if self._profiling and step >= self.profile_steps[1]:
            self._stop_profiler()
        self._pending.append(info)
        if not self.quiet:
            line = progress_line(info)
            if self.tty:
                print("\r" + line.ljust(100), end="", file=self.out, flush=True)
                self._live = True
            elif step % self.log_every == 0:
                print(line, file=self.out, flush=True)
        last_of_epoch = info["batch"] >= info["batches"]
        if step % self.log_every == 0 or last_of_epoch:
            self.write_train(info)

    def write_train(self, info):
        """Writes the scalars for the steps since the last write, at info's step.

        tokens_per_second = tokens_per_step / mean step time (s), step_time_ms
        = 1000 * mean step time, mfu = flops_per_token * tokens_per_second /
        peak_flops."""
        if not self._pending:
            return
        loss = float(np.mean([p["loss"] for p in self._pending]))
        step_time = float(np.mean([p["step_time"] for p in self._pending]))
        tokens = self.config.tokens_per_step or info["tokens_per_second"] * info["step_time"]
        tokens_per_second = tokens / step_time
        values = {
            "loss": loss,
            "perplexity": perplexity(loss),
            "learning_rate": info["lr"],
            "grad_norm": info["grad_norm"],
            "tokens_per_second": tokens_per_second,
            "step_time_ms": 1000 * step_time,
        }
        flops_per_token, peak_flops = self.config.flops_per_token, self.config.peak_flops
        if flops_per_token and peak_flops:
            values["mfu"] = mfu = flops_per_token * tokens_per_second / peak_flops
            if mfu > 1 and not self._warned_mfu:
                self._warned_mfu = True
                self.print(
                    f"warning: mfu {mfu:.2f} is above 1: the peak of {peak_flops / 1e12:.3f} "
                    "TFLOP/s is too low (measured while the machine was busy?); pass --peak-flops"
                )
        self.summaries.train_scalars(info["step"], values)
        self._pending = []

    # --- per epoch --------------------------------------------------------------

    def on_epoch(self, info):
        if not self.chief:
            return
        if self._pending:
            self.write_train(self._pending[-1])
        self.print(epoch_line(info, self.epochs))
        if info["val_loss"] is not None:
            self.summaries.validation_scalars(
                info["step"], {"loss": info["val_loss"], "perplexity": perplexity(info["val_loss"])}
            )
        if self.sample_fn is not None:
            t0 = time.perf_counter()
            prompt, texts, settings = self.sample_fn(info["step"])
            texts = [texts] if isinstance(texts, str) else list(texts)
            for text in texts:
                self.print(f"sample: {text}")
            seconds = time.perf_counter() - t0
            exact = getattr(self.sample_fn, "exact", False)  # subword samples keep their spacing
            markdown = sample_markdown(prompt, texts, f"{settings}, {seconds:.2f}s", exact=exact)
            self.summaries.samples(info["step"], markdown)

    # --- profiler -----------------------------------------------------------------

    def _start_profiler(self, step: int):
        try:
            tf.profiler.experimental.start(str(self.run_dir / "train"))
        except (tf.errors.OpError, AttributeError, RuntimeError) as e:
            self.profile_steps = None
            self.print(
                f"warning: profiler unavailable, no trace written ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
            )
            return
        self._profiling = True
        self._profile_from = step

    def _stop_profiler(self):
        self._profiling = False
        try:
            tf.profiler.experimental.stop()
        except (tf.errors.OpError, RuntimeError) as e:
            self.print(f"warning: the profiler failed to write its trace ({type(e).__name__}: {e})")
            return
        self.print(
            f"profile of steps {self._profile_from}-{self.profile_steps[1]} written to "
            f"{self.run_dir / 'train' / 'plugins' / 'profile'}"
        )

    # --- exit -----------------------------------------------------------------------

    def close(self):
        """Writes what is pending, stops a trace or profile in progress, and
        closes the writers. Safe to call more than once, and on every exit
        path (normal end, error, signal)."""
        if not self.chief or self._closed:
            return
        self._closed = True
        try:
            if self._live:
                print(file=self.out, flush=True)
                self._live = False
            if self._pending:
                self.write_train(self._pending[-1])
            if self._tracing:
                self._tracing = False
                self.summaries.trace_off()
            if self._profiling:
                self._stop_profiler()
        finally:
            self.summaries.close()
