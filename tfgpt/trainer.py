"""The training loop: distributed steps, validation, checkpoints, summaries.

One train step, for every strategy (the default one, MirroredStrategy,
MultiWorkerMirroredStrategy):

    outer tf.function (never jit-compiled)
      strategy.run(replica_step)             in each replica:
        loss_sum, count, grads = grad_fn()   jit-compiled with XLA on
        all-reduce(loss_sum, count, grads)   outside XLA
        Adam update with grads scaled by     jit-compiled with XLA on
          1 / global count (the mean over
          real target tokens) and the clip

Every replica applies the same all-reduced update to its own copy of the
variables, so the copies stay identical. Summaries, progress, samples and
exports come from the chief, outside any compiled function.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt import data, memory
from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.distribute import all_gpus, fastest_precision, is_chief
from tfgpt.model import GPT
from tfgpt.optim import Adam, clip_scale, make_schedule


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients stopped being finite. The step that saw it was
    not applied, and nothing after the last checkpoint was saved."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"the loss or the gradients are not finite at step {step} "
                         f"(loss {loss}, gradient norm {grad_norm})")
        self.step = step


class Interrupted(RuntimeError):
    """Training stopped on a signal after finishing a step and saving."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class TrainState(tf.Module):
    """Where training stands: the epoch in progress and the global batches of
    it already consumed. The global step is the optimizer's."""

    def __init__(self):
        super().__init__(name="state")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch")


def use_xla(setting: str, strategy) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    return all_gpus(strategy)  # auto: XLA on GPUs; on CPU it measured slower


