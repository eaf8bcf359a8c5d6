"""Several worker processes (tfgpt.runtime.cluster): a cluster from TF_CONFIG or a
SLURM job step trains like one process with as many replicas; unreachable
workers stop with a one-line error; bad TF_CONFIG values are one-line errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MICRO, ROOT, max_diff, read_events, report, run_train_py, train_env, write_corpus

from tfgpt.cli import main
from tfgpt.errors import UserError
from tfgpt.runtime import cluster

TOL = 1e-5
# A tiny run through train.py.
CLI_SMALL = MICRO + ["--vocab-size", "40", "--val-fraction", "0", "--log-every", "1"]


# --- several worker processes ----------------------------------------------------

# Runs train.py's main, and also appends every step's (step, loss) to $LOSS_LOG,
# so that the test sees the losses of every worker, not only the chief's.
WORKER = """
import json, os, sys
from tfgpt.train import report

_on_step = report.Reporter.on_step

def threads():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))

def on_step(self, info):
    with open(os.environ["LOSS_LOG"], "a") as f:
        f.write(json.dumps([info["step"], info["loss"]]) + "\\n")
    if os.environ.get("THREAD_LOG"):
        with open(os.environ["THREAD_LOG"], "a") as f:
            f.write(json.dumps([info["step"], threads()]) + "\\n")
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
    return {
        "TF_CONFIG": json.dumps(
            {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        )
    }


def slurm_env(tasks: int, index: int) -> dict:
    """What srun sets for task `index` of a job step of `tasks` tasks on one node."""
    return {
        "SLURM_PROCID": str(index),
        "SLURM_LOCALID": str(index),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_STEP_TASKS_PER_NODE": str(tasks),
        "SLURM_JOB_ID": "7",
    }


def start_workers(tmp_path: Path, configs: list[dict], args: list[list[str]]) -> list[subprocess.Popen]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    procs = []
    for i, (config, extra) in enumerate(zip(configs, args)):
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
        env = dict(
            env,
            **config,
            LOSS_LOG=str(tmp_path / f"losses{i}.jsonl"),
            TMPDIR=str(scratch),
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)] + extra,
                cwd=tmp_path,
                env=env,
                stdout=open(tmp_path / f"out{i}.txt", "w"),
                stderr=open(tmp_path / f"err{i}.txt", "w"),
            )
        )
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
    return write_corpus(tmp_path_factory.mktemp("corpus") / "reviews.txt", 200, seed=3)


def cluster_args(corpus: Path) -> list[str]:
    """The flags of the worker runs and of their reference."""
    return ["--data", str(corpus), "--max-steps", "5", "--dropout", "0.1", "--run-name", "r"] + CLI_SMALL


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Every step's loss of one process with MirroredStrategy over 2 (logical
    CPU) devices, the reference of both cluster tests (without the per-epoch
    sample, which changes no loss)."""
    from tfgpt.train import report as report_module
    from tfgpt.train import run

    losses = []
    original = report_module.Reporter.on_step

    def record(self, info):
        losses.append(info["loss"])
        original(self, info)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_module.Reporter, "on_step", record)
        patch.setattr(run, "make_sample_fn", lambda *args: None)
        logdir = tmp_path_factory.mktemp("reference")
        assert main(cluster_args(corpus) + ["--cpu-replicas", "2", "--no-export", "--logdir", str(logdir)]) == 0
    assert len(losses) == 5
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tf_config", "slurm"])
def test_two_workers_match_mirrored_strategy(corpus, reference, tmp_path, source):
    """Two worker processes, their cluster from TF_CONFIG or from a SLURM job
    step's environment (--cluster auto), against one process with two replicas."""
    common = cluster_args(corpus)
    if source == "tf_config":
        ports = free_ports(2)
        configs, extra = [tf_config(ports, 0), tf_config(ports, 1)], []
    else:
        configs, extra = [slurm_env(2, 0), slurm_env(2, 1)], ["--cluster-port", str(consecutive_free_ports(2))]
    # The chief's export is checked once (tf_config); the other variant skips it to save time.
    extra += [] if source == "tf_config" else ["--no-export"]
    procs = start_workers(
        tmp_path, configs, [common + extra + ["--logdir", str(tmp_path / f"logs{i}")] for i in range(2)]
    )
    codes = wait_all(procs, limit=300)
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
    written = ["config.json", "vocab.txt", "ckpt/checkpoint"] + (
        ["export/1/saved_model.pb"] if source == "tf_config" else []
    )
    for name in written:
        assert (run / name).exists(), name
    assert not (tmp_path / "logs1").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # the other worker's scratch folders are gone
    assert "2 replica(s)" in (tmp_path / "out0.txt").read_text()
    assert "on each of 2 workers" in (tmp_path / "out0.txt").read_text()


