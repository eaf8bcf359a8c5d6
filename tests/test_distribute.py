"""Data-parallel training: several replicas must train exactly like one device.

Every numerical check compares a multi-replica run with an independent
single-device run (or a 2-replica MirroredStrategy run, for the multi-worker
case) on the same global batches.
"""

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_review, read_events
from test_optim import NumpyAdam
from tfgpt import cluster, data as tfdata, devices, distribute
from tfgpt.cli import main
from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=40, maxlen=8, embed_dim=16, num_heads=2, ff_dim=16, num_layers=1)
BATCH, STEPS = 8, 6
TOL = 1e-5
# The same tiny run through train.py, for the multi-worker test and the errors.
CLI_SMALL = ["--batch-size", "8", "--maxlen", "8", "--embed-dim", "16", "--ff-dim", "16", "--vocab-size", "40",
             "--val-fraction", "0", "--log-every", "1", "--gen-tokens", "4", "--peak-flops", "1e11", "--quiet"]


# --- helpers ------------------------------------------------------------------

def make_windows(n: int = 32, seed: int = 0) -> np.ndarray:
    """n windows of maxlen + 1 ids, with a random amount of padding at the end
    of each, so that replicas see different numbers of real targets (a per-replica
    mean instead of the mean over the global batch would then differ)."""
    rng = np.random.default_rng(seed)
    width = MODEL["maxlen"] + 1
    windows = rng.integers(1, MODEL["vocab_size"], size=[n, width], dtype=np.int32)
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
    return distribute.make_strategy(cpu_replicas=None if replicas == 1 else replicas, warn=lambda *a: None)


def make_trainer(replicas: int, run_dir: Path, xla: str = "off", dropout: float = 0.0, seed: int = 0,
                 max_steps: int = STEPS, **settings) -> Trainer:
    cfg = TrainConfig(batch_size=BATCH, epochs=10, max_steps=max_steps, xla=xla, seed=seed, lr=3e-3,
                      keep_checkpoints=2, precision="float32", **settings)
    trainer = Trainer(GPTConfig(dropout=dropout, **MODEL), cfg, strategy_for(replicas), run_dir)
    trainer.open_checkpoints()
    return trainer


def train(trainer: Trainer, windows: np.ndarray) -> list[float]:
    rec = Recorder()
    trainer.fit(windows, None, rec)
    return rec.losses


def weights(trainer: Trainer) -> dict[str, np.ndarray]:
    return {v.name: v.numpy() for v in trainer.model.trainable_variables}


def max_diff(a, b) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys() and a
        return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert len(a) == len(b) and len(a) > 0
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def report(what: str, value: float):
    print(f"[measured] {what}: {value:.3g}")


# --- 2 replicas against 1 device ----------------------------------------------

@pytest.fixture(scope="module")
def windows():
    return make_windows()  # 4 global batches per epoch: 6 steps cross an epoch boundary


@pytest.fixture(scope="module")
def runs(windows, tmp_path_factory):
    """(xla, replicas) -> (losses, weights, trainer) after STEPS steps, dropout 0."""
    out = {}
    for xla in ("off", "on"):
        for replicas in (1, 2):
            trainer = make_trainer(replicas, tmp_path_factory.mktemp(f"xla{xla}-r{replicas}"), xla=xla)
            assert trainer.replicas == replicas and trainer.xla == (xla == "on")
            losses = train(trainer, windows)
            assert len(losses) == STEPS
            out[xla, replicas] = (losses, weights(trainer), trainer)
    return out


