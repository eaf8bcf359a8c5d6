"""Checkpoints of a run, and the scratch folder of the workers other than the chief.

`Checkpoints` keeps the newest `keep` checkpoints of a set of trackable
objects (the model, the optimizer, the training state) in RUN/ckpt, named
ckpt-STEP, through a tf.train.CheckpointManager.

Only the chief writes into the run directory. Every worker must take part in
a save, so the others save into their scratch folder (`worker_scratch`): one
private temporary folder per process, removed at exit, that also holds any
other file such a worker needs (its copy of the vocabulary). They restore
from the chief's checkpoints, which they see on a shared filesystem.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf

log = logging.getLogger(__name__)

_scratch: Path | None = None


def worker_scratch() -> Path:
    """This process's scratch folder: created on first use, removed with
    everything in it when the process exits."""
    global _scratch
    if _scratch is None or not _scratch.exists():
        _scratch = Path(tempfile.mkdtemp(prefix="tfgpt-worker-"))
        atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    return _scratch


class Checkpoints:
    """The checkpoints of `objects` ({name: trackable}) for run_dir.

    Nothing is written before `open()`. step: the int64 variable whose value
    numbers each checkpoint. chief: whether this process writes RUN/ckpt
    (else a folder of its scratch folder, removed by `close()`)."""

    def __init__(self, objects: dict, run_dir: str | Path, step: tf.Variable, keep: int = 3, chief: bool = True):
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.directory = Path(run_dir) / "ckpt"  # the run's checkpoints, written by the chief
        self.step, self.keep, self.chief = step, keep, chief
        self.manager = None
        self._scratch = None

    def open(self) -> None:
        """Starts managing checkpoints: RUN/ckpt on the chief, a scratch folder elsewhere."""
        directory = self.directory
        if not self.chief:
            directory = self._scratch = Path(tempfile.mkdtemp(prefix="ckpt-", dir=worker_scratch()))
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(directory), max_to_keep=self.keep, step_counter=self.step, checkpoint_name="ckpt"
        )

    @property
    def latest(self) -> str | None:
        """The newest checkpoint written (None before open() or the first save)."""
        return self.manager.latest_checkpoint if self.manager else None

    def restore_latest(self) -> str | None:
        """Restores the newest readable checkpoint of the run, falling back to
        older ones (with a warning naming each skipped file, logged). None if
        there are none."""
        source = self.manager
        if source and not self.chief:
            # The other workers resume from the chief's checkpoints (the run
            # directory on a shared filesystem), never from their scratch copies.
            source = tf.train.CheckpointManager(self.checkpoint, str(self.directory), max_to_keep=None)
        tried = list(reversed(source.checkpoints)) if source else []
        for path in tried:
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
                return path
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                reason = str(e).strip().splitlines()[0][:200]
                log.warning(f"warning: skipping unreadable checkpoint {path} ({type(e).__name__}: {reason})")
        if tried:
            raise RuntimeError(f"no readable checkpoint in {source.directory}")
        return None

    def save(self) -> str | None:
        """Writes a checkpoint at the current step (none before open())."""
        if self.manager is None:
            return None
        return self.manager.save(checkpoint_number=int(self.step.numpy()))

    def close(self) -> None:
        """Removes a worker's scratch checkpoints (the chief's stay)."""
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