@pytest.mark.slow
def test_unreachable_workers_fail_after_the_timeout(corpus, tmp_path):
    """Two clusters of two workers, each with one worker never started: worker 0
    (which hosts the coordination service) and worker 1 (which cannot reach it)
    must both stop with a one-line error after about --collective-timeout."""
    timeout = 6
    common = [
        "--data",
        str(corpus),
        "--max-steps",
        "2",
        "--no-export",
        "--collective-timeout",
        str(timeout),
    ] + CLI_SMALL
    ports = free_ports(4)
    t0 = time.monotonic()
    procs = start_workers(
        tmp_path,
        [tf_config(ports[:2], 0), tf_config(ports[2:], 1)],
        [common + ["--logdir", str(tmp_path / f"logs{i}")] for i in range(2)],
    )
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


@pytest.mark.slow
def test_a_long_multi_worker_run_keeps_its_thread_count_flat(corpus, tmp_path):
    """300 tiny steps of two CPU workers: the chief's thread count
    (/proc/self/status) after step 300 is within a few of its count after
    step 20. A per-collective timeout started one thread per collective that
    lived for the whole timeout (about 3,300 threads after 400 steps)."""
    ports = free_ports(2)
    args = ["--data", str(corpus), "--max-steps", "300", "--epochs", "1000", "--no-export"] + CLI_SMALL
    procs = start_workers(
        tmp_path,
        [dict(tf_config(ports, i), THREAD_LOG=str(tmp_path / f"threads{i}.jsonl")) for i in range(2)],
        [args + ["--logdir", str(tmp_path / f"logs{i}"), "--run-name", "r"] for i in range(2)],
    )
    codes = wait_all(procs, limit=400)
    assert codes == [0, 0], [(tmp_path / f"err{i}.txt").read_text()[-2000:] for i in range(2)]
    counts = dict(json.loads(line) for line in (tmp_path / "threads0.jsonl").read_text().splitlines())
    assert max(counts) == 300
    print(f"[measured] multi-worker chief's threads: after step 20 {counts[20]}, after step 300 {counts[300]}")
    assert counts[300] <= counts[20] + 8, counts


@pytest.mark.slow
def test_a_lost_worker_stops_the_other_after_the_timeout(corpus, tmp_path):
    """Worker 1 stopped mid-training (SIGSTOP: alive, its connections open,
    silent): worker 0, waiting in a collective, stops within about
    --collective-timeout (the coordination service's heartbeats) with one
    line and exit status 1."""
    timeout = 10
    ports = free_ports(2)
    args = ["--data", str(corpus), "--max-steps", "100000", "--epochs", "100000", "--no-export"] + CLI_SMALL
    args += ["--collective-timeout", str(timeout)]
    logs = [args + ["--logdir", str(tmp_path / f"logs{i}")] for i in range(2)]
    procs = start_workers(tmp_path, [tf_config(ports, i) for i in range(2)], logs)
    losses = tmp_path / "losses1.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not losses.exists() or len(losses.read_text().splitlines()) < 5):
        time.sleep(0.5)
    assert losses.exists(), (tmp_path / "err1.txt").read_text()[-2000:]
    procs[1].send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    code = wait_all(procs[:1], limit=timeout + 90)[0]
    took = time.monotonic() - t0
    procs[1].kill()
    wait_all(procs[1:], limit=10)
    print(f"[measured] the other worker stopped {took:.1f} s after worker 1 fell silent")
    err = (tmp_path / "err0.txt").read_text()
    assert code == 1, err[-2000:]
    ours = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert len(ours) == 1 and "lost contact with the other workers" in ours[0], err[-2000:]
    assert "Traceback" not in err
    assert took < timeout + 60


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, words",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}), "names no task"),
        (
            json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}),
            "worker:2",
        ),
        (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}), "chief:0"),
        (
            json.dumps(
                {"cluster": {"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}, "task": {"type": "worker", "index": 0}}
            ),
            '"ps"',
        ),
    ],
)
def test_bad_tf_config_is_a_one_line_error(corpus, tmp_path, capsys, monkeypatch, config, words):
    monkeypatch.setenv("TF_CONFIG", config)
    assert main(["--data", str(corpus), "--logdir", str(tmp_path)] + CLI_SMALL) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("train.py: error: TF_CONFIG") and words in err, err
    assert not list(tmp_path.rglob("config.json"))


def test_tf_config_decides_the_chief(monkeypatch):
    cases = [
        ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
        ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),
    ]
    for jobs, (kind, index), chief in cases:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": jobs, "task": {"type": kind, "index": index}}))
        found = cluster.detect("auto")
        assert found is not None and found.source == "tf_config" and found.chief is chief
        assert cluster.is_chief_task() is chief, (jobs, kind, index)
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    )
    assert cluster.detect() is None  # one process: no multi-worker strategy
    monkeypatch.delenv("TF_CONFIG")
    assert cluster.detect() is None and cluster.is_chief_task()