@pytest.mark.parametrize("clip, padding", [(None, "ignore"), (0.05, "ignore"), (None, "count")])
def test_train_step_matches_an_independent_update(tmp_path, clip, padding):
    """One train step (dense Adam for every variable) equals a separate
    computation: TensorFlow's plain sparse cross-entropy averaged over the
    real targets (over every position, padding included, with
    --padding-targets count), tf.clip_by_global_norm, then Adam in NumPy.
    With clip 0.05 the clip is active (the norm is larger)."""
    cfg = TrainConfig(batch_size=BATCH, epochs=1, xla="off", lr=3e-3, clip_norm=clip, precision="float32",
                      padding_targets=padding, embedding_update="dense")
    trainer = Trainer(GPTConfig(dropout=0.0, **MODEL), cfg, strategy_for(1), tmp_path)
    model, variables = trainer.model, trainer.model.trainable_variables
    before = [v.numpy().astype(np.float64) for v in variables]
    x, y, w = tfdata.split_window(tf.constant(make_windows(BATCH, seed=3)), "truncate")
    assert 0 < float(tf.reduce_sum(w)) < w.shape.num_elements()  # some padding targets
    if padding == "count":
        w = tf.ones_like(w)
    with tf.GradientTape() as tape:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
        loss = tf.reduce_sum(ce * w) / tf.reduce_sum(w)
    grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
    norm = float(tf.linalg.global_norm(grads))
    if clip:
        assert norm > clip
        grads, _ = tf.clip_by_global_norm(grads, clip)
    real = tfdata.split_window(tf.constant(make_windows(BATCH, seed=3)), "truncate")[2]
    got_loss, got_norm = trainer.train_step((x, y, real), trainer.step_seed(0))[:2]
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(got_norm), norm, rtol=1e-4)
    want = NumpyAdam(before, lr=3e-3).step(before, [g.numpy().astype(np.float64) for g in grads])
    for v, w_ in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w_, rtol=1e-5, atol=1e-6, err_msg=v.name)


