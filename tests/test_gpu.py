"""GPU tests (marker `gpu`; `make test-gpu` runs them with TFGPT_TEST_GPU=1,
`make gpu-check` after its benchmarks), each skipped where TensorFlow sees
no GPU:

  - a step compiled by XLA against the plain one;
  - MirroredStrategy over two logical GPUs of one physical GPU against one GPU;
  - float16 and bfloat16 training against float32;
  - an export written on a GPU, served on the CPU.

Each compares with a run of the same tiny model from the same initial weights
(the same seed) on the same windows, dropout 0. float32 runs keep TF32 off,
so that float32 means float32 (see `exact_float32`).

`python -m benchmarks.gpu_check` on any machine (the CPU suite runs it) is
tests/test_gpu_check.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import TRAINER_MODEL as MODEL
from helpers import Recorder, make_windows, max_diff, report, weights

from benchmarks import gpu_check
from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
GPUS = tf.config.list_physical_devices("GPU")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not GPUS,
    reason="no GPU visible to TensorFlow"
    + (
        ""
        if os.environ.get("TFGPT_TEST_GPU") == "1"
        else " (tests/conftest.py hides GPUs unless TFGPT_TEST_GPU=1: make test-gpu)"
    ),
)
BATCH, STEPS, LR = 8, 6, 3e-3


def capability() -> tuple[int, int]:
    return tuple(tf.config.experimental.get_device_details(GPUS[0]).get("compute_capability") or (0, 0))


@pytest.fixture
def exact_float32():
    """float32 products in float32: TensorFlow runs them as TF32 (10-bit
    mantissa) on compute capability 8.0+ by default, which would make the
    float32 reference itself differ at the 1e-3 level between kernels."""
    before = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(before)


def train_on_gpu(
    run_dir: Path, windows: np.ndarray, xla: str = "off", precision: str = "float32", steps: int = STEPS
) -> tuple[Trainer, Recorder]:
    """The tiny model trained for `steps` steps on the default strategy (the first GPU)."""
    cfg = TrainConfig(batch_size=BATCH, epochs=10, max_steps=steps, xla=xla, lr=LR, precision=precision, seed=0)
    trainer = Trainer(GPTConfig(dropout=0.0, **MODEL), cfg, tf.distribute.get_strategy(), run_dir)
    assert trainer.xla == (xla == "on")
    assert all("GPU" in v.device.upper() for v in trainer.model.trainable_variables)
    rec = Recorder()
    trainer.fit(windows, None, rec)
    assert len(rec.losses) == steps
    return trainer, rec


def run_script(script: str, spec: dict, folder: Path) -> dict:
    """Runs `script` (which prints "RESULT <json>") in a fresh process with
    the spec as its argument; returns the result."""
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(spec)],
        cwd=folder,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


# --- XLA -------------------------------------------------------------------------


@gpu
@needs_gpu
def test_xla_training_matches_the_plain_steps_on_a_gpu(tmp_path, exact_float32):
    """XLA fuses and reorders float32 sums (relative differences of about
    1e-7 a sum); after six steps from the same weights the losses agree to
    1e-4 relative and the weights to 1e-4 absolute: a thirtieth of one Adam
    step (3e-3), while a wrong gradient or update would move weights by
    about a step."""
    windows = make_windows()
    plain, plain_rec = train_on_gpu(tmp_path / "off", windows, xla="off")
    xla, xla_rec = train_on_gpu(tmp_path / "on", windows, xla="on")
    assert plain_rec.losses[-1] < plain_rec.losses[0]  # it trains
    np.testing.assert_allclose(xla_rec.losses, plain_rec.losses, rtol=1e-4)
    weight_diff = max_diff(weights(xla), weights(plain))
    report("GPU: XLA vs plain, max |weight diff| after 6 steps", weight_diff)
    assert weight_diff <= 1e-4
    fresh = Trainer(
        GPTConfig(dropout=0.0, **MODEL),
        TrainConfig(batch_size=BATCH, precision="float32", seed=0),
        tf.distribute.get_strategy(),
        tmp_path / "fresh",
    )
    assert max_diff(weights(fresh), weights(plain)) > 5e-3  # the weights moved: the comparison is not vacuous


# --- two logical GPUs ------------------------------------------------------------

# Runs in a fresh process: logical devices must be configured before the
# runtime starts. Trains 2 replicas on two logical GPUs of GPU 0 and then one
# GPU (the default strategy), and saves both runs' losses and weights.
TWO_LOGICAL_GPUS = r"""
import json, sys
import numpy as np
import tensorflow as tf