def test_a_slurm_job_step_gives_the_cluster(monkeypatch):
    """Four tasks on two nodes, as srun describes them: one worker per task,
    each node's workers on consecutive ports; SLURM_PROCID picks this task."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    env = {
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NODELIST": "node[01-02]",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
    }
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
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}})
    )
    assert cluster.detect("auto").source == "tf_config" and not cluster.is_chief_task("auto")
    assert cluster.detect("slurm").source == "slurm"
    # One task: no cluster. Outside a job step, --cluster slurm is an error.
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert cluster.detect("auto") is None
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(UserError, match="--cluster slurm: SLURM_PROCID and SLURM_STEP_NUM_TASKS"):
        cluster.detect("slurm")
    assert cluster.detect("auto") is None


def test_workers_on_one_host_get_consecutive_local_indices():
    jobs = {"chief": ["h1:1"], "worker": ["h1:2", "h2:1", "h1:3", "h2:2"]}
    got = [
        cluster.local_rank(jobs, j, i)
        for j, i in [("chief", 0), ("worker", 0), ("worker", 1), ("worker", 2), ("worker", 3)]
    ]
    assert got == [0, 1, 0, 2, 1]


@pytest.mark.slow
def test_bad_tf_config_in_a_subprocess(corpus, tmp_path):
    """The same error through train.py: one line, status 2, no traceback."""
    proc = run_train_py(
        ["--data", str(corpus), "--logdir", str(tmp_path)], env=train_env(TF_CONFIG="{not json"), timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "TF_CONFIG is not valid JSON" in proc.stderr.strip().splitlines()[-1]


# --- the devices of each worker ----------------------------------------------------

# A worker on a machine with (faked) GPUs: tf.config reports 2 x N GPUs, and
# tfgpt builds the strategy of `--gpus N` in a cluster; prints its worker
# devices and device line. Nothing runs on the GPUs.
FAKE_GPU_WORKER = """
import json, sys
import tensorflow as tf
per_worker, mode, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2 * per_worker)]
visible = list(gpus)
real = tf.config.list_physical_devices
tf.config.list_physical_devices = lambda kind=None: list(gpus) if kind == "GPU" else real(kind)
tf.config.get_visible_devices = lambda kind=None: list(visible) if kind == "GPU" else []
def set_visible(chosen, kind=None):
    visible[:] = chosen
tf.config.set_visible_devices = set_visible
tf.config.experimental.set_memory_growth = lambda device, on: None
H100 = {"device_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)}
tf.config.experimental.get_device_details = lambda d: H100
from tfgpt.runtime import devices
devices.nvidia_smi = lambda *a: ["NVIDIA H100 80GB HBM3, 81559"] if "--query-gpu" in a[0] else []
from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.runtime.distribute import make_strategy
from tfgpt.train.plan import make_plan
strategy = make_strategy(gpus=per_worker, cluster=mode, collective_timeout=60, cluster_port=port)
line = make_plan(GPTConfig(), TrainConfig(), strategy).device_line()
print("RESULT " + json.dumps({"devices": list(strategy.extended.worker_devices), "line": line,
                              "visible": [d.name for d in visible]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("source", ["tf_config", "slurm"])
def test_each_worker_trains_on_its_gpus(tmp_path, source):
    """Two workers of one machine with four (faked) GPUs, --gpus 2 each: each
    worker's strategy has the devices GPU:0 and GPU:1 (the resolver is told
    of them: without it each worker had one CPU), each worker sees its own
    two GPUs (by local index), and the device line names the GPUs."""
    script = tmp_path / "fake_gpu_worker.py"
    script.write_text(FAKE_GPU_WORKER)
    if source == "tf_config":
        ports = free_ports(2)
        configs, port = [tf_config(ports, i) for i in range(2)], 0
    else:
        port = consecutive_free_ports(2)
        configs = [slurm_env(2, i) for i in range(2)]
    procs = []
    for config in configs:
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
        env = dict(env, **config, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), "2", source, str(port)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180) for p in procs]
    for i, ((out, err), p) in enumerate(zip(outs, procs)):
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.split("RESULT ", 1)[1])
        assert got["devices"] == [f"/job:worker/replica:0/task:{i}/device:GPU:{g}" for g in range(2)], got
        assert got["visible"] == [f"/physical_device:GPU:{2 * i + g}" for g in range(2)]
        assert got["line"].startswith(
            "devices: 2 x NVIDIA H100 80GB HBM3 (compute capability 9.0, 80 GiB) on each of 2"
        )
        assert "precision bfloat16; XLA on; 4 replica(s); 10 step(s) per call" in got["line"], got["line"]
