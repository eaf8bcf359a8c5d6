"""What a user watches: the terminal progress and the TensorBoard summaries.

`Reporter` receives the trainer's per-step and per-epoch records on the chief
and writes them out; on other workers it stays silent. A run directory
LOGDIR/RUN holds, for TensorBoard:

  RUN/                      the HParams plugin's session: the run's config
  RUN/train/                scalars loss, perplexity, learning_rate, grad_norm,
                            tokens_per_second, step_time_ms, mfu; text
                            samples; the graph of the train step
  RUN/train/plugins/profile the --profile-steps trace (Profile tab)
  RUN/validation/           scalars loss, perplexity

train/ and validation/ use the same tag names, so TensorBoard draws the
training and validation curves of a tag on one chart.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.trainer import epoch_line, perplexity, progress_line

# Config fields that say where a run lives, not how it trains.
NOT_HPARAMS = ("logdir", "run_name")


class Reporter:
    """Terminal progress plus the TensorBoard summaries of a run.

    Scalars are written at every `log_every`-th step, at the last step of each
    epoch and when the reporter is closed (train/loss is the mean since the
    previous write, tokens_per_second and step_time_ms use the mean step time
    since then), and the writers are flushed each time, so a run killed at any
    moment keeps its curve up to its last `log_every` steps.

    run_dir: the run directory. tokens_per_step: positions per global batch
    (batch_size * maxlen). flops_per_token and peak_flops (FLOP/s of all
    training devices together) give the mfu scalar; it is left out when either
    is None. hparams: {name: bool | int | float | str} for the HParams plugin.
    profile_steps: (A, B), global steps to profile, or None. trace_graph:
    write the graph of the first train step this process runs.
    """

    def __init__(self, run_dir, epochs: int, log_every: int = 10, quiet: bool = False,
                 chief: bool = True, sample_fn=None, out=None, *, tokens_per_step: int | None = None,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 hparams: dict | None = None, profile_steps: tuple[int, int] | None = None,
                 trace_graph: bool = True):
        self.run_dir = Path(run_dir)
        self.epochs, self.log_every, self.quiet, self.chief = epochs, max(1, log_every), quiet, chief
        self.sample_fn = sample_fn
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if hasattr(self.out, "isatty") else False
        self.tokens_per_step = tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.profile_steps = profile_steps
        self._pending = []
        self._live = False
        self._closed = False
        self._trace_pending = trace_graph  # trace the next step
        self._tracing = False
        self._profiling = False
        self._warned_mfu = False
        if chief:
            self.train_writer = tf.summary.create_file_writer(str(self.run_dir / "train"))
            self.val_writer = tf.summary.create_file_writer(str(self.run_dir / "validation"))
            if hparams:
                write_hparams(self.run_dir, hparams)

    @classmethod
    def for_run(cls, trainer, model_cfg, cfg, run_dir, chief: bool = True, sample_fn=None, log=print):
        """The reporter of a training run: its hparams, the FLOPs per token of
        the model and, on the chief, the devices' peak (from cfg.peak_flops or
        measured once here), logged with `log`."""
        from tfgpt.flops import flops_per_token
        from tfgpt.model import count_params

        fpt = flops_per_token(model_cfg)
        peak = None
        extra = {"num_params": count_params(trainer.model), "flops_per_token": fpt}
        if chief:
            device, count = peak_devices(trainer.strategy)
            per_device, source = cfg.peak_flops, "--peak-flops"
            if per_device is None:
                t0 = time.perf_counter()
                try:
                    per_device = measured_peak(trainer.precision, device)
                except tf.errors.OpError as e:  # e.g. out of memory: train on, without mfu
                    log(f"warning: could not measure the peak FLOP/s of {device}, so no mfu scalar "
                        f"({type(e).__name__}); pass --peak-flops")
                source = f"{trainer.precision} matmuls measured on {device} in {time.perf_counter() - t0:.1f}s"
            if per_device is not None:
                peak = per_device * count
                extra["mfu_peak_flops"] = peak
                log(f"mfu: {fpt / 1e6:,.2f} MFLOP per token; peak {count} x {per_device / 1e12:,.3f} TFLOP/s "
                    f"({source})")
        return cls(run_dir, cfg.epochs, cfg.log_every, cfg.quiet, chief, sample_fn,
                   tokens_per_step=cfg.batch_size * model_cfg.maxlen, flops_per_token=fpt,
                   peak_flops=peak, hparams=run_hparams(model_cfg, cfg, **extra),
                   profile_steps=cfg.profile_range())

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
            tf.summary.trace_on(graph=True, profiler=False)
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
            with self.train_writer.as_default():
                tf.summary.trace_export("train_step", step=step)
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
        tokens = self.tokens_per_step or info["tokens_per_second"] * info["step_time"]
        tokens_per_second = tokens / step_time
        with self.train_writer.as_default(step=info["step"]):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("perplexity", perplexity(loss))
            tf.summary.scalar("learning_rate", info["lr"])
            tf.summary.scalar("grad_norm", info["grad_norm"])
            tf.summary.scalar("tokens_per_second", tokens_per_second)
            tf.summary.scalar("step_time_ms", 1000 * step_time)
            if self.flops_per_token and self.peak_flops:
                mfu = self.flops_per_token * tokens_per_second / self.peak_flops
                tf.summary.scalar("mfu", mfu)
                if mfu > 1 and not self._warned_mfu:
                    self._warned_mfu = True
                    self.print(f"warning: mfu {mfu:.2f} is above 1: the peak of {self.peak_flops / 1e12:.3f} "
                               "TFLOP/s is too low (measured while the machine was busy?); pass --peak-flops")
        self.train_writer.flush()
        self._pending = []

    # --- per epoch --------------------------------------------------------------

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
            prompt, texts, settings = self.sample_fn(info["step"])
            texts = [texts] if isinstance(texts, str) else list(texts)
            for text in texts:
                self.print(f"sample: {text}")
            seconds = time.perf_counter() - t0
            with self.train_writer.as_default(step=info["step"]):
                tf.summary.text("samples", sample_markdown(prompt, texts, f"{settings}, {seconds:.2f}s"))
            self.train_writer.flush()

    # --- profiler -----------------------------------------------------------------

    def _start_profiler(self, step: int):
        try:
            tf.profiler.experimental.start(str(self.run_dir / "train"))
        except (tf.errors.OpError, AttributeError, RuntimeError) as e:
            self.profile_steps = None
            self.print(f"warning: profiler unavailable, no trace written ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
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
        self.print(f"profile of steps {self._profile_from}-{self.profile_steps[1]} written to "
                   f"{self.run_dir / 'train' / 'plugins' / 'profile'}")

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
                tf.summary.trace_off()
            if self._profiling:
                self._stop_profiler()
        finally:
            self.train_writer.close()
            self.val_writer.close()


# --- helpers --------------------------------------------------------------------------


def run_hparams(model_cfg, cfg, **extra) -> dict:
    """The hyperparameters of a run for the HParams plugin: every field of the
    model and train configs whose value is a bool, int, float or str (None
    fields are left out), head_dim resolved to the key size in use, and
    `extra` (e.g. num_params, flops_per_token). Names are the config field
    names, which the two configs do not share."""
    values = dataclasses.asdict(model_cfg) | {"head_dim": model_cfg.key_dim}
    values |= {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HPARAMS}
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
    from tensorboard.plugins.hparams import summary_v2 as hp

    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        hp.hparams(hparams, trial_id=run_dir.name)
    writer.close()


def peak_devices(strategy) -> tuple[str, int]:
    """(device to measure, how many such devices train together).

    One per replica on GPUs; logical CPU devices of one machine share its
    cores, so a CPU counts once per worker."""
    from tfgpt.flops import default_device

    replicas = strategy.num_replicas_in_sync
    try:
        local = list(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError, NotImplementedError):  # the default strategy
        local = []
    device = local[0] if local else default_device()
    if "GPU" in device.upper():
        return device, replicas
    return device, max(1, replicas // max(1, len(local)))


_PEAKS: dict = {}


def measured_peak(precision: str, device: str) -> float:
    """measure_matmul_peak for the training precision on device, once per
    process (later runs in the same process reuse it)."""
    from tfgpt.devices import compute_dtype
    from tfgpt.flops import measure_matmul_peak

    key = (precision, device)
    if key not in _PEAKS:
        _PEAKS[key] = measure_matmul_peak(compute_dtype(precision), device)
    return _PEAKS[key]


def sample_markdown(prompt: str, texts: list[str], settings: str) -> str:
    """Markdown for the Text tab: one paragraph (line) per sample, its first
    len(prompt words) words (the prompt as the model read it) in bold, then
    the settings in italics."""
    n = len(prompt.split())
    lines = []
    for text in texts:
        words = text.split()
        head, tail = _md(" ".join(words[:n])), _md(" ".join(words[n:]))
        lines.append(" ".join(part for part in (f"**{head}**" if head else "", tail) if part))
    return "\n\n".join(lines + [f"*{_md(settings)}*"])


def _md(text: str) -> str:
    """Escapes the characters Markdown would interpret."""
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!<>|" else c for c in text)