args = json.loads(sys.argv[1])
gpu = tf.config.list_physical_devices("GPU")[0]
tf.config.set_visible_devices([gpu], "GPU")
tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=1024)] * 2)
tf.config.experimental.enable_tensor_float_32_execution(False)

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.train.trainer import Trainer

windows = np.load(args["windows"])


class Hooks:
    def __init__(self):
        self.losses = []

    def on_step(self, info):
        self.losses.append(info["loss"])

    def on_epoch(self, info):
        pass


def train(name, strategy):
    cfg = TrainConfig(batch_size=args["batch"], epochs=10, max_steps=args["steps"], xla=args["xla"], lr=args["lr"],
                      precision="float32", seed=0)
    trainer = Trainer(GPTConfig(dropout=0.0, **args["model"]), cfg, strategy, args["dir"] + "/" + name)
    hooks = Hooks()
    trainer.fit(windows, None, hooks)
    return trainer, hooks.losses


# NCCL refuses two devices of one physical GPU; hierarchical copy reduces by copies.
two = tf.distribute.MirroredStrategy(["/gpu:0", "/gpu:1"], cross_device_ops=tf.distribute.HierarchicalCopyAllReduce())
t2, l2 = train("two", two)
t1, l1 = train("one", tf.distribute.get_strategy())
copies = 0.0
for var in list(t2.model.variables) + list(t2.optimizer.variables):
    values = [np.asarray(c) for c in t2.strategy.experimental_local_results(var)]
    copies = max(copies, float(np.max(np.abs(values[0] - values[1]))))
np.savez(args["dir"] + "/weights.npz", **{f"two_{i}": v.numpy() for i, v in enumerate(t2.model.trainable_variables)},
         **{f"one_{i}": v.numpy() for i, v in enumerate(t1.model.trainable_variables)})
devices = list(t2.strategy.extended.worker_devices)
print("RESULT " + json.dumps(dict(two=l2, one=l1, replicas=t2.replicas, devices=devices, copies=copies,
                                  variables=len(t1.model.trainable_variables))))
"""


@gpu
@needs_gpu
def test_two_logical_gpus_train_like_one_gpu(tmp_path):
    """Two replicas, on two logical GPUs of one physical GPU, with XLA (the
    GPU default), against one GPU at the same global batch: the same losses
    and weights, within the bounds of the XLA test (the replicas' halves of
    each batch are summed in another order); the two replicas' copies of
    every variable bit for bit equal."""
    windows = make_windows()  # padding differs per window: a per-replica mean would differ from the global one
    np.save(tmp_path / "windows.npy", windows)
    spec = dict(
        windows=str(tmp_path / "windows.npy"), batch=BATCH, steps=STEPS, lr=LR, model=MODEL, xla="on", dir=str(tmp_path)
    )
    out = run_script(TWO_LOGICAL_GPUS, spec, tmp_path)
    assert out["replicas"] == 2 and len(out["devices"]) == 2
    assert all("GPU" in d.upper() for d in out["devices"]) and out["devices"][0] != out["devices"][1]
    assert len(out["two"]) == len(out["one"]) == STEPS and out["one"][-1] < out["one"][0]
    np.testing.assert_allclose(out["two"], out["one"], rtol=1e-4)
    saved = np.load(tmp_path / "weights.npz")
    n = out["variables"]
    weight_diff = max(float(np.max(np.abs(saved[f"two_{i}"] - saved[f"one_{i}"]))) for i in range(n))
    report("GPU: 2 logical GPUs vs 1 GPU, max |weight diff| after 6 steps", weight_diff)
    assert weight_diff <= 1e-4
    assert out["copies"] == 0.0


# --- float16 and bfloat16 --------------------------------------------------------

# The largest |loss difference| from float32 at any of the six steps. float16
# keeps 11 significant bits (relative rounding 2^-11, about 5e-4) in the
# products, and the CPU test of the same run (tests/test_loss_scale.py) holds
# it to 5e-3; bfloat16 keeps 8 (2^-8, eight times coarser): 8 x 5e-3.
LOSS_TOL = {"float16": 5e-3, "bfloat16": 4e-2}


@pytest.fixture(scope="module")
def float32_runs():
    """xla -> the float32 losses of the run every low-precision run is compared with."""
    return {}


@gpu
@needs_gpu
@pytest.mark.parametrize("xla", ["off", "on"])
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_low_precision_training_tracks_float32(tmp_path, exact_float32, float32_runs, precision, xla):
    need = gpu_check.MIN_CAPABILITY[precision]
    if capability() < need:
        pytest.skip(
            f"{precision} needs compute capability {need[0]}.{need[1]}, this GPU has {'.'.join(map(str, capability()))}"
        )
    windows = make_windows()
    if xla not in float32_runs:
        float32_runs[xla] = train_on_gpu(tmp_path / "float32", windows, xla=xla)[1].losses
    reference = float32_runs[xla]
    trainer, rec = train_on_gpu(tmp_path / precision, windows, xla=xla, precision=precision)
    assert trainer.model.compute_dtype == {"float16": tf.float16, "bfloat16": tf.bfloat16}[precision]
    assert all(np.isfinite(rec.losses)) and rec.losses[-1] < rec.losses[0]
    if precision == "float16":
        # A skipped step (overflow) would leave the weights behind float32's.
        assert not any(i["skipped"] for i in rec.infos)
        scale = float(trainer.loss_scale.scale.numpy())
        assert np.isfinite(scale) and scale > 0
        assert all(i["loss_scale"] == scale for i in rec.infos)
    loss_diff = max_diff(rec.losses, reference)
    report(f"GPU: {precision} vs float32, xla {xla}, max |loss diff| over 6 steps", loss_diff)
    assert loss_diff <= LOSS_TOL[precision]


# --- an export from the GPU, served on the CPU --------------------------------------

SERVE_ON_CPU = r"""
import json, sys
import tensorflow as tf

