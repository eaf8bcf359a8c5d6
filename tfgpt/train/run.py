"""A whole training run: devices, data, trainer, reporting, export.

`train` runs the steps in order: the strategy (before any other TensorFlow
op), the plan (tfgpt/train/plan.py: precision, XLA, steps per call, loss
chunk) and its device line, the run lock, then `_train`: the data and the
resolved configs (saved as config.json), the trainer and its checkpoints,
the reporter, the fit under signal handlers, and the export.

Besides its figures, a run says how long its start took: `data: ready in
S s` (finding or building the token store and opening its windows) and
`first step: S s after the process started`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import tensorflow as tf
from tensorflow.python.framework import config

from tfgpt.config import GPTConfig, TrainConfig, save_config, write_text_atomic
from tfgpt.console import setup_logging
from tfgpt.data.corpus import resolve_imdb
from tfgpt.data.prepare import ensure_store
from tfgpt.data.subword import SubwordVocab
from tfgpt.data.text import read_vocab, split_words
from tfgpt.data.windows import batches_per_epoch, choose_packing
from tfgpt.errors import UserError, run_main
from tfgpt.model.gpt import count_params
from tfgpt.runtime.cluster import cluster_failure, is_chief
from tfgpt.runtime.distribute import make_strategy
from tfgpt.runtime.flops import flops_per_token, measured_peak, peak_devices
from tfgpt.runtime.memory import release_library_pages
from tfgpt.serving import tokenizers
from tfgpt.serving.export import SERVING_PRECISION, export_model, in_precision
from tfgpt.serving.sampler import Sampler
from tfgpt.train.checkpoint import worker_scratch
from tfgpt.train.plan import Plan, make_plan
from tfgpt.train.report import Reporter
from tfgpt.train.runlock import RunLock, RunLocked
from tfgpt.train.trainer import Interrupted, NonFiniteLoss, Trainer

log = logging.getLogger(__name__)


def prepare_data(
    model_cfg: GPTConfig, cfg: TrainConfig, vocab_path: Path, reuse_vocab: bool, packing_given: bool = True
):
    """Finds or builds the corpus's token store (tfgpt/data/prepare.py) and opens
    its windows. Returns (train_windows, val_windows, model_cfg, cfg): window
    sources that read from the store (val_windows None without validation
    lines), model_cfg with the vocabulary size of the store and cfg with the
    packing trained with (new configs; the ones given are left as they are).

    A corpus whose lines give fewer truncate windows than one global batch,
    where pack would give enough, is packed (with a note) unless --packing
    was given (packing_given): then it is an error naming --packing pack
    (`windows.choose_packing`).

    The tokenizer (cfg.tokenizer) is the store's: its vocabulary, vocab.txt
    or subword.json, is copied to vocab_path; a resumed run (reuse_vocab)
    keeps its vocab_path, and its store holds that vocabulary's ids."""

    t0 = time.perf_counter()
    source = resolve_imdb() if cfg.data == "imdb" else cfg.data
    subword = cfg.tokenizer == "subword"
    given = read_vocab(vocab_path) if reuse_vocab and vocab_path.exists() and not subword else None
    given_subword = vocab_path if reuse_vocab and vocab_path.exists() and subword else None
    prepared = ensure_store(
        source,
        imdb_unsup=cfg.imdb_unsup,
        vocab_size=model_cfg.vocab_size,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        vocab=given,
        store_dir=cfg.store_dir,
        **(dict(tokenizer="subword", given_subword=given_subword) if subword else {}),
    )
    store, manifest = prepared.store, prepared.store.manifest
    train_info, val_info = store.split("train"), store.split("val")
    units = "documents" if subword else "lines"  # what a subword store's units are
    log.info(
        f"data: {source}: {manifest['documents']:,} files, {train_info['lines']:,} training and "
        f"{val_info['lines']:,} validation {units} ({time.perf_counter() - t0:.1f}s)"
    )
    verb = {"reused": "reusing", "built": "built", "rebuilt": "rebuilt"}[prepared.action]
    rate = f", {manifest['text_bytes'] / 1e6 / max(prepared.seconds, 1e-9):.1f} MB/s" if verb != "reusing" else ""
    log.info(f"token store: {verb} {store.root} ({manifest['text_bytes'] / 1e6:,.1f} MB of text{rate})")
    if manifest["bad_utf8"]:
        log.warning(f"warning: {manifest['bad_utf8']} file(s) were not valid UTF-8; undecodable bytes became U+FFFD")
    params = manifest["params"]
    built_with = (params["vocab_size"], params["val_fraction"], params["seed"])
    if built_with != (model_cfg.vocab_size, cfg.val_fraction, cfg.seed) and given is None and given_subword is None:
        log.info(
            f"note: the store was built with vocabulary size {params['vocab_size']}, validation fraction "
            f"{params['val_fraction']} and seed {params['seed']}"
        )
    if subword:
        entries = SubwordVocab.load(store.tokenizer_path).size
        if given_subword is None:
            write_text_atomic(vocab_path, store.tokenizer_path.read_text(encoding="utf-8"))
            log.info(f"subword vocabulary: {entries:,} entries (byte-level BPE), kept as {vocab_path.name}")
    else:
        entries = len(store.vocab())
        if given is None:
            write_text_atomic(vocab_path, store.vocab_path.read_text(encoding="utf-8"))
            log.info(f"vocabulary: {entries:,} entries")
    if entries < model_cfg.vocab_size:
        # A small corpus: the output layer only needs the words that exist.
        log.info(f"note: the corpus has only {entries} distinct entries; vocab_size is {entries}")
        model_cfg = dataclasses.replace(model_cfg, vocab_size=entries)
    elif entries > model_cfg.vocab_size:
        log.info(f"note: the store's vocabulary has {entries} entries; vocab_size is {entries}")
        model_cfg = dataclasses.replace(model_cfg, vocab_size=entries)
    packing, note = choose_packing(
        train_info, model_cfg.maxlen, cfg.batch_size, cfg.packing, packing_given, whole_text=subword
    )
    if note:
        log.info(note)
    cfg = dataclasses.replace(cfg, packing=packing)
    train_windows = store.windows("train", model_cfg.maxlen, cfg.packing)
    val_windows = store.windows("val", model_cfg.maxlen, cfg.packing) if val_info["lines"] else None
    log.info(
        f"tokens: {train_windows.tokens:,} in training {units} -> {len(train_windows):,} windows of "
        f"{model_cfg.maxlen + 1} ({cfg.packing})"
    )
    log.info(f"data: ready in {time.perf_counter() - t0:.2f} s")
    return train_windows, val_windows, model_cfg, cfg


