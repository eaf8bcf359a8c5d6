"""Training windows and the tf.data pipeline.

The pipeline takes the windows from a NumPy array or a `WindowSource`
(`len`, `width`, `gather`), such as a token store's.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from tfgpt.data.order import EpochOrder
from tfgpt.errors import UserError

log = logging.getLogger(__name__)


def make_windows(ids: np.ndarray, lengths: np.ndarray, maxlen: int, packing: str) -> np.ndarray:
    """Cuts token rows into windows of maxlen + 1 ids: int32 [N, maxlen + 1].

    truncate: one window per line, its first maxlen + 1 tokens, 0-padded
      (lines with fewer than 2 tokens give no target and are dropped).
    pack: lines joined into one stream with id 0 after each line (its end);
      windows start every maxlen tokens, so each token is a target once.
    """
    width = maxlen + 1
    if packing == "truncate":
        keep = lengths >= 2
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[keep]
        lens = np.minimum(lengths[keep], width)
        out = np.zeros([len(starts), width], np.int32)
        cols = np.arange(width)
        src = starts[:, None] + np.minimum(cols[None, :], lens[:, None] - 1)
        out[:] = np.where(cols[None, :] < lens[:, None], ids[src] if len(ids) else 0, 0)
        return out
    if packing == "pack":
        ends = np.cumsum(lengths)
        stream = np.insert(ids, ends, 0).astype(np.int32)  # 0 after every line
        n = (len(stream) - 1) // maxlen
        if n <= 0:
            return np.zeros([0, width], np.int32)
        index = np.arange(n)[:, None] * maxlen + np.arange(width)[None, :]
        return stream[index]
    raise ValueError(f"unknown packing {packing!r}")


def split_window(window, packing: str):
    """int32 [..., maxlen + 1] -> (inputs [..., maxlen], targets, weights).

    Weights are 1 for real targets. In truncate mode a target id 0 is padding
    (weight 0); in pack mode id 0 is the end-of-line separator, a real target."""
    x, y = window[..., :-1], window[..., 1:]
    w = tf.ones_like(y, tf.float32) if packing == "pack" else tf.cast(y != 0, tf.float32)
    return x, y, w


def batches_per_epoch(num_windows: int, global_batch: int) -> int:
    """Global batches in an epoch (the partial last one is dropped); a
    UserError when the windows do not fill a single one."""
    if num_windows < global_batch:
        raise UserError(
            f"the training data gives {num_windows} windows, fewer than one global batch of "
            f"{global_batch}; use more text or a smaller --batch-size"
        )
    return num_windows // global_batch


def choose_packing(
    train: dict, maxlen: int, global_batch: int, packing: str, explicit: bool, whole_text: bool = False
) -> tuple[str, str | None]:
    """The packing to train with, and a one-line note when it is not the one
    asked for. train: a token store's training split (`Store.split("train")`:
    its "line_starts", the truncate windows, "stream", its ids, and
    "tokens").

    Lines longer than the context give one truncate window each, so a corpus
    of few long lines (one long line, say) can give fewer truncate windows
    than one global batch where pack would give enough. Then pack is chosen
    when the packing was not given (explicit False); when it was, it is a
    UserError that names --packing pack.

    whole_text (the subword tokenizer, whose units are whole documents): pack
    is also chosen, when the packing was not given, where truncate windows
    would hold less than half of the training tokens (documents much longer
    than the context, as source files are). The word tokenizer keeps the
    Keras example's truncate windows whatever its lines' lengths."""
    if packing != "truncate":
        return packing, None
    truncate = int(train["line_starts"])
    pack = max(0, (int(train["stream"]) - 1) // maxlen)
    tokens = int(train["tokens"]) if whole_text else 0
    kept = min(1.0, truncate * (maxlen + 1) / max(tokens, 1))  # at most: shorter units keep less
    if whole_text and not explicit and kept < 0.5 and pack >= global_batch:
        return "pack", (
            f"note: the {truncate:,} training documents average {tokens / max(truncate, 1):,.0f} "
            f"tokens, so truncate windows (each document's first {maxlen + 1}) would train on at most {kept:.0%} "
            f"of the text; packing them instead (--packing pack: {pack:,} windows of {maxlen + 1}; "
            "--packing truncate keeps truncate)"
        )
    if truncate >= global_batch or pack < global_batch:
        return packing, None  # enough windows, or pack would not help either
    if explicit:
        raise UserError(
            f"the training data gives {truncate} windows with --packing truncate (one per line), fewer than one "
            f"global batch of {global_batch}; --packing pack gives {pack:,}: use it, or more lines or a smaller "
            "--batch-size"
        )
    return "pack", (
        f"note: the training lines give {truncate} truncate windows, fewer than one global batch of "
        f"{global_batch}; packing them instead (--packing pack: {pack:,} windows of {maxlen + 1})"
    )


class ArrayWindows:
    """Windows held in memory (int32 [N, maxlen + 1]) as a window source."""

    def __init__(self, windows: np.ndarray):
        self.windows = np.asarray(windows, np.int32)
        self.width = self.windows.shape[1]
        self._table = tf.convert_to_tensor(self.windows)  # created eagerly, captured by the pipelines

    def __len__(self) -> int:
        return len(self.windows)

    def gather(self, rows):
        """int64 [k] window indices -> int32 [k, width], in the graph."""
        return tf.gather(self._table, rows)


def window_source(windows):
    """A NumPy array of windows, or already a source (`len`, `width`, `gather`)."""
    return ArrayWindows(windows) if isinstance(windows, np.ndarray) else windows


def _slice(global_batch: int, ctx: tf.distribute.InputContext | None) -> tuple[int, int, int]:
    """(first row, rows, replicas) of this input pipeline's part of a global batch.

    A global batch is cut into num_replicas_in_sync equal slices; pipeline p
    (a worker) takes the slices of its replicas, p * local ... (p + 1) * local - 1."""
    replicas = ctx.num_replicas_in_sync if ctx else 1
    pipelines = ctx.num_input_pipelines if ctx else 1
    pipeline = ctx.input_pipeline_id if ctx else 0
    if global_batch % replicas:
        raise UserError(f"--batch-size {global_batch} is not divisible by the {replicas} replicas")
    local, per_replica = replicas // pipelines, global_batch // replicas
    return pipeline * local * per_replica, local * per_replica, local


def train_dataset(
    windows,
    global_batch: int,
    seed: int,
    epoch: int,
    packing: str,
    input_context: tf.distribute.InputContext | None = None,
    skip: int = 0,
) -> tf.data.Dataset:
    """One epoch of per-replica batches for this input pipeline.

    Global batch b holds the windows at positions b * global_batch ... of the
    epoch's order, a permutation keyed by (seed, epoch) alone (tfgpt/data/order.py),
    so a resumed run sees the same batches; `skip` starts at global batch
    `skip`. With an input context, each global batch is cut into
    num_replicas_in_sync equal slices and this pipeline (worker) reads and
    yields only its replicas' slices, in order.
    """

    source = window_source(windows)
    first, rows, local = _slice(global_batch, input_context)
    order = EpochOrder(len(source), seed, epoch)
    ds = tf.data.Dataset.range(skip, len(source) // global_batch)
    ds = ds.map(lambda b: order(b * global_batch + first + tf.range(rows, dtype=tf.int64)))
    ds = ds.map(lambda idx: (source.gather(idx),))
    return _to_replicas(ds, local, rows // local, source.width, packing)


def eval_dataset(
    windows, global_batch: int, packing: str, input_context: tf.distribute.InputContext | None = None
) -> tf.data.Dataset:
    """Every window once, in order; the last batch is filled with empty
    (all-padding, zero-weight) windows so that every batch has the same shape."""
    source = window_source(windows)
    first, rows, local = _slice(global_batch, input_context)
    n = len(source)

    def read(b):
        idx = b * global_batch + first + tf.range(rows, dtype=tf.int64)
        real = idx < n
        # Filler rows read the last window and are zeroed; their weight is 0
        # through `real` (packed windows have no padding of their own).
        window = source.gather(tf.minimum(idx, n - 1)) * tf.cast(real, tf.int32)[:, None]
        return window, real

    ds = tf.data.Dataset.range(-(-n // global_batch)).map(read)
    return _to_replicas(ds, local, rows // local, source.width, packing)


def _to_replicas(ds, local: int, per_replica: int, width: int, packing: str):
    """[local * per_replica, width] batches -> per-replica (inputs, targets, weights)."""

    def cut(window, real=None):
        # [rows, ...] -> [local, per_replica, ...]: this pipeline's replicas' slices.
        window = tf.reshape(window, [local, per_replica, width])
        return (window,) if real is None else (window, tf.reshape(real, [local, per_replica]))

    def features(window, real=None):
        x, y, w = split_window(window, packing)
        if real is not None:
            w *= tf.cast(real, tf.float32)[:, None]
        return x, y, w

    ds = ds.map(cut).unbatch()
    ds = ds.map(features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
