"""The training loop: distributed steps, validation, checkpoints.

One call runs several train steps (`steps_per_call`), for every strategy (the
default one, MirroredStrategy, MultiWorkerMirroredStrategy):

    outer tf.function (never jit-compiled), a loop of up to n steps:
      next global batch from the distributed iterator
      strategy.run(replica_step)             in each replica:
        loss_sum, count, grads = grad_fn()   jit-compiled with XLA on
        all-reduce(loss_sum, count, grads)   outside XLA
        Adam update with grads scaled by     jit-compiled with XLA on
          1 / global count (the mean over
          real target tokens) and the clip
      the step's loss, norm, lr and count into on-device arrays
    the host reads the arrays once per call

The loop's condition reads only its counter and n, so the host waits for the
device once per call, not once per step; a step that must end training
makes the call's remaining steps change nothing (`train_steps`). Every
replica applies the same all-reduced update to its own copy of the
variables, so the copies stay identical. Summaries, progress, samples and
exports come from the chief, outside any compiled function (the `hooks` of
`Trainer.fit`); checkpoints are tfgpt/train/checkpoint.py's.

float16 (`--precision float16`) multiplies the loss by a dynamic loss scale
(tfgpt/train/loss_scale.py) before the backward pass; a step whose all-reduced
gradients are not finite is skipped and the scale halved. In float32 and
bfloat16 a non-finite loss or gradient stops training with an error.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.data.windows import batches_per_epoch, eval_dataset, train_dataset
from tfgpt.model.gpt import GPT
from tfgpt.runtime import memory
from tfgpt.runtime.cluster import is_chief
from tfgpt.runtime.devices import compute_dtype
from tfgpt.train.checkpoint import Checkpoints
from tfgpt.train.loss_scale import LossScale
from tfgpt.train.optim import Adam, clip_scale, make_schedule
from tfgpt.train.plan import Plan, make_plan


class NonFiniteLoss(RuntimeError):
    """The loss or the gradients stopped being finite. The step that saw it was
    not applied, and nothing after the last checkpoint was saved."""

    def __init__(self, step: int, loss: float, grad_norm: float, scale: float | None = None):
        detail = f"; float16 gradients overflow even at loss scale {scale:g}" if scale is not None else ""
        super().__init__(
            f"the loss or the gradients are not finite at step {step} (loss {loss}, gradient norm {grad_norm}){detail}"
        )
        self.step = step


class Interrupted(RuntimeError):
    """Training stopped on a signal after finishing a step and saving."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class TrainState(tf.Module):
    """Where training stands: the global step (global batches trained on), the
    epoch in progress and the global batches of it already consumed. The
    optimizer counts its own updates: fewer, when float16 skipped steps."""

    def __init__(self):
        super().__init__(name="state")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch")