def seconds_since_start() -> float:
    """Seconds since this process started (Linux: from /proc), else since
    this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rpartition(")")[2].split()[19])  # field 22: clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def train(model_cfg: GPTConfig, cfg: TrainConfig, run_dir: Path, resume: bool, packing_given: bool = False) -> int:
    """Runs training; returns the process exit status (a UserError's one
    line on stderr and its code, `tfgpt.errors.run_main`). packing_given:
    cfg.packing was asked for (a flag, or a resumed run's config), so it is
    never replaced by the automatic choice (`prepare_data`)."""
    return run_main("train.py", lambda: _run(model_cfg, cfg, run_dir, resume, packing_given))


def _run(model_cfg: GPTConfig, cfg: TrainConfig, run_dir: Path, resume: bool, packing_given: bool = False) -> int:
    """The run: the strategy (before any other TensorFlow op), the plan and
    its device line, the run lock, then `_train`."""
    setup_logging(chief=True)  # until the cluster is known, every worker prints
    strategy = make_strategy(
        cfg.gpus, cfg.cpu_replicas, cfg.cluster, cfg.collective_timeout, cluster_port=cfg.cluster_port
    )  # before any other TensorFlow op
    # TensorFlow is imported: unmap the library pages only its start-up used,
    # before reading and tokenizing the corpus (see tfgpt/runtime/memory.py).
    release_library_pages()
    chief = is_chief(strategy)
    setup_logging(chief)  # the other workers' logger is quiet
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    plan = make_plan(model_cfg, cfg, strategy, resume)
    cfg = dataclasses.replace(cfg, compute_precision=plan.precision)  # saved in config.json
    log.info(plan.device_line())
    for note in plan.notes:
        log.info(note)
    lock = RunLock(run_dir) if chief else None
    try:
        if lock:
            lock.acquire()
        return _train(strategy, plan, model_cfg, cfg, run_dir, resume, chief, packing_given)
    except RunLocked as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted before training started; nothing to save", file=sys.stderr)
        return 130
    finally:
        if lock:
            lock.release()


def _train(strategy, plan: Plan, model_cfg, cfg, run_dir, resume, chief, packing_given=False) -> int:
    """The run after the devices are set: data, trainer, reporter, fit, export."""

    vocab_path = vocab_file(run_dir, resume, chief, cfg.tokenizer)
    try:
        train_windows, val_windows, model_cfg, cfg = prepare_data(
            model_cfg, cfg, vocab_path, reuse_vocab=resume, packing_given=packing_given
        )
        per_epoch = batches_per_epoch(len(train_windows), cfg.batch_size)
        total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
        trainer = Trainer(model_cfg, cfg, strategy, run_dir, total_steps=total, plan=plan.for_model(model_cfg, cfg))
    except UserError:
        raise
    except ValueError as e:  # a value the data or the model cannot take: the user's to change
        raise UserError(str(e)) from None
    if chief:  # the configs as resolved for this run: vocabulary size, packing, precision
        save_config(run_dir / "config.json", model_cfg, cfg)
    trainer.checkpoints.open()
    if resume:
        try:
            path = trainer.checkpoints.restore_latest()
        except RuntimeError as e:
            raise UserError(str(e)) from None
        log.info(
            f"resumed from {path} (step {int(trainer.state.step.numpy())})"
            if path
            else "resume: no checkpoint yet, starting from step 0"
        )
    log.info(
        f"model: {count_params(trainer.model):,} parameters; {per_epoch} steps per epoch; output layer and loss "
        f"in chunks of {trainer.loss_chunk} of a replica's {trainer.loss_rows} positions"
    )
    reporter = make_reporter(trainer, model_cfg, cfg, run_dir, chief, vocab_path)
    history = _fit(strategy, trainer, reporter, cfg, train_windows, val_windows)
    if isinstance(history, int):  # the exit status of a run that stopped early
        return history
    if chief and cfg.export:
        with op_determinism(False):  # serving_default draws a fresh seed per request
            path = export_model(in_precision(trainer.model), vocab_path, run_dir / "export")
        log.info(
            f"exported SavedModel: {path} ({SERVING_PRECISION}; `python -m tfgpt.export {run_dir} --precision "
            "bfloat16` for a server with native bfloat16)"
            if trainer.precision != SERVING_PRECISION
            else f"exported SavedModel: {path}"
        )
    if history and history[-1]["val_loss"] is not None:
        log.info(f"final validation loss {history[-1]['val_loss']:.4f}")
    log.info(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    return 0


def vocab_file(run_dir: Path, resume: bool, chief: bool, tokenizer: str = "word") -> Path:
    """Where this process keeps the run's tokenizer file (vocab.txt for the
    word tokenizer, subword.json for the subword one): the run directory on
    the chief; elsewhere its scratch folder (only the chief writes into the
    run directory), starting on --resume with the chief's file when the run
    directory is visible (a shared filesystem). A resumed run whose
    directory holds the other tokenizer's file, not its own, is refused."""
    name = tokenizers.FILES[tokenizer]
    other = next(n for t, n in tokenizers.FILES.items() if t != tokenizer)
    if resume and (run_dir / other).exists() and not (run_dir / name).exists():
        raise UserError(
            f"--resume: {run_dir} holds {other}, the tokenizer file of the other tokenizer, and config.json says "
            f"--tokenizer {tokenizer}; the run's files do not agree"
        )
    if chief:
        return run_dir / name
    path = worker_scratch() / name
    if resume and (run_dir / name).exists():
        shutil.copyfile(run_dir / name, path)
    return path


