"""Test set-up: two logical CPU devices, configured before TensorFlow starts,
so that the multi-replica code paths run on any machine.

GPUs are hidden (CUDA_VISIBLE_DEVICES=-1, inherited by subprocesses) unless
TFGPT_TEST_GPU=1 (`make test-gpu`): the CPU suite's exact-equality tests
assume CPU kernels, and GPU kernels differ, e.g. segment sums add with atomics
in no fixed order. The GPU tests (tests/test_gpu.py, marker `gpu`) run with
TFGPT_TEST_GPU=1; the CPU split is harmless there and kept."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Token stores and downloads of the tests go to a folder of this session, not
# to the user's ~/.cache/tfgpt.
import tempfile  # noqa: E402

os.environ.setdefault("TFGPT_CACHE", tempfile.mkdtemp(prefix="tfgpt-test-cache-"))
if os.environ.get("TFGPT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"

import tensorflow as tf  # noqa: E402

# With the GPUs visible: memory as needed rather than all of it at start-up,
# so that a test's subprocess can still have some of the same GPU.
for _gpu in tf.config.list_physical_devices("GPU"):
    tf.config.experimental.set_memory_growth(_gpu, True)

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


import random  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

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


def read_events(folder: Path) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, value)] from the event files directly in folder, in the
    order they were written."""
    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, tf.make_ndarray(v.tensor)))
    return out


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


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    """One text file of generated reviews, one per line."""
    rng = random.Random(1)
    path = tmp_path / "reviews.txt"
    path.write_text("\n".join(make_review(rng) for _ in range(600)) + "\n")
    return path