@pytest.mark.parametrize("replicas", [1, 2])
def test_per_token_embedding_update_matches_its_formula(tmp_path, replicas):
    """--embedding-update per-token, one step: the token table moves by the
    per-occurrence Adam formula computed here from the lookup's own gradient
    (plain cross-entropy, per-occurrence rows summed in NumPy); on 2 replicas
    the squares of both halves of the batch are summed. Other variables get
    dense Adam (checked: the position table)."""
    cfg = TrainConfig(batch_size=BATCH, epochs=1, xla="off", lr=3e-3, precision="float32",
                      embedding_update="per-token", padding_targets="ignore")
    trainer = Trainer(GPTConfig(dropout=0.0, **MODEL), cfg, strategy_for(replicas), tmp_path)
    model = trainer.model
    table, pos = model.token_emb.table.numpy().astype(np.float64), model.pos_emb.table.numpy().astype(np.float64)
    windows = make_windows(BATCH, seed=4)
    x, y, w = tfdata.split_window(tf.constant(windows), "truncate")
    with tf.GradientTape() as tape:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
        loss = tf.reduce_sum(ce * w) / tf.reduce_sum(w)
    g_table, g_pos = tape.gradient(loss, [model.token_emb.table, model.pos_emb.table])
    assert isinstance(g_table, tf.IndexedSlices)
    occ, ids = g_table.values.numpy().astype(np.float64), g_table.indices.numpy()
    summed, squares = np.zeros_like(table), np.zeros_like(table)
    np.add.at(summed, ids, occ)
    np.add.at(squares, ids, occ ** 2)
    assert np.abs(squares - summed ** 2).max() > 1e-6 * np.abs(squares).max()  # repeated tokens in the batch
    # The one global batch, cut into the replicas' slices as training cuts it.
    batches = trainer.distribute(lambda ctx: tfdata.eval_dataset(windows, BATCH, "truncate", ctx))
    trainer.train_steps(iter(batches), tf.constant(1))
    b1, b2, eps, lr = (float(np.float32(z)) for z in (0.9, 0.999, 1e-7, 3e-3))
    lr_t = lr * math.sqrt(1 - b2) / (1 - b1)
    want = table - lr_t * ((1 - b1) * summed) / (np.sqrt((1 - b2) * squares) + eps)
    np.testing.assert_allclose(model.token_emb.table.numpy(), want, rtol=1e-4, atol=1e-6)
    want_pos = NumpyAdam([pos], lr=3e-3).step([pos], [tf.convert_to_tensor(g_pos).numpy().astype(np.float64)])[0]
    np.testing.assert_allclose(model.pos_emb.table.numpy(), want_pos, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("xla", ["off", "on"])
def test_two_replicas_match_one_device(runs, xla):
    one_losses, one_weights, _ = runs[xla, 1]
    two_losses, two_weights, _ = runs[xla, 2]
    assert one_losses[-1] < one_losses[0]  # it trains
    loss_diff, weight_diff = max_diff(one_losses, two_losses), max_diff(one_weights, two_weights)
    report(f"xla {xla}: 2 replicas vs 1 device, max |loss diff| over {STEPS} steps", loss_diff)
    report(f"xla {xla}: 2 replicas vs 1 device, max |weight diff| after {STEPS} steps", weight_diff)
    assert loss_diff <= TOL
    assert weight_diff <= TOL
    # The weights moved: a comparison of untouched weights would prove nothing.
    fresh = make_trainer(1, runs[xla, 1][2].run_dir / "fresh", xla="off")
    assert max_diff(weights(fresh), one_weights) > 1e-3


@pytest.mark.parametrize("xla", ["off", "on"])
def test_every_replica_holds_the_same_variables(runs, xla):
    trainer = runs[xla, 2][2]
    variables = list(trainer.model.variables) + list(trainer.optimizer.variables)
    assert len(variables) > len(trainer.model.trainable_variables)  # slots and step included
    worst = 0.0
    for var in variables:
        copies = [np.asarray(c) for c in trainer.strategy.experimental_local_results(var)]
        assert len(copies) == 2, var.name
        worst = max(worst, float(np.max(np.abs(copies[0] - copies[1]))))
    report(f"xla {xla}: max |difference| between the two replicas' copies", worst)
    assert worst == 0.0
    assert int(trainer.optimizer.step.numpy()) == STEPS


@pytest.mark.parametrize("xla", ["off", "on"])
def test_several_steps_per_call_equal_one_step_per_call(runs, windows, tmp_path, xla):
    """4 steps per compiled call (the last call of the first epoch and of the
    run shorter: 6 steps over epochs of 4 batches) against one per call, on 2
    replicas: the same per-step losses and weights, and the same state."""
    ref_losses, ref_weights, _ = runs[xla, 2]
    trainer = make_trainer(2, tmp_path, xla=xla, steps_per_call=4)
    assert trainer.steps_per_call == 4
    calls = []
    trainer.train_steps = counting(trainer.train_steps, calls)
    losses = train(trainer, windows)
    assert calls == [4, 2]  # the epoch's 4 batches, then the 2 left to max_steps
    report(f"xla {xla}: 4 steps per call vs 1, max |loss diff|", max_diff(ref_losses, losses))
    assert max_diff(ref_losses, losses) <= 1e-6
    assert max_diff(ref_weights, weights(trainer)) <= 1e-6
    assert [int(v.numpy()) for v in (trainer.state.step, trainer.state.epoch, trainer.state.batch,
                                     trainer.optimizer.step)] == [STEPS, 1, 2, STEPS]


def counting(fn, calls: list):
    """fn(iterator, n), recording each call's n."""
    def wrapped(iterator, n):
        calls.append(int(n))
        return fn(iterator, n)
    return wrapped


def test_dropout_is_reproducible_per_seed(runs, windows, tmp_path):
    def run(name, seed):
        return train(make_trainer(2, tmp_path / name, dropout=0.2, seed=seed, max_steps=3), windows)

    first, again, other_seed = run("a", 0), run("b", 0), run("c", 1)
    no_dropout = runs["off", 2][0][:3]  # the same seed, dropout 0
    report("dropout 0.2, 2 replicas, same seed twice: max |loss diff|", max_diff(first, again))
    assert max_diff(first, again) <= 1e-6
    assert max_diff(first, other_seed) > 1e-3
    assert max_diff(first, no_dropout) > 1e-3  # dropout is really applied


# --- checkpoints across device counts -------------------------------------------

@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_checkpoint_resumes_across_device_counts(runs, windows, tmp_path, saved, resumed):
    """3 steps at `saved` replicas, a checkpoint, then 3 more at `resumed`:
    the same losses and weights as 6 steps straight at `saved` replicas."""
    ref_losses, ref_weights, _ = runs["off", saved]
    first = make_trainer(saved, tmp_path, max_steps=3)
    losses = train(first, windows)
    assert first.manager.latest_checkpoint.endswith("ckpt-3")
    second = make_trainer(resumed, tmp_path, max_steps=STEPS)
    assert second.replicas == resumed
    assert second.restore_latest(warn=lambda *a: None) is not None
    assert int(second.optimizer.step.numpy()) == 3
    losses += train(second, windows)
    loss_diff, weight_diff = max_diff(ref_losses, losses), max_diff(ref_weights, weights(second))
    report(f"checkpoint {saved} -> {resumed} replicas: max |loss diff|", loss_diff)
    report(f"checkpoint {saved} -> {resumed} replicas: max |weight diff|", weight_diff)
    assert loss_diff <= TOL
    assert weight_diff <= TOL


# --- several worker processes ----------------------------------------------------

# Runs train.py's main, and also appends every step's (step, loss) to $LOSS_LOG,
# so that the test sees the losses of every worker, not only the chief's.
WORKER = """
import json, os, sys
from tfgpt import report

_on_step = report.Reporter.on_step

def on_step(self, info):
    with open(os.environ["LOSS_LOG"], "a") as f:
        f.write(json.dumps([info["step"], info["loss"]]) + "\\n")
    _on_step(self, info)

report.Reporter.on_step = on_step
from tfgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def consecutive_free_ports(n: int) -> int:
    """The first of n consecutive free ports on 127.0.0.1."""
    for _ in range(50):
        first = free_ports(1)[0]
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def tf_config(ports: list[int], index: int) -> dict:
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                     "task": {"type": "worker", "index": index}})}


def slurm_env(tasks: int, index: int) -> dict:
    """What srun sets for task `index` of a job step of `tasks` tasks on one node."""
    return {"SLURM_PROCID": str(index), "SLURM_LOCALID": str(index), "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_STEP_TASKS_PER_NODE": str(tasks), "SLURM_JOB_ID": "7"}


def start_workers(tmp_path: Path, configs: list[dict], args: list[list[str]]) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    procs = []
    for i, (config, extra) in enumerate(zip(configs, args)):
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
        env = dict(env, **config, LOSS_LOG=str(tmp_path / f"losses{i}.jsonl"),
                   TMPDIR=str(scratch), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(script)] + extra, cwd=tmp_path, env=env,
                                      stdout=open(tmp_path / f"out{i}.txt", "w"),
                                      stderr=open(tmp_path / f"err{i}.txt", "w")))
    return procs


def wait_all(procs: list[subprocess.Popen], limit: float) -> list[int | None]:
    """Waits up to `limit` seconds in all; then kills whatever still runs (a
    worker blocked in a collective may not answer SIGTERM)."""
    deadline = time.monotonic() + limit
    codes = []
    try:
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def read_losses(path: Path) -> list[float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s for s, _ in rows] == list(range(1, len(rows) + 1))
    return [loss for _, loss in rows]


def event_losses(folder: Path) -> list[float]:
    """The logged training losses in step order (a step logged twice: its last value)."""
    out = {step: float(v) for step, v in read_events(folder).get("loss", [])}
    return [out[s] for s in sorted(out)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    path.write_text("\n".join(make_review(rng) for _ in range(200)) + "\n")
    return path


@pytest.mark.parametrize("source", ["tf_config", "slurm"])
def test_two_workers_match_mirrored_strategy(corpus, tmp_path, monkeypatch, source):
    """Two worker processes, their cluster from TF_CONFIG or from a SLURM job
    step's environment (--cluster auto), against one process with two replicas."""
    common = ["--data", str(corpus), "--max-steps", "5", "--dropout", "0.1", "--run-name", "r"] + CLI_SMALL
    # The reference: one process, MirroredStrategy over 2 (logical CPU) devices.
    from tfgpt import report as report_module

    reference = []
    original = report_module.Reporter.on_step

    def record(self, info):
        reference.append(info["loss"])
        original(self, info)

    monkeypatch.setattr(report_module.Reporter, "on_step", record)
    assert main(common + ["--cpu-replicas", "2", "--no-export", "--logdir", str(tmp_path / "ref")]) == 0
    monkeypatch.undo()
    assert len(reference) == 5

    if source == "tf_config":
        ports = free_ports(2)
        configs, extra = [tf_config(ports, 0), tf_config(ports, 1)], []
    else:
        configs, extra = [slurm_env(2, 0), slurm_env(2, 1)], ["--cluster-port", str(consecutive_free_ports(2))]
    procs = start_workers(tmp_path, configs,
                          [common + extra + ["--logdir", str(tmp_path / f"logs{i}")] for i in range(2)])
    codes = wait_all(procs, limit=150)
    errors = [(tmp_path / f"err{i}.txt").read_text()[-2000:] for i in range(2)]
    assert codes == [0, 0], errors
    chief, other = read_losses(tmp_path / "losses0.jsonl"), read_losses(tmp_path / "losses1.jsonl")
    for name, losses in (("chief", chief), ("other worker", other)):
        report(f"2 workers vs 2-replica MirroredStrategy, {name}: max |loss diff|", max_diff(reference, losses))
        assert max_diff(reference, losses) <= TOL
    # The chief's summaries carry the same numbers.
    assert max_diff(reference, event_losses(tmp_path / "logs0" / "r" / "train")) <= TOL
    # Only the chief writes: config, vocabulary, checkpoints, summaries, export.
    run = tmp_path / "logs0" / "r"
    for name in ("config.json", "vocab.txt", "ckpt/checkpoint", "export/1/saved_model.pb"):
        assert (run / name).exists(), name
    assert not (tmp_path / "logs1").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # the other worker's scratch folders are gone
    assert "2 replica(s)" in (tmp_path / "out0.txt").read_text()
    assert "on each of 2 workers" in (tmp_path / "out0.txt").read_text()


def test_unreachable_workers_fail_after_the_timeout(corpus, tmp_path):
    """Two clusters of two workers, each with one worker never started: worker 0
    (which hosts the coordination service) and worker 1 (which cannot reach it)
    must both stop with a one-line error after about --collective-timeout."""
    timeout = 6
    common = ["--data", str(corpus), "--max-steps", "2", "--no-export", "--collective-timeout", str(timeout)] + CLI_SMALL
    ports = free_ports(4)
    t0 = time.monotonic()
    procs = start_workers(tmp_path, [tf_config(ports[:2], 0), tf_config(ports[2:], 1)],
                          [common + ["--logdir", str(tmp_path / f"logs{i}")] for i in range(2)])
    codes = wait_all(procs, limit=90)
    took = time.monotonic() - t0
    print(f"[measured] unreachable workers stopped after {took:.1f} s")
    for i, code in enumerate(codes):
        err = (tmp_path / f"err{i}.txt").read_text()
        assert code is not None, f"worker {i} hung: {err[-2000:]}"
        assert code == 1, err[-2000:]
        assert "Traceback" not in err
        # TensorFlow's own log lines surround it; ours is a single line.
        ours = [line for line in err.splitlines() if line.startswith("train.py:")]
        assert len(ours) == 1, err[-2000:]
        assert ours[0].startswith(f"train.py: error: worker {i} (127.0.0.1:")
        assert f"could not reach the other workers within {timeout} s" in ours[0], ours[0]
    assert took < 60


# --- errors ---------------------------------------------------------------------

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_batch_size_must_divide_over_replicas(corpus, tmp_path, capsys):
    args = ["--data", str(corpus), "--logdir", str(tmp_path), "--cpu-replicas", "2", "--max-steps", "1"] + CLI_SMALL
    assert main(args + ["--batch-size", "7"]) == 2
    err = one_line_error(capsys)
    assert "--batch-size 7" in err and "2 replicas" in err


@pytest.mark.parametrize("config, words", [
    ("{not json", "not valid JSON"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}), "names no task"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}),
     "worker:2"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}), "chief:0"),
    (json.dumps({"cluster": {"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]},
                 "task": {"type": "worker", "index": 0}}), '"ps"'),
])
def test_bad_tf_config_is_a_one_line_error(corpus, tmp_path, capsys, monkeypatch, config, words):
    monkeypatch.setenv("TF_CONFIG", config)
    assert main(["--data", str(corpus), "--logdir", str(tmp_path)] + CLI_SMALL) == 2
    err = one_line_error(capsys)
    assert err.startswith("train.py: error: TF_CONFIG") and words in err, err
    assert not list(tmp_path.rglob("config.json"))


