"""Test set-up: two logical CPU devices, configured before TensorFlow starts,
so that the multi-replica code paths run on any machine.

GPUs are hidden (CUDA_VISIBLE_DEVICES=-1, inherited by subprocesses) unless
TFGPT_TEST_GPU=1 (`make test-gpu`): the CPU suite's exact-equality tests
assume CPU kernels, and GPU kernels differ, e.g. segment sums add with atomics
in no fixed order. The GPU tests (tests/test_gpu.py, marker `gpu`) run with
TFGPT_TEST_GPU=1; the CPU split is harmless there and kept."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Token stores and downloads of the tests go to a folder of this test process,
# not to the user's ~/.cache/tfgpt (unless TFGPT_CACHE names another). The
# pytest-xdist workers inherit the environment of the process that started
# them: each takes a folder of its own rather than the inherited one.
import tempfile  # noqa: E402

if os.environ.get("TFGPT_CACHE", "") in ("", os.environ.get("TFGPT_TEST_CACHE")):
    os.environ["TFGPT_CACHE"] = os.environ["TFGPT_TEST_CACHE"] = tempfile.mkdtemp(prefix="tfgpt-test-cache-")
if os.environ.get("TFGPT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"

import tensorflow as tf  # noqa: E402

# With the GPUs visible: memory as needed rather than all of it at start-up,
# so that a test's subprocess can still have some of the same GPU.
for _gpu in tf.config.list_physical_devices("GPU"):
    tf.config.experimental.set_memory_growth(_gpu, True)

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


# The helpers many test files use (tests/helpers.py), also importable from here.
from helpers import make_review, read_events, tar_folder, write_corpus, write_imdb_tree  # noqa: E402,F401


@pytest.fixture
def no_samples(monkeypatch):
    """Training runs in this process without the per-epoch text sample.

    Tracing the in-graph sampler costs seconds in every run; tests of
    resuming, stores and locks have no use for it. The samples themselves are
    checked by tests/test_train.py and tests/test_tensorboard.py, and train.py
    subprocesses always write them."""
    from tfgpt.train import run

    monkeypatch.setattr(run, "make_sample_fn", lambda *args: None)


def pytest_collection_modifyitems(config, items):
    """Where a bfloat16 product would abort the process (an AVX-512 CPU told
    to act as an older one by ONEDNN_MAX_CPU_ISA: TensorFlow still sends
    bfloat16 to oneDNN, which then has no kernel for it), the tests
    parametrized with bfloat16 or named after it are skipped, saying why; a
    real AVX2 CPU runs them through Eigen, as TF_ENABLE_ONEDNN_OPTS=0 does
    here (.ci/run)."""
    from tfgpt.runtime.devices import bfloat16_aborts

    if not bfloat16_aborts():
        return
    skip = pytest.mark.skip(reason="bfloat16 aborts in oneDNN under ONEDNN_MAX_CPU_ISA below AVX512_CORE")
    for item in items:
        params = getattr(item, "callspec", None)
        named = "bfloat16" in item.name.lower() or "bf16" in item.name.lower()
        if named or (params and any(v is tf.bfloat16 or v == "bfloat16" for v in params.params.values())):
            item.add_marker(skip)