model = tf.saved_model.load(sys.argv[1])
out = model.signatures["generate"](prompt=tf.constant([sys.argv[2]]), max_tokens=tf.constant([12]),
                                   top_k=tf.constant([10]),
                                   top_p=tf.constant([1.0]), temperature=tf.constant([0.0]),
                                   repetition_penalty=tf.constant([1.0]), seed=tf.constant([1], tf.int64))
print("RESULT " + json.dumps(dict(text=out["text"].numpy()[0].decode(),
                                  gpus=len(tf.config.list_physical_devices("GPU")))))
"""


@gpu
@needs_gpu
def test_an_export_written_on_a_gpu_generates_the_same_text_on_the_cpu(tmp_path):
    from test_export import PROMPT, WORDS, greedy_text, make_model

    from tfgpt.data.text import write_vocab
    from tfgpt.serving.export import export_model

    model = make_model()  # well-separated logits: greedy decoding does not hinge on rounding
    assert all("GPU" in v.device.upper() for v in model.trainable_variables)
    write_vocab(WORDS, tmp_path / "vocab.txt")
    path = export_model(model, tmp_path / "vocab.txt", tmp_path / "export")
    loaded = tf.saved_model.load(str(path))
    on_gpu = (
        loaded.signatures["generate"](
            prompt=tf.constant([PROMPT]),
            max_tokens=tf.constant([12]),
            top_k=tf.constant([10]),
            top_p=tf.constant([1.0]),
            temperature=tf.constant([0.0]),
            repetition_penalty=tf.constant([1.0]),
            seed=tf.constant([1], tf.int64),
        )["text"]
        .numpy()[0]
        .decode()
    )
    assert on_gpu == greedy_text(model, PROMPT, 12)
    done = subprocess.run(
        [sys.executable, "-c", SERVE_ON_CPU, str(path), PROMPT],
        cwd=tmp_path,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert out["gpus"] == 0
    assert out["text"] == on_gpu


# --- as a user starts them: train.py --gpus N, XLA with dropout, two workers ------

two_gpus = pytest.mark.skipif(len(GPUS) < 2, reason="needs two GPUs")


def train_py_on_gpus(tmp_path: Path, name: str, *flags: str, env: dict | None = None) -> subprocess.Popen:
    """train.py on a small corpus, started as a user starts it, with TF32 off
    (NVIDIA_TF32_OVERRIDE=0), so that float32 means float32."""
    from helpers import MICRO, write_corpus

    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus, 400, seed=3)
    args = [*MICRO, "--data", str(corpus), "--val-fraction", "0", "--log-every", "1", "--no-export"]
    args += ["--precision", "float32", "--dropout", "0", "--max-steps", "5", "--batch-size", "16"]
    args += ["--logdir", str(tmp_path / "logs"), "--run-name", name, *flags]
    environ = dict(os.environ, NVIDIA_TF32_OVERRIDE="0", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out + err


@gpu
@needs_gpu
@two_gpus
def test_train_py_on_two_gpus_trains_like_one_gpu(tmp_path):
    """`train.py --gpus 2` (devices.use_gpus, MirroredStrategy's default
    all-reduce: NCCL) against `--gpus 1` at the same global batch: its device
    line names two GPUs, and the losses agree."""
    from helpers import read_events

    outs = {n: finished(train_py_on_gpus(tmp_path, f"g{n}", "--gpus", str(n), "--xla", "off")) for n in (1, 2)}
    device = next(line for line in outs[2].splitlines() if line.startswith("devices: "))
    assert device.startswith("devices: 2 x ") and "compute capability" in device and "; 2 replica(s);" in device
    losses = {n: [float(v) for _, v in read_events(tmp_path / "logs" / f"g{n}" / "train")["loss"]] for n in (1, 2)}
    assert len(losses[1]) == len(losses[2]) == 5
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)


@gpu
@needs_gpu
def test_xla_with_dropout_on_two_replicas_is_reproducible_on_gpus(tmp_path):
    """XLA on with dropout 0.1 (the GPU defaults) on two replicas (two GPUs,
    else two logical GPUs of one): the same seed gives the same losses,
    another seed others, and the replicas' copies stay equal."""
    spec = dict(
        windows=str(tmp_path / "windows.npy"), batch=BATCH, steps=3, lr=LR, model=MODEL, dir=str(tmp_path), dropout=0.1
    )
    np.save(tmp_path / "windows.npy", make_windows())
    out = run_script(DROPOUT_ON_TWO_REPLICAS, spec, tmp_path)
    assert all("GPU" in d.upper() for d in out["devices"]) and len(out["devices"]) == 2
    assert np.all(np.isfinite(out["a"])) and out["copies"] == 0.0
    assert max_diff(out["a"], out["again"]) <= 1e-6
    assert max_diff(out["a"], out["other"]) > 1e-3


