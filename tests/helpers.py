"""What several test files share: generated corpora, reading event files and
checkpoints back, NumPy references (Adam, greedy decoding), a tiny trainer's
set-up, and train.py in a subprocess.

Imported as `from helpers import ...` (tests/ is on sys.path: the folder of
conftest.py)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]

# --- generated text ------------------------------------------------------------------

# The tiny model and quiet settings of the train.py runs that check behaviour,
# not learning. A given --peak-flops spares each process the matmul
# measurement (seconds) that the mfu scalar otherwise starts with.
TINY = (
    "--maxlen 12 --embed-dim 16 --ff-dim 16 --vocab-size 60 --log-every 1 --gen-tokens 4 --peak-flops 1e11 "
    "--quiet --no-export"
).split()

# The smallest runs through train.py's whole setup (devices, clusters,
# precisions), batch 8 of 8 tokens; callers add the corpus and what they check.
MICRO = "--batch-size 8 --maxlen 8 --embed-dim 16 --ff-dim 16 --gen-tokens 4 --peak-flops 1e11 --quiet".split()

# A small model, batch 16 of 16 tokens: runs that check what a run writes and prints.
SMALL_BATCH, SMALL_MAXLEN = 16, 16
SMALL = (
    f"--batch-size {SMALL_BATCH} --maxlen {SMALL_MAXLEN} --embed-dim 32 --ff-dim 32 --vocab-size 100 "
    "--log-every 5 --gen-tokens 8 --quiet"
).split()

_SUBJECTS = ["this movie", "the film", "the plot", "the acting", "every scene", "the ending"]
_VERBS = ["is", "was", "seems", "felt"]
_ADJECTIVES = ["good", "bad", "great", "boring", "funny", "long", "dark", "silly"]


def make_review(rng: random.Random) -> str:
    """A short review from a tiny grammar: learnable, so a loss must fall."""
    sentences = []
    for _ in range(rng.randint(2, 5)):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADJECTIVES)}"
        if rng.random() < 0.3:
            s += f" and {rng.choice(_ADJECTIVES)}"
        sentences.append(s.capitalize() + rng.choice([".", "!", "."]))
    return "<br /><br />".join(sentences) if rng.random() < 0.2 else " ".join(sentences)


def write_corpus(path: Path, lines: int, seed: int = 1) -> Path:
    """`lines` generated reviews, one per line, written to path."""
    rng = random.Random(seed)
    path.write_text("\n".join(make_review(rng) for _ in range(lines)) + "\n")
    return path


def write_imdb_tree(root: Path, per_split: int = 6, unsup: int = 0, seed: int = 0) -> Path:
    """An aclImdb-like folder: aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt."""
    rng = random.Random(seed)
    base = root / "aclImdb"
    for split in ("train/pos", "train/neg", "test/pos", "test/neg"):
        d = base / split
        d.mkdir(parents=True)
        for i in range(per_split):
            (d / f"{i}_{rng.randint(1, 10)}.txt").write_text(make_review(rng))
    if unsup:
        d = base / "train" / "unsup"
        d.mkdir(parents=True)
        for i in range(unsup):
            (d / f"{i}_0.txt").write_text("unsup " + make_review(rng))
    return base


def tar_folder(folder: Path, target: Path, extra: dict | None = None) -> Path:
    """Packs folder (as its own name) into a .tar.gz, with optional extra files."""
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for name, text in (extra or {}).items():
            p = target.parent / ("extra_" + Path(name).name)
            p.write_text(text)
            tar.add(p, arcname=name)
    return target


# --- what a run leaves on disk ----------------------------------------------------------


def read_events(folder: Path) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, value)] from the event files directly in folder, in the
    order they were written."""
    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, tf.make_ndarray(v.tensor)))
    return out


