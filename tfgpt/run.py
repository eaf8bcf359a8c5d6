"""A whole training run: devices, data, trainer, reporting, export."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from tfgpt.cluster import ClusterError, cluster_failure, is_chief, worker_scratch
from tfgpt.config import GPTConfig, TrainConfig, save_config
from tfgpt.devices import DeviceError
from tfgpt.distribute import make_strategy
from tfgpt.memory import release_library_pages
from tfgpt.runlock import RunLock, RunLocked


def prepare_data(model_cfg: GPTConfig, cfg: TrainConfig, vocab_path: Path, reuse_vocab: bool, log=print):
    """Finds or builds the corpus's token store (tfgpt/prepare.py) and opens
    its windows. Returns (train_windows, val_windows): window sources that
    read from the store (val_windows None without validation lines).

    The vocabulary is the store's, copied to vocab_path; a resumed run
    (reuse_vocab) keeps its vocab_path, and its store holds that
    vocabulary's ids."""
    from tfgpt import data
    from tfgpt.prepare import ensure_store

    t0 = time.perf_counter()
    source = data.resolve_imdb(log=log) if cfg.data == "imdb" else cfg.data
    given = data.read_vocab(vocab_path) if reuse_vocab and vocab_path.exists() else None
    prepared = ensure_store(source, imdb_unsup=cfg.imdb_unsup, vocab_size=model_cfg.vocab_size,
                            val_fraction=cfg.val_fraction, seed=cfg.seed, vocab=given, store_dir=cfg.store_dir,
                            log=log)
    store, manifest = prepared.store, prepared.store.manifest
    train_info, val_info = store.split("train"), store.split("val")
    log(f"data: {source}: {manifest['documents']:,} files, {train_info['lines']:,} training and "
        f"{val_info['lines']:,} validation lines ({time.perf_counter() - t0:.1f}s)")
    verb = {"reused": "reusing", "built": "built", "rebuilt": "rebuilt"}[prepared.action]
    log(f"token store: {verb} {store.root} ({manifest['text_bytes'] / 1e6:,.1f} MB of text"
        + (f", {manifest['text_bytes'] / 1e6 / max(prepared.seconds, 1e-9):.1f} MB/s)" if verb != "reusing" else ")"))
    if manifest["bad_utf8"]:
        log(f"warning: {manifest['bad_utf8']} file(s) were not valid UTF-8; undecodable bytes became U+FFFD")
    params = manifest["params"]
    if (params["vocab_size"], params["val_fraction"], params["seed"]) != (
            model_cfg.vocab_size, cfg.val_fraction, cfg.seed) and given is None:
        log(f"note: the store was built with vocabulary size {params['vocab_size']}, validation fraction "
            f"{params['val_fraction']} and seed {params['seed']}")
    vocab = store.vocab()
    if given is None:
        from tfgpt.config import write_text_atomic

        write_text_atomic(vocab_path, store.vocab_path.read_text(encoding="utf-8"))
        log(f"vocabulary: {len(vocab):,} entries")
    if len(vocab) < model_cfg.vocab_size:
        # A small corpus: the output layer only needs the words that exist.
        log(f"note: the corpus has only {len(vocab)} distinct entries; vocab_size is {len(vocab)}")
        model_cfg.vocab_size = len(vocab)
    elif len(vocab) > model_cfg.vocab_size:
        log(f"note: the store's vocabulary has {len(vocab)} entries; vocab_size is {len(vocab)}")
        model_cfg.vocab_size = len(vocab)
    train_windows = store.windows("train", model_cfg.maxlen, cfg.packing)
    val_windows = store.windows("val", model_cfg.maxlen, cfg.packing) if val_info["lines"] else None
    log(f"tokens: {train_windows.tokens:,} in training lines -> {len(train_windows):,} windows of "
        f"{model_cfg.maxlen + 1} ({cfg.packing})")
    return train_windows, val_windows


def _fail(message, status: int) -> int:
    """Prints the one-line error a user sees and returns the exit status."""
    print(f"train.py: error: {message}", file=sys.stderr)
    return status