class Trainer:
    """Builds the model, optimizer and step functions under a strategy and runs
    the loop over prepared windows, as `plan` says (tfgpt/train/plan.py:
    precision, XLA, steps per call, loss chunk); without a plan, the one
    `make_plan` gives for these configs and strategy."""

    def __init__(
        self,
        model_cfg: GPTConfig,
        cfg: TrainConfig,
        strategy,
        run_dir: str | Path,
        total_steps: int | None = None,
        plan: Plan | None = None,
    ):
        self.model_cfg, self.cfg, self.strategy = model_cfg, cfg, strategy
        self.run_dir = Path(run_dir)
        self.chief = is_chief(strategy)
        self.plan = plan = plan or make_plan(model_cfg, cfg, strategy)
        self.replicas = strategy.num_replicas_in_sync
        if (plan.replicas, plan.loss_rows) != (self.replicas, cfg.batch_size // self.replicas * model_cfg.maxlen):
            raise ValueError("the plan was made for another strategy, batch size or model")
        self.xla, self.precision, self.steps_per_call = plan.xla, plan.precision, plan.steps_per_call
        self.loss_rows, self.loss_chunk = plan.loss_rows, plan.loss_chunk  # a replica's loss rows, per chunk
        with strategy.scope():
            self.model = GPT(model_cfg, seed=cfg.seed, compute_dtype=compute_dtype(self.precision))
            schedule = make_schedule(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, total_steps)
            self.optimizer = Adam(
                self.model.trainable_variables,
                lr=schedule,
                beta1=cfg.beta1,
                beta2=cfg.beta2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
            )
            self.state = TrainState()
            self.loss_scale = LossScale()  # used in float16 only; checkpointed always
        self.checkpoints = Checkpoints(
            dict(model=self.model, optimizer=self.optimizer, state=self.state, loss_scale=self.loss_scale),
            self.run_dir,
            self.state.step,
            keep=cfg.keep_checkpoints,
            chief=self.chief,
        )
        self.stop_signal = None  # set by a signal handler: stop after the current step
        self._stepped = False  # whether train_step has run in this process
        self._build_steps()
        # TensorFlow is loaded and running: unmap the pages of its libraries
        # that only start-up touched (tfgpt/runtime/memory.py).
        memory.release_library_pages()

    # --- steps ---------------------------------------------------------------

    def _build_steps(self):
        model, variables, cfg = self.model, self.model.trainable_variables, self.cfg
        chunk, branch_free = self.loss_chunk, self.xla
        scaled = self.precision == "float16"  # dynamic loss scaling
        optimizer, loss_scale = self.optimizer, self.loss_scale
        # float16: the loss scale multiplies the mean over a replica's rows,
        # not the sum, so that the summed weight gradients stay in range.
        rows = float(cfg.batch_size // self.replicas * self.model_cfg.maxlen)
        # --embedding-update per-token: the token table's per-occurrence
        # gradient statistics go to Adam beside its summed gradient.
        per_token = cfg.embedding_update == "per-token"
        table = [v.ref() for v in variables].index(model.token_emb.table.ref()) if per_token else None
        vocab = self.model_cfg.vocab_size

        def grads_fn(x, y, w, seed, scale):
            with tf.GradientTape() as tape:
                loss_sum = model.loss_sum(
                    x,
                    y,
                    w,
                    seed=seed,
                    training=True,
                    chunk=chunk,
                    branch_free=branch_free,
                    smoothing=cfg.label_smoothing,
                )
                target = loss_sum * (scale / rows) if scaled else loss_sum
            raw = tape.gradient(target, variables)
            grads = [tf.convert_to_tensor(g) for g in raw]
            stats = []
            if per_token:  # the lookup's gradient: one [D] row per occurrence
                occurrences = raw[table]
                stats = [tf.math.unsorted_segment_sum(tf.square(occurrences.values), occurrences.indices, vocab)]
            return loss_sum, tf.reduce_sum(w), grads, stats

        def apply_fn(grads, count, loss, scale, stats, active):
            # grads are sums over the global batch (times scale / rows in
            # float16): the update divides them by the number of real target
            # tokens (and that factor) and clips their global norm.
            divisor = tf.maximum(count, 1.0) * (scale / rows) if scaled else tf.maximum(count, 1.0)
            factor, norm = clip_scale(grads, cfg.clip_norm, divisor)
            # A step with a non-finite loss or gradient leaves every variable
            # (and the optimizer's step) untouched; so does every step of a
            # call after one that stopped training (active False).
            finite = tf.math.is_finite(norm) & tf.math.is_finite(loss)
            applied = finite & active
            by_row = {table: stats[0]} if per_token else None
            if branch_free:
                lr = optimizer.apply(grads, variables, factor, where=applied, rows=by_row)
            else:
                lr = tf.cond(
                    applied,
                    lambda: optimizer.apply(grads, variables, factor, rows=by_row),
                    lambda: optimizer.learning_rate(optimizer.step + 1),
                )
            if scaled:
                loss_scale.update(finite, where=active)
            return norm, lr, finite

        def eval_fn(x, y, w):
            loss = model.loss_sum(x, y, w, training=False, chunk=chunk, with_grad=False, branch_free=branch_free)
            return loss, tf.reduce_sum(w)

        grads_fn = tf.function(grads_fn, jit_compile=self.xla)
        apply_fn = tf.function(apply_fn, jit_compile=self.xla)
        eval_fn = tf.function(eval_fn, jit_compile=self.xla)
        sum_ = tf.distribute.ReduceOp.SUM

        shape = [cfg.batch_size // self.replicas, self.model_cfg.maxlen]  # one replica's slice
        count_padding = cfg.padding_targets == "count" and cfg.packing == "truncate"

        def replica_train(x, y, w, seed, active):
            # A multi-worker iterator read inside a loop leaves the batch size
            # unknown; the loss needs it static (every batch is full).
            x, y, w = (tf.ensure_shape(t, shape) for t in (x, y, w))
            if count_padding:  # every position is a target: the mean over all of them
                w = tf.ones_like(w)
            ctx = tf.distribute.get_replica_context()
            replica_seed = tf.random.experimental.stateless_fold_in(seed, ctx.replica_id_in_sync_group)
            scale = tf.identity(loss_scale.scale) if scaled else tf.ones([])
            loss_sum, count, grads, stats = grads_fn(x, y, w, replica_seed, scale)
            loss_sum, count = ctx.all_reduce(sum_, [loss_sum, count])
            grads = ctx.all_reduce(sum_, grads)
            stats = ctx.all_reduce(sum_, stats) if stats else stats
            loss = loss_sum / tf.maximum(count, 1.0)
            norm, lr, finite = apply_fn(grads, count, loss, scale, stats, active)
            return loss, norm, lr, count, finite

        def replica_eval(x, y, w):
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(sum_, list(eval_fn(x, y, w)))

        strategy, state = self.strategy, self.state

        def first(values):
            # Every replica holds the same all-reduced values: take the first.
            return [strategy.experimental_local_results(v)[0] for v in values]

        @tf.function
        def train_step(batch, seed):
            """One step on a given global batch; counts no state. -> loss, norm, lr, count, finite."""
            return first(strategy.run(replica_train, args=(*batch, seed, tf.constant(True))))

        @tf.function
        def train_steps(iterator, n):
            """n steps on the iterator's next global batches, counting them in
            the state. -> per-step [n] loss, norm, lr, count, finite; the loss
            scale after each step.

            The loop's condition reads only its counter and n, which the host
            knows: a condition on a value a step computes would make the host
            wait for each step on a GPU before queueing the next. A step that
            must end training (`_keeps_going`) instead turns the rest of the
            call into steps that change nothing (no update, no count); the
            host stops at that step's row."""
            arrays = [tf.TensorArray(dtype, size=n) for dtype in (tf.float32,) * 4 + (tf.bool, tf.float32)]
            i, going = tf.constant(0), tf.constant(True)
            while i < n:
                seed = tf.stack([tf.constant(cfg.seed, tf.int64), state.step])
                args = (*next(iterator), seed, going)
                loss, norm, lr, count, finite = first(strategy.run(replica_train, args=args))
                counted = tf.cast(going, tf.int64)
                state.step.assign_add(counted)
                state.batch.assign_add(counted)
                scale = tf.identity(loss_scale.scale)
                values = (loss, norm, lr, count, finite, scale)
                arrays = [a.write(i, v) for a, v in zip(arrays, values)]
                going = going & self._keeps_going(finite, loss, scale)
                i += 1
            return [a.stack() for a in arrays]

        @tf.function
        def eval_step(batch):
            return first(strategy.run(replica_eval, args=batch))

        self.train_step, self.train_steps, self.eval_step = train_step, train_steps, eval_step

    def _keeps_going(self, finite, loss, scale):
        """Whether training goes on after a step. float32 and bfloat16: only
        after a finite step. float16: also after skipping a step whose
        gradients overflowed, while the loss itself is finite and the scale
        has not fallen below 1 (at 1 an overflow is not the scale's doing)."""
        if self.precision != "float16":
            return finite
        return finite | (tf.math.is_finite(loss) & (scale >= 1.0))

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
        dist = self.distribute(lambda ctx: eval_dataset(windows, self.cfg.batch_size, self.cfg.packing, ctx))
        sums, counts = [], []
        for batch in dist:  # the host reads the sums once, at the end
            s, n = self.eval_step(batch)
            sums.append(s)
            counts.append(n)
        total, count = (float(tf.add_n(x)) if x else 0.0 for x in (sums, counts))
        return total / max(count, 1.0)

    # --- the loop ----------------------------------------------------------------

    def fit(self, train_windows: np.ndarray, val_windows: np.ndarray | None, hooks=None):
        """Trains until cfg.epochs or cfg.max_steps. `hooks` (optional) has
        on_step(info), on_epoch(info), each called on every worker, and may
        have before_step(step), called with the first global step of each
        compiled call about to run."""
        cfg = self.cfg
        per_epoch = batches_per_epoch(len(train_windows), cfg.batch_size)
        tokens_per_step = cfg.batch_size * self.model_cfg.maxlen
        history = []
        step = int(self.state.step.numpy())
        done = cfg.max_steps is not None and step >= cfg.max_steps
        while not done and int(self.state.epoch.numpy()) < cfg.epochs:
            if self.stop_signal is not None:
                raise Interrupted(self.stop_signal, step, self.checkpoints.save())
            epoch, batch = int(self.state.epoch.numpy()), int(self.state.batch.numpy())
            dist = self.distribute(
                lambda ctx, epoch=epoch, skip=batch: train_dataset(
                    train_windows, cfg.batch_size, cfg.seed, epoch, cfg.packing, ctx, skip=skip
                )
            )
            iterator = iter(dist)
            epoch_start, losses = time.perf_counter(), []
            while batch < per_epoch and not done:
                n = self._call_length(step, per_epoch - batch)
                if hooks and hasattr(hooks, "before_step"):
                    hooks.before_step(step + 1)  # e.g. start a graph trace or the profiler
                t0 = time.perf_counter()
                out = [a.numpy() for a in self.train_steps(iterator, tf.constant(n))]  # waits for the call
                dt = (time.perf_counter() - t0) / len(out[0])
                if not self._stepped:
                    # The first call traced and optimised the graph: code no
                    # later step runs.
                    self._stepped = True
                    memory.release_library_pages()
                for loss, norm, lr, count, finite, scale in zip(*out):
                    step, batch = step + 1, batch + 1
                    if not finite and self.precision != "float16" or not math.isfinite(loss):
                        raise NonFiniteLoss(step, float(loss), float(norm))
                    if not finite and scale < 1.0:
                        raise NonFiniteLoss(step, float(loss), float(norm), scale=float(scale))
                    losses.append(float(loss))
                    info = dict(
                        step=step,
                        epoch=epoch,
                        batch=batch,
                        batches=per_epoch,
                        loss=float(loss),
                        grad_norm=float(norm),
                        lr=float(lr),
                        tokens=float(count),
                        step_time=dt,
                        tokens_per_second=tokens_per_step / dt,
                        skipped=not finite,
                        loss_scale=float(scale) if self.precision == "float16" else None,
                    )
                    if hooks:
                        hooks.on_step(info)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.checkpoints.save()
                done = cfg.max_steps is not None and step >= cfg.max_steps
                if self.stop_signal is not None and not done:
                    raise Interrupted(self.stop_signal, step, self.checkpoints.save())
            finished_epoch = batch >= per_epoch
            if finished_epoch:
                self.state.epoch.assign_add(1)
                self.state.batch.assign(0)
            val_loss = self.evaluate(val_windows) if val_windows is not None and len(val_windows) else None
            info = dict(
                step=step,
                epoch=epoch,
                batches=per_epoch,
                seconds=time.perf_counter() - epoch_start,
                steps_run=len(losses),
                loss=float(np.mean(losses)) if losses else float("nan"),
                val_loss=val_loss,
                finished=finished_epoch,
            )
            history.append(info)
            self.checkpoints.save()
            if hooks:
                hooks.on_epoch(info)
        return history

    def _call_length(self, step: int, left_in_epoch: int) -> int:
        """Steps of the next call: steps_per_call, but no call runs past the end
        of the epoch, --max-steps, a --checkpoint-every step or a boundary of
        the --profile-steps range, so each happens after a whole call."""
        n = min(self.steps_per_call, left_in_epoch)
        if self.cfg.max_steps is not None:
            n = min(n, self.cfg.max_steps - step)
        marks = [self.cfg.checkpoint_every] if self.cfg.checkpoint_every else []
        for every in marks:
            n = min(n, every - step % every)
        profile = self.cfg.profile_range()
        if profile:
            for edge in (profile[0] - 1, profile[1]):
                if edge > step:
                    n = min(n, edge - step)
        return max(1, n)