def make_reporter(trainer, model_cfg, cfg, run_dir, chief, vocab_path):
    """The run's Reporter: on the chief with the per-epoch sample and the
    devices' peak FLOP/s for the mfu scalar."""

    sample_fn = make_sample_fn(trainer, cfg, vocab_path) if chief else None
    peak = mfu_peak(trainer, model_cfg, cfg) if chief else None
    return Reporter.for_run(trainer, model_cfg, cfg, run_dir, chief, sample_fn, peak_flops=peak)


def mfu_peak(trainer, model_cfg, cfg) -> float | None:
    """The peak FLOP/s of all training devices together: --peak-flops per
    device, else measured once here (None when measuring fails); logged with
    the model's FLOPs per token."""

    fpt = flops_per_token(model_cfg)
    device, count = peak_devices(trainer.strategy)
    per_device, source = cfg.peak_flops, "--peak-flops"
    if per_device is None:
        t0 = time.perf_counter()
        try:
            per_device = measured_peak(trainer.precision, device)
        except tf.errors.OpError as e:  # e.g. out of memory: train on, without mfu
            log.warning(
                f"warning: could not measure the peak FLOP/s of {device}, so no mfu scalar "
                f"({type(e).__name__}); pass --peak-flops"
            )
        source = f"{trainer.precision} matmuls measured on {device} in {time.perf_counter() - t0:.1f}s"
    if per_device is None:
        return None
    log.info(f"mfu: {fpt / 1e6:,.2f} MFLOP per token; peak {count} x {per_device / 1e12:,.3f} TFLOP/s ({source})")
    return per_device * count