def train(model_cfg: GPTConfig, cfg: TrainConfig, run_dir: Path, resume: bool) -> int:
    """Runs training; returns the process exit status."""
    try:
        strategy = make_strategy(cfg.gpus, cfg.cpu_replicas, cfg.cluster, cfg.collective_timeout,
                                 cluster_port=cfg.cluster_port)  # before any other TensorFlow op
    except DeviceError as e:
        return _fail(e, 2)
    except ClusterError as e:
        return _fail(e, 1)
    # TensorFlow is imported: unmap the library pages only its start-up used,
    # before reading and tokenizing the corpus (see tfgpt/memory.py).
    release_library_pages()
    chief = is_chief(strategy)
    log = print if chief else (lambda *a, **k: None)
    if cfg.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    cfg, notes = resolve_devices(cfg, strategy, resume)
    log(device_line(strategy, cfg))
    for note in notes:
        log(note)
    lock = RunLock(run_dir) if chief else None
    try:
        if lock:
            lock.acquire()
        return _train(strategy, model_cfg, cfg, run_dir, resume, chief, log)
    except RunLocked as e:
        return _fail(e, 2)
    except KeyboardInterrupt:
        print("\ntrain.py: interrupted before training started; nothing to save", file=sys.stderr)
        return 130
    finally:
        if lock:
            lock.release()


def resolve_devices(cfg: TrainConfig, strategy, resume: bool) -> tuple[TrainConfig, list[str]]:
    """(cfg with compute_precision set for this strategy's devices, lines to
    tell the user). On --resume the precision is checked again: `auto` may
    choose differently on other devices (the weights are float32 in every
    precision, so the run goes on); an explicit precision that the devices
    do not run natively is pointed out."""
    from tfgpt.devices import native, resolve_precision

    chosen, notes = resolve_precision(cfg.precision, strategy), []
    if resume and cfg.compute_precision and chosen != cfg.compute_precision:
        notes.append(f"precision: {chosen} on these devices (--precision {cfg.precision}); the run trained in "
                     f"{cfg.compute_precision} before")
    if cfg.precision != "auto" and not native(chosen, strategy):
        notes.append(f"warning: --precision {chosen} is not native on these devices: slower than float32, "
                     "or emulated")
    return dataclasses.replace(cfg, compute_precision=chosen), notes


def device_line(strategy, cfg: TrainConfig) -> str:
    """The run's first line: devices, precision, XLA, replicas, steps per call."""
    from tfgpt.devices import describe
    from tfgpt.trainer import auto_steps_per_call, use_xla

    workers = ""
    if getattr(strategy, "cluster_resolver", None) is not None:
        spec = strategy.cluster_resolver.cluster_spec().as_dict()
        workers = f" on each of {sum(len(v) for v in spec.values())} workers"
    spc = auto_steps_per_call(cfg.steps_per_call, strategy, cfg.log_every)
    return (f"devices: {describe(strategy)}{workers}; precision {cfg.compute_precision}; "
            f"XLA {'on' if use_xla(cfg.xla, strategy) else 'off'}; {strategy.num_replicas_in_sync} replica(s); "
            f"{spc} step(s) per call" + ("; deterministic ops" if cfg.deterministic else ""))