def checkpoint_step(path: Path | str) -> int:
    """The optimizer step stored in a checkpoint: a checkpoint prefix, or a
    run's folder (its ckpt/ folder's latest)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt" if (path / "ckpt").is_dir() else path
    reader = tf.train.load_checkpoint(str(path))
    key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("optimizer/step"))
    return int(reader.get_tensor(key))


def model_weights(run: Path) -> dict[str, np.ndarray]:
    """The model's variables in a run's latest checkpoint, without optimizer slots."""
    reader = tf.train.load_checkpoint(str(run / "ckpt"))
    return {
        k: reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k.startswith("model/") and "OPTIMIZER_SLOT" not in k
    }


# --- NumPy references ------------------------------------------------------------------


class NumpyAdam:
    """Adam with the bias correction folded into the step size (TF/Keras form)."""

    def __init__(self, params, lr=1e-3, b1=0.9, b2=0.999, eps=1e-7):
        # The update kernel receives its hyper-parameters as float32: 1 - b2
        # is then 0.00099998713, not 0.001 (1.3e-5 apart, relative).
        self.lr, self.b1, self.b2, self.eps = (float(np.float32(x)) for x in (lr, b1, b2, eps))
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads, lr=None):
        self.t += 1
        lr = self.lr if lr is None else lr
        lr_t = lr * math.sqrt(1.0 - self.b2**self.t) / (1.0 - self.b1**self.t)
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1.0 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1.0 - self.b2) * g * g
            out.append(p - lr_t * self.m[i] / (np.sqrt(self.v[i]) + self.eps))
        return out


def reference_greedy(model, prompt: list[int], steps: int, stop_at_padding: bool = True) -> list[int]:
    """Greedy decoding by running the whole model on the growing, then
    sliding, sequence: no cache, one Python step per token. Returns the new
    ids; stops after id 0 unless stop_at_padding is False."""
    maxlen = model.config.maxlen
    seq, out = list(prompt), []
    for _ in range(steps):
        logits = model(tf.constant([seq[-maxlen:]]))[0, -1].numpy()
        token = int(np.argmax(logits))
        if token == 0 and stop_at_padding:
            break
        seq.append(token)
        out.append(token)
    return out


# --- a tiny model trained by tfgpt.train.trainer.Trainer ------------------------------------

TRAINER_MODEL = dict(vocab_size=40, maxlen=8, embed_dim=16, num_heads=2, ff_dim=16, num_layers=1)
TRAINER_BATCH = 8


def make_windows(n: int = 32, seed: int = 0) -> np.ndarray:
    """n windows of maxlen + 1 ids, with a random amount of padding at the end
    of each, so that replicas see different numbers of real targets (a per-replica
    mean instead of the mean over the global batch would then differ)."""
    rng = np.random.default_rng(seed)
    width = TRAINER_MODEL["maxlen"] + 1
    windows = rng.integers(1, TRAINER_MODEL["vocab_size"], size=[n, width], dtype=np.int32)
    lengths = rng.integers(2, width + 1, size=n)
    windows[np.arange(width)[None, :] >= lengths[:, None]] = 0
    return windows


class Recorder:
    """Training hooks that keep every step's loss and record."""

    def __init__(self):
        self.losses, self.infos = [], []

    def on_step(self, info):
        self.losses.append(info["loss"])
        self.infos.append(info)

    def on_epoch(self, info):
        pass


def strategy_for(replicas: int):
    """1: the default strategy (one device); 2: MirroredStrategy over 2 logical CPUs."""
    from tfgpt.runtime import distribute

    return distribute.make_strategy(cpu_replicas=None if replicas == 1 else replicas)


def weights(trainer) -> dict[str, np.ndarray]:
    return {v.name: v.numpy() for v in trainer.model.trainable_variables}


def max_diff(a, b) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys() and a
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert len(a) == len(b) and len(a) > 0
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def report(what: str, value: float):
    print(f"[measured] {what}: {value:.3g}")


# --- messages of the "tfgpt" logger -----------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self, messages: list):
        super().__init__(logging.DEBUG)
        self.messages = messages

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def log_messages():
    """The messages the "tfgpt" logger and its children (every module's
    logger) pass on at INFO and above during the block, in a list. The logger
    does not pass its records to the root logger, so pytest's caplog does not
    see them; its level and handlers are restored afterwards."""
    logger = logging.getLogger("tfgpt")
    messages: list[str] = []
    handler, level = _Collect(messages), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- train.py in a subprocess ---------------------------------------------------------


# --- a row alone and in a batch -------------------------------------------------------

# How far a row's numbers may move with its batch on CPU kernels that do not
# keep them bit-equal (`tfgpt.runtime.devices.rows_batch_invariant` is False: AVX2,
# AVX-512 without BF16 in bfloat16, Eigen): (largest, mean) absolute
# difference per entry. float32: the last bits of products added in another
# order, carried through the layers and steps (the largest seen: 1.2e-4;
# mean at most 2e-5). bfloat16: a product rounded one bfloat16 step the other way,
# which later steps carry on (largest seen 0.10, mean 0.008); rare, so the
# mean stays far below what a row reading another row's numbers would give.
# docs/serving.md quotes these.
ROW_TOLERANCE = {"float32": (5e-4, 5e-5), "bfloat16": (0.25, 0.03)}


def assert_rows_equal(got, want, precision: str, err_msg: str = ""):
    """A row's numbers alone (got) against the same row in a batch (want):
    bit for bit where this CPU's kernels promise it (an AVX-512 machine must
    not hide a regression behind a tolerance), else within ROW_TOLERANCE."""
    from tfgpt.runtime.devices import rows_batch_invariant

    if rows_batch_invariant(precision):
        np.testing.assert_array_equal(got, want, err_msg=err_msg)
    else:
        largest, mean = ROW_TOLERANCE[precision]
        np.testing.assert_allclose(got, want, rtol=0, atol=largest, err_msg=err_msg)
        assert np.mean(np.abs(np.asarray(got, np.float64) - want)) <= mean, err_msg


def train_env(**extra) -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def run_python(args: list[str], env: dict | None = None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """python args (a script or -m module and its arguments), to the end; its
    output captured as text. env: train_env() unless given."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=train_env() if env is None else env,
        cwd=cwd,
        timeout=timeout,
    )


def run_train_py(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """python train.py args, to the end; its output captured as text."""
    return run_python([str(ROOT / "train.py"), *args], env, timeout=timeout)


def start_train_py(args: list[str], **kw) -> subprocess.Popen:
    """python train.py args, started; stdout and stderr together on proc.stdout, unbuffered."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py")] + list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=train_env(PYTHONUNBUFFERED="1"),
        **kw,
    )