DROPOUT_ON_TWO_REPLICAS = """
import json, sys
import numpy as np
import tensorflow as tf
spec = json.loads(sys.argv[1])
gpus = tf.config.list_physical_devices("GPU")
if len(gpus) >= 2:
    devices, ops = ["/gpu:0", "/gpu:1"], None
else:  # two logical GPUs of one: NCCL refuses them, hence another all-reduce
    tf.config.set_logical_device_configuration(gpus[0], [tf.config.LogicalDeviceConfiguration(1024)] * 2)
    devices, ops = ["/gpu:0", "/gpu:1"], tf.distribute.HierarchicalCopyAllReduce()
strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)
from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.train.trainer import Trainer
windows = np.load(spec["windows"])
out = {"devices": list(strategy.extended.worker_devices)}
for name, seed in (("a", 0), ("again", 0), ("other", 1)):
    cfg = TrainConfig(batch_size=spec["batch"], epochs=10, max_steps=spec["steps"], xla="on", lr=spec["lr"],
                      precision="float32", seed=seed)
    trainer = Trainer(GPTConfig(dropout=spec["dropout"], **spec["model"]), cfg, strategy, spec["dir"] + "/" + name)
    losses = []

    class Hooks:
        def on_step(self, info):
            losses.append(info["loss"])

        def on_epoch(self, info):
            pass

    trainer.fit(windows, None, Hooks())
    out[name] = losses
    if name == "a":
        out["copies"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for v in trainer.model.trainable_variables
            for a, b in [strategy.experimental_local_results(v)]
        )
print("RESULT " + json.dumps(out))
"""


@gpu
@needs_gpu
@two_gpus
def test_two_workers_on_one_machine_each_train_on_a_gpu(tmp_path):
    """A two-worker TF_CONFIG run on one machine's GPUs, one GPU a worker
    (chosen by local index): both finish, and each worker's device line
    names a GPU (with today's fault it named the CPU)."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [
        train_py_on_gpus(
            tmp_path,
            "mw",
            "--gpus",
            "1",
            env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
        )
        for i in range(2)
    ]
    for proc in procs:
        out = finished(proc)
        device = next(line for line in out.splitlines() if line.startswith("devices: "))
        assert "compute capability" in device and "on each of 2 workers" in device, device