class Trainer:
    """Builds the model, optimizer and step functions under a strategy and runs
    the loop over prepared windows."""

    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, strategy, run_dir: str | Path,
                 total_steps: int | None = None):
        self.model_cfg, self.cfg, self.strategy = model_cfg, cfg, strategy
        self.run_dir = Path(run_dir)
        self.chief = is_chief(strategy)
        self.xla = use_xla(cfg.xla, strategy)
        self.replicas = strategy.num_replicas_in_sync
        if cfg.batch_size % self.replicas:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {self.replicas} replicas")
        if cfg.precision == "auto":
            cfg.precision = fastest_precision(strategy)  # recorded as resolved in config.json
        dtype = tf.bfloat16 if cfg.precision == "bfloat16" else tf.float32
        with strategy.scope():
            self.model = GPT(model_cfg, seed=cfg.seed, compute_dtype=dtype)
            schedule = make_schedule(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, total_steps)
            self.optimizer = Adam(self.model.trainable_variables, lr=schedule,
                                  beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)
            self.state = TrainState()
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, state=self.state)
        self.manager = None
        self.stop_signal = None  # set by a signal handler: stop after the current step
        self._stepped = False  # whether train_step has run in this process
        self._build_steps()
        # TensorFlow is loaded and running: unmap the pages of its libraries
        # that only start-up touched (~270 MB of peak RSS; tfgpt/memory.py).
        memory.release_library_pages()

    # --- steps ---------------------------------------------------------------

    def _build_steps(self):
        model, variables = self.model, self.model.trainable_variables
        chunk = self.cfg.loss_chunk

        def grads_fn(x, y, w, seed):
            with tf.GradientTape() as tape:
                loss_sum = model.loss_sum(x, y, w, seed=seed, training=True, chunk=chunk)
            grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss_sum, variables)]
            return loss_sum, tf.reduce_sum(w), grads

        def apply_fn(grads, count, loss):
            # grads are sums over the global batch: the update divides them by
            # the number of real target tokens and clips their global norm.
            scale, norm = clip_scale(grads, self.cfg.clip_norm, tf.maximum(count, 1.0))
            # A non-finite loss or gradient leaves every variable (and the
            # step counter) untouched; the loop then stops with an error.
            finite = tf.math.is_finite(norm) & tf.math.is_finite(loss)
            opt = self.optimizer
            lr = tf.cond(finite, lambda: opt.apply(grads, variables, scale), lambda: opt.learning_rate(opt.step + 1))
            return norm, lr

        def eval_fn(x, y, w):
            return model.loss_sum(x, y, w, training=False, chunk=chunk, with_grad=False), tf.reduce_sum(w)

        grads_fn = tf.function(grads_fn, jit_compile=self.xla)
        apply_fn = tf.function(apply_fn, jit_compile=self.xla)
        eval_fn = tf.function(eval_fn, jit_compile=self.xla)
        sum_ = tf.distribute.ReduceOp.SUM

        def replica_train(x, y, w, seed):
            ctx = tf.distribute.get_replica_context()
            replica_seed = tf.random.experimental.stateless_fold_in(seed, ctx.replica_id_in_sync_group)
            loss_sum, count, grads = grads_fn(x, y, w, replica_seed)
            loss_sum, count = ctx.all_reduce(sum_, [loss_sum, count])
            grads = ctx.all_reduce(sum_, grads)
            loss = loss_sum / tf.maximum(count, 1.0)
            norm, lr = apply_fn(grads, count, loss)
            return loss, norm, lr, count

        def replica_eval(x, y, w):
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(sum_, list(eval_fn(x, y, w)))

        strategy = self.strategy

        @tf.function
        def train_step(batch, seed):
            out = strategy.run(replica_train, args=(*batch, seed))
            # Every replica holds the same all-reduced values: take the first.
            return [strategy.experimental_local_results(v)[0] for v in out]

        @tf.function
        def eval_step(batch):
            out = strategy.run(replica_eval, args=batch)
            return [strategy.experimental_local_results(v)[0] for v in out]

        self.train_step, self.eval_step = train_step, eval_step

    def step_seed(self, step: int):
        """The dropout seed of global step `step`: a function of the run seed
        and the step alone (replicas fold in their id)."""
        return tf.constant([self.cfg.seed, step], tf.int64)

    # --- data ----------------------------------------------------------------

    def distribute(self, make):
        """make(input_context) -> dataset of per-replica batches."""
        return self.strategy.distribute_datasets_from_function(make)

    def evaluate(self, windows: np.ndarray) -> float:
        """Mean cross-entropy over the real targets of `windows`."""
        dist = self.distribute(lambda ctx: data.eval_dataset(windows, self.cfg.batch_size, self.cfg.packing, ctx))
        total, count = 0.0, 0.0
        for batch in dist:
            s, n = self.eval_step(batch)
            total += float(s)
            count += float(n)
        return total / max(count, 1.0)

    # --- checkpoints -----------------------------------------------------------

    def open_checkpoints(self):
        directory = self.run_dir / "ckpt"
        if not self.chief:
            # Every worker must take part in a save; the others write to a
            # throwaway directory, removed at exit.
            directory = Path(tempfile.mkdtemp(prefix="tfgpt-worker-ckpt-"))
            self._scratch = directory
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(directory), max_to_keep=self.cfg.keep_checkpoints,
            step_counter=self.optimizer.step, checkpoint_name="ckpt")

    def restore_latest(self, warn=print) -> str | None:
        """Restores the newest readable checkpoint, falling back to older ones
        (with a warning naming each skipped file). None if there are none."""
        source = self.manager
        if source and not self.chief:
            # The other workers resume from the chief's checkpoints (the run
            # directory on a shared filesystem), never from their scratch copies.
            source = tf.train.CheckpointManager(self.checkpoint, str(self.run_dir / "ckpt"), max_to_keep=None)
        tried = list(reversed(source.checkpoints)) if source else []
        for path in tried:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
                return path
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                reason = str(e).strip().splitlines()[0][:200]
                warn(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__}: {reason})")
        if tried:
            raise RuntimeError(f"no readable checkpoint in {source.directory}")
        return None

    def save(self) -> str | None:
        """Writes a checkpoint at the current step (none without open_checkpoints)."""
        if self.manager is None:
            return None
        return self.manager.save(checkpoint_number=int(self.optimizer.step.numpy()))

    def close(self):
        scratch = getattr(self, "_scratch", None)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    # --- the loop ----------------------------------------------------------------

    def fit(self, train_windows: np.ndarray, val_windows: np.ndarray | None, hooks=None):
        """Trains until cfg.epochs or cfg.max_steps. `hooks` (optional) has
        on_step(info), on_epoch(info), each called on every worker, and may
        have before_step(step), called with the global step about to run."""
        cfg = self.cfg
        per_epoch = data.batches_per_epoch(len(train_windows), cfg.batch_size)
        tokens_per_step = cfg.batch_size * self.model_cfg.maxlen
        history = []
        step = int(self.optimizer.step.numpy())
        done = cfg.max_steps is not None and step >= cfg.max_steps
        while not done and int(self.state.epoch.numpy()) < cfg.epochs:
            if self.stop_signal is not None:
                raise Interrupted(self.stop_signal, step, self.save())
            epoch, skip = int(self.state.epoch.numpy()), int(self.state.batch.numpy())
            dist = self.distribute(lambda ctx: data.train_dataset(
                train_windows, cfg.batch_size, cfg.seed, epoch, cfg.packing, ctx, skip=skip))
            epoch_start, losses = time.perf_counter(), []
            for batch in dist:
                if hooks and hasattr(hooks, "before_step"):
                    hooks.before_step(step + 1)  # e.g. start a graph trace or the profiler
                t0 = time.perf_counter()
                loss, norm, lr, count = self.train_step(batch, self.step_seed(step))
                loss = float(loss)  # waits for the step
                dt = time.perf_counter() - t0
                if not self._stepped:
                    # The first step traced and optimised the graph: code no
                    # later step runs (another ~30 MB of peak RSS).
                    self._stepped = True
                    memory.release_library_pages()
                if not (math.isfinite(loss) and math.isfinite(float(norm))):
                    raise NonFiniteLoss(step + 1, loss, float(norm))
                step += 1
                self.state.batch.assign_add(1)
                losses.append(loss)
                info = dict(step=step, epoch=epoch, batch=int(self.state.batch.numpy()), batches=per_epoch,
                            loss=loss, grad_norm=float(norm), lr=float(lr), tokens=float(count),
                            step_time=dt, tokens_per_second=tokens_per_step / dt)
                if hooks:
                    hooks.on_step(info)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save()
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    done = True
                    break
                if self.stop_signal is not None:
                    raise Interrupted(self.stop_signal, step, self.save())
            finished_epoch = int(self.state.batch.numpy()) >= per_epoch
            if finished_epoch:
                self.state.epoch.assign_add(1)
                self.state.batch.assign(0)
            val_loss = self.evaluate(val_windows) if val_windows is not None and len(val_windows) else None
            info = dict(step=step, epoch=epoch, batches=per_epoch, seconds=time.perf_counter() - epoch_start,
                        steps_run=len(losses), loss=float(np.mean(losses)) if losses else float("nan"),
                        val_loss=val_loss, finished=finished_epoch)
            history.append(info)
            self.save()
            if hooks:
                hooks.on_epoch(info)
        return history


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))


def progress_line(info) -> str:
    """One line for a step: step/steps, loss, ms/step, tokens/s, ETA of the epoch."""
    left = (info["batches"] - info["batch"]) * info["step_time"]
    return (f"{info['batch']}/{info['batches']} - step {info['step']} - loss: {info['loss']:.4f} - "
            f"{1000 * info['step_time']:.0f}ms/step - {info['tokens_per_second']:,.0f} tok/s - "
            f"ETA {_duration(left)}")


def epoch_line(info, epochs: int) -> str:
    """The Keras example's format: 'Epoch 3/25 - 391/391 - 17s - 42ms/step - loss: ...'."""
    n = max(1, info["steps_run"])
    parts = [f"Epoch {info['epoch'] + 1}/{epochs}", f"{info['steps_run']}/{info['batches']}",
             f"{info['seconds']:.0f}s", f"{1000 * info['seconds'] / n:.0f}ms/step",
             f"loss: {info['loss']:.4f}"]
    if info["val_loss"] is not None:
        parts += [f"val_loss: {info['val_loss']:.4f}", f"val_perplexity: {perplexity(info['val_loss']):.1f}"]
    return " - ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"