def test_tf_config_decides_the_chief(monkeypatch):
    cases = [({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
             ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
             ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
             ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True)]
    for jobs, (kind, index), chief in cases:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": jobs, "task": {"type": kind, "index": index}}))
        found = cluster.detect("auto")
        assert found is not None and found.source == "tf_config" and found.chief is chief
        assert cluster.is_chief_task() is chief, (jobs, kind, index)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}))
    assert cluster.detect() is None  # one process: no multi-worker strategy
    monkeypatch.delenv("TF_CONFIG")
    assert cluster.detect() is None and cluster.is_chief_task()


def test_a_slurm_job_step_gives_the_cluster(monkeypatch):
    """Four tasks on two nodes, as srun describes them: one worker per task,
    each node's workers on consecutive ports; SLURM_PROCID picks this task."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "node[01-02]",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for mode in ("auto", "slurm"):
        found = cluster.detect(mode, port_base=7000)
        assert found.source == "slurm"
        assert found.jobs == {"worker": ["node01:7000", "node01:7001", "node02:7000", "node02:7001"]}
        assert (found.task_type, found.task_index, found.local_index, found.chief) == ("worker", 3, 1, False)
    assert not cluster.is_chief_task("auto")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert cluster.is_chief_task("auto") and cluster.detect("slurm").chief
    # TF_CONFIG, when set, wins over SLURM in auto mode.
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 1}}))
    assert cluster.detect("auto").source == "tf_config" and not cluster.is_chief_task("auto")
    assert cluster.detect("slurm").source == "slurm"
    # One task: no cluster. Outside a job step, --cluster slurm is an error.
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert cluster.detect("auto") is None
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(devices.DeviceError, match="--cluster slurm: SLURM_PROCID and SLURM_STEP_NUM_TASKS"):
        cluster.detect("slurm")
    assert cluster.detect("auto") is None


def test_workers_on_one_host_get_consecutive_local_indices():
    jobs = {"chief": ["h1:1"], "worker": ["h1:2", "h2:1", "h1:3", "h2:2"]}
    got = [cluster.local_rank(jobs, j, i) for j, i in
           [("chief", 0), ("worker", 0), ("worker", 1), ("worker", 2), ("worker", 3)]]
    assert got == [0, 1, 0, 2, 1]


# --- precision ------------------------------------------------------------------

def test_auto_precision_follows_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        cpuinfo if str(path) == "/proc/cpuinfo" else path, *a, **k))
    assert devices.cpu_info() == ("Some CPU", {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"})
    strategy = tf.distribute.get_strategy()
    if not tf.config.list_physical_devices("GPU"):
        assert devices.fastest_precision(strategy) == "bfloat16"
        for flags, want in (("fpu avx2 amx_bf16", "bfloat16"), ("fpu avx2 avx512f", "float32")):
            cpuinfo.write_text(f"flags\t: {flags}\n")
            assert devices.fastest_precision(strategy) == want
        cpuinfo.unlink()  # no /proc/cpuinfo at all
        assert devices.cpu_info() == ("unknown CPU", set())
        assert devices.fastest_precision(strategy) == "float32"