def _train(strategy, model_cfg, cfg, run_dir, resume, chief, log) -> int:
    import signal

    from tfgpt import data
    from tfgpt.report import Reporter
    from tfgpt.trainer import Interrupted, NonFiniteLoss, Trainer

    vocab_path = run_dir / "vocab.txt"
    if not chief:  # only the chief writes into the run directory
        vocab_path = worker_scratch(run_dir, resume) / "vocab.txt"
    try:
        train_windows, val_windows = prepare_data(model_cfg, cfg, vocab_path, reuse_vocab=resume, log=log)
        per_epoch = data.batches_per_epoch(len(train_windows), cfg.batch_size)
        total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
        trainer = Trainer(model_cfg, cfg, strategy, run_dir, total_steps=total)
    except (data.DataError, ValueError) as e:
        return _fail(e, 2)
    if chief:
        save_config(run_dir / "config.json", model_cfg, cfg)
    trainer.open_checkpoints()
    if resume:
        try:
            path = trainer.restore_latest(warn=log)
        except RuntimeError as e:
            return _fail(e, 2)
        log(f"resumed from {path} (step {int(trainer.state.step.numpy())})" if path
            else "resume: no checkpoint yet, starting from step 0")
    from tfgpt.model import count_params

    log(f"model: {count_params(trainer.model):,} parameters; {per_epoch} steps per epoch")

    sample_fn = make_sample_fn(trainer, cfg, vocab_path) if chief else None
    reporter = Reporter.for_run(trainer, model_cfg, cfg, run_dir, chief, sample_fn, log)

    def on_signal(signum, frame):
        if trainer.stop_signal is None:
            log(f"\n{signal.Signals(signum).name}: stopping after the current step and saving a checkpoint "
                "(send it again to stop at once)")
            trainer.stop_signal = signum
        else:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        history = trainer.fit(train_windows, val_windows, reporter)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        log(f"stopped by {name} after step {e.step}; checkpoint: {e.checkpoint}")
        log(f"resume with: python train.py --logdir {cfg.logdir} --run-name {cfg.run_name} --resume")
        return 128 + e.signum
    except NonFiniteLoss as e:
        last = trainer.manager.latest_checkpoint if trainer.manager else None
        return _fail(f"{e}; the step was not applied and nothing was saved after it; "
                     f"last good checkpoint: {last or 'none'}", 1)
    except Exception as e:  # a lost worker: one line, not a traceback
        message = cluster_failure(strategy, e, cfg.collective_timeout)
        if message is None:
            raise
        return _fail(message, 1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        reporter.close()
        trainer.close()
    if chief and cfg.export:
        from tfgpt.export import export_model

        with op_determinism(False):  # serving_default draws a fresh seed per request
            path = export_model(trainer.model, vocab_path, run_dir / "export")
        log(f"exported SavedModel: {path}")
    if history and history[-1]["val_loss"] is not None:
        log(f"final validation loss {history[-1]['val_loss']:.4f}")
    log(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    return 0


@contextlib.contextmanager
def op_determinism(enabled: bool):
    """TensorFlow's op determinism set to `enabled` inside the block, restored
    after. (TensorFlow has a public switch to turn it on, not off.)"""
    from tensorflow.python.framework import config

    before = config.is_op_determinism_enabled()
    (config.enable_op_determinism if enabled else config.disable_op_determinism)()
    try:
        yield
    finally:
        (config.enable_op_determinism if before else config.disable_op_determinism)()


def make_sample_fn(trainer, cfg: TrainConfig, vocab_path: Path):
    """step -> (prompt, text, settings): the per-epoch sample, from the in-graph sampler."""
    import tensorflow as tf

    from tfgpt.data import split_words
    from tfgpt.sampler import Sampler

    sampler = Sampler(trainer.model, str(vocab_path))

    def sample(step: int):
        # One row: every input of `generate` has the batch dimension. The
        # seed folds the step into the run's seed, so that each epoch's
        # sample differs and a rerun gives the same ones.
        out = sampler.generate(
            prompt=tf.constant([cfg.prompt]), max_tokens=tf.constant([cfg.gen_tokens], tf.int32),
            top_k=tf.constant([cfg.top_k], tf.int32), top_p=tf.constant([1.0]),
            temperature=tf.constant([cfg.temperature], tf.float32), repetition_penalty=tf.constant([1.0]),
            seed=tf.constant([cfg.seed * 1_000_003 + step], tf.int64))
        text = out["text"].numpy()[0].decode("utf-8", errors="replace")
        settings = f"{cfg.gen_tokens} tokens, top-k {cfg.top_k}, temperature {cfg.temperature}, step {step}"
        return prompt, text, settings

    # The prompt as the model sees it (standardized), to mark it in the sample.
    prompt = " ".join(w.decode("utf-8") for w in split_words(tf.constant([cfg.prompt]))[0].numpy())
    return sample