class FirstStep:
    """Training hooks that pass every call on to `hooks` (a Reporter) and,
    at this process's first step, log how long after the process started it
    came: TensorFlow's start, the data, the model, tracing and compiling."""

    def __init__(self, hooks):
        self.hooks, self.seen = hooks, False

    def before_step(self, step: int):
        self.hooks.before_step(step)

    def on_step(self, info):
        if not self.seen:
            self.seen = True
            log.info(f"first step: {seconds_since_start():.1f} s after the process started")
        self.hooks.on_step(info)

    def on_epoch(self, info):
        self.hooks.on_epoch(info)


def _fit(strategy, trainer, reporter, cfg, train_windows, val_windows) -> list | int:
    """trainer.fit with SIGINT and SIGTERM handlers that stop it after the
    current step. Returns its history, or the exit status of a run stopped
    by a signal; raises UserError (code 1) for a non-finite loss or a lost
    worker. Closes the reporter and the trainer's checkpoints either way."""

    def on_signal(signum, frame):
        if trainer.stop_signal is None:
            log.info(
                f"\n{signal.Signals(signum).name}: stopping after the current step and saving a checkpoint "
                "(send it again to stop at once)"
            )
            trainer.stop_signal = signum
        else:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return trainer.fit(train_windows, val_windows, FirstStep(reporter))
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        log.info(f"stopped by {name} after step {e.step}; checkpoint: {e.checkpoint}")
        log.info(f"resume with: python train.py --logdir {cfg.logdir} --run-name {cfg.run_name} --resume")
        return 128 + e.signum
    except NonFiniteLoss as e:
        raise UserError(
            f"{e}; the step was not applied and nothing was saved after it; "
            f"last good checkpoint: {trainer.checkpoints.latest or 'none'}",
            code=1,
        ) from None
    except Exception as e:  # a lost worker: one line, not a traceback
        message = cluster_failure(strategy, e, cfg.collective_timeout)
        if message is None:
            raise
        raise UserError(message, code=1) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reporter.close()
        trainer.checkpoints.close()


@contextlib.contextmanager
def op_determinism(enabled: bool):
    """TensorFlow's op determinism set to `enabled` inside the block, restored
    after. (TensorFlow has a public switch to turn it on, not off.)"""

    before = config.is_op_determinism_enabled()
    (config.enable_op_determinism if enabled else config.disable_op_determinism)()
    try:
        yield
    finally:
        (config.enable_op_determinism if before else config.disable_op_determinism)()


def make_sample_fn(trainer, cfg: TrainConfig, vocab_path: Path):
    """step -> (prompt, text, settings): the per-epoch sample, from the in-graph
    sampler, with either tokenizer (its file, vocab_path, says which)."""

    sampler = Sampler(trainer.model, str(vocab_path))

    def sample(step: int):
        # One row: every input of `generate` has the batch dimension. The
        # seed folds the step into the run's seed, so that each epoch's
        # sample differs and a rerun gives the same ones.
        out = sampler.generate(
            prompt=tf.constant([cfg.prompt]),
            max_tokens=tf.constant([cfg.gen_tokens], tf.int32),
            top_k=tf.constant([cfg.top_k], tf.int32),
            top_p=tf.constant([1.0]),
            temperature=tf.constant([cfg.temperature], tf.float32),
            repetition_penalty=tf.constant([1.0]),
            seed=tf.constant([cfg.seed * 1_000_003 + step], tf.int64),
        )
        text = out["text"].numpy()[0].decode("utf-8", errors="replace")
        settings = f"{cfg.gen_tokens} tokens, top-k {cfg.top_k}, temperature {cfg.temperature}, step {step}"
        return prompt, text, settings

    # The prompt as the model sees it, to mark it in the sample: the words
    # standardized, or (subword) the text itself.
    if sampler.subword:
        prompt = cfg.prompt
        sample.exact = True  # the Text tab shows the sample's own spacing
    else:
        prompt = " ".join(w.decode("utf-8") for w in split_words(tf.constant([cfg.prompt]))[0].numpy())
    return sample
