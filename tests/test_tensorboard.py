"""A tiny run read back through a real TensorBoard server: scalars, text
samples, hparams and the graph; the speed scalars; the profiler trace;
summaries that survive a killed run. The FLOPs formula is tests/test_flops.py."""

import html
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, SMALL, SMALL_BATCH, SMALL_MAXLEN, read_events, run_train_py, write_corpus

from tfgpt.config import GPTConfig
from tfgpt.model.loss import auto_chunk
from tfgpt.runtime.flops import flops_per_token

# Every test here trains end to end, starts train.py or a TensorBoard server.
pytestmark = pytest.mark.slow

BATCH, MAXLEN = SMALL_BATCH, SMALL_MAXLEN
SMALL = SMALL + ["--no-export"]
TRAIN_TAGS = {"loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_second", "step_time_ms", "mfu"}
SERVER_START_S = 90  # the most a test waits for TensorBoard to serve the run
SERVER_LIFETIME_S = 300  # the server is killed after this, whatever happens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-epoch tiny run with steps 3-4 profiled; its stdout is kept.

    It runs in a process of its own, as a user's run does: the graph trace of
    its first step then holds that step's functions only. In this process,
    after other tests, the trace also collects dozens of other function
    graphs, and TensorBoard has to merge them all to serve the graph."""
    tmp = tmp_path_factory.mktemp("tb")
    corpus = write_corpus(tmp / "reviews.txt", 800)
    done = run_train_py(
        [
            "--data",
            str(corpus),
            "--logdir",
            str(tmp / "logs"),
            "--run-name",
            "r",
            "--precision",
            "float32",
            "--epochs",
            "2",
            "--profile-steps",
            "3:4",
        ]
        + SMALL,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return tmp / "logs", tmp / "logs" / "r", done.stdout


class Server:
    """A `tensorboard` process on a free 127.0.0.1 port (chosen by the server
    itself: --port 0), and a JSON client for its HTTP API."""

    def __init__(self, logdir: Path):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--load_fast",
                "false",
                "--reload_interval",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.killer = threading.Timer(SERVER_LIFETIME_S, self.proc.kill)
        self.killer.daemon = True
        self.killer.start()
        self.log: list[str] = []
        self.url = None
        found = threading.Event()

        def drain():  # reads stderr to the end, so that the server never blocks on it
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
                if m and not self.url:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(SERVER_START_S) or not self.url:
            self.stop()
            pytest.fail("tensorboard did not start:\n" + "".join(self.log[-20:]))

    def get(self, route: str, **params):
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url + route + query, timeout=30) as r:
            return json.loads(r.read().decode())

    def get_text(self, route: str, **params) -> str:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url + route + query, timeout=30) as r:
            return r.read().decode()

    def post(self, route: str, body: dict):
        request = urllib.request.Request(
            self.url + route,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read().decode())

    def wait_for(self, ready, what: str):
        """Polls ready() until it returns something true, and returns that;
        HTTP errors (a run still loading) and unreadable answers count as not yet."""
        deadline = time.monotonic() + SERVER_START_S
        last = None
        while time.monotonic() < deadline:
            try:
                result = ready()
                if result:
                    return result
            except (OSError, ValueError) as e:
                last = e
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"tensorboard never served {what} (last error: {last!r}):\n" + "".join(self.log[-40:]))

    def stop(self):
        self.killer.cancel()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(run):
    logdir, run_dir, _ = run
    s = Server(logdir)
    try:
        points = {
            name: len(read_events(run_dir / sub)["loss"])
            for name, sub in (("r/train", "train"), ("r/validation", "validation"))
        }

        def loaded():  # every tag of both runs, and every point of their loss curves
            tags = s.get("/data/plugin/scalars/tags")
            if not (TRAIN_TAGS <= set(tags.get("r/train", {})) and "perplexity" in tags.get("r/validation", {})):
                return False
            return all(
                len(s.get("/data/plugin/scalars/scalars", run=name, tag="loss")) == n for name, n in points.items()
            )

        def graph_listed():  # the graphs plugin has the run's traced step
            return s.get("/data/plugin/graphs/info").get("r/train", {}).get("tags", {}).get("train_step")

        s.wait_for(loaded, "the run's scalars")
        s.wait_for(graph_listed, "the run's graph")
        yield s
    finally:
        s.stop()


def final_val_loss(stdout: str) -> float:
    return float(re.search(r"final validation loss (\d+\.\d+)", stdout).group(1))


# --- through the server ---------------------------------------------------------------


def test_server_scalar_tags_and_values(run, server):
    _, run_dir, stdout = run
    tags = server.get("/data/plugin/scalars/tags")
    assert set(tags["r/train"]) == TRAIN_TAGS
    assert set(tags["r/validation"]) == {"loss", "perplexity"}
    assert "r" not in tags  # the hparams session holds no scalars
    for sub, names in (("train", TRAIN_TAGS), ("validation", {"loss", "perplexity"})):
        events = read_events(run_dir / sub)
        for tag in names:
            served = server.get("/data/plugin/scalars/scalars", run=f"r/{sub}", tag=tag)
            steps = [step for _, step, _ in served]
            values = [value for _, _, value in served]
            assert steps == [s for s, _ in events[tag]], tag
            np.testing.assert_allclose(values, [float(v) for _, v in events[tag]], rtol=1e-6, err_msg=tag)
    # Values against what the run printed, and the two-run chart's data.
    val = server.get("/data/plugin/scalars/scalars", run="r/validation", tag="loss")
    assert [step for _, step, _ in val] == [49, 98]  # 784 windows / 16 = 49 steps per epoch
    assert val[-1][2] == pytest.approx(final_val_loss(stdout), abs=1e-4)
    val_ppl = server.get("/data/plugin/scalars/scalars", run="r/validation", tag="perplexity")
    np.testing.assert_allclose([v for *_, v in val_ppl], np.exp([v for *_, v in val]), rtol=1e-5)
    train = server.get("/data/plugin/scalars/scalars", run="r/train", tag="loss")
    assert train[0][1] == 5 and train[-1][1] == 98 and train[-1][2] < 0.7 * train[0][2]


def test_server_text_samples(run, server):
    _, _, stdout = run
    assert server.get("/data/plugin/text/tags") == {"r/train": ["samples"]}
    served = server.get("/data/plugin/text/text", run="r/train", tag="samples")
    printed = re.findall(r"^sample: (.*)$", stdout, re.M)
    assert [entry["step"] for entry in served] == [49, 98] and len(printed) == 2
    for entry, text in zip(served, printed):
        page = entry["text"]
        paragraphs = re.findall(r"<p>(.*?)</p>", page, re.S)
        assert len(paragraphs) == 2, page  # one line per sample, then the settings
        assert paragraphs[0].startswith("<strong>this movie is</strong> ")
        shown = html.unescape(re.sub(r"<[^>]+>", "", paragraphs[0]))
        assert shown == text
        settings = rf"<em>8 tokens, top-k 10, temperature 1\.0, step {entry['step']}, \d+\.\d\ds</em>"
        assert re.fullmatch(settings, paragraphs[1]), paragraphs[1]


def test_server_hparams(run, server):
    _, run_dir, stdout = run
    experiment = server.post("/data/plugin/hparams/experiment", {"experimentName": ""})
    names = {h["name"] for h in experiment["hparamInfos"]}
    for name in (
        "embed_dim",
        "num_heads",
        "head_dim",
        "maxlen",
        "vocab_size",
        "batch_size",
        "lr",
        "precision",
        "packing",
        "seed",
        "num_params",
        "flops_per_token",
        "mfu_peak_flops",
    ):
        assert name in names, name
    assert not names & {"logdir", "run_name"}
    metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
    assert {("validation", "loss"), ("validation", "perplexity"), ("train", "mfu")} <= metrics

    groups = server.post(
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "startIndex": 0,
            "sliceSize": 10,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": n} for n in sorted(names)]
            + [{"metric": {"group": g, "tag": t}} for g, t in sorted(metrics)],
        },
    )["sessionGroups"]
    assert [g["name"] for g in groups] == ["r"]
    hparams = groups[0]["hparams"]
    saved = json.loads((run_dir / "config.json").read_text())
    for section in ("model", "train"):
        for key, value in saved[section].items():
            if value is None or key in ("logdir", "run_name"):
                continue
            assert hparams[key] == value, key
    assert hparams["head_dim"] == 32 and hparams["precision"] == "float32" and hparams["batch_size"] == BATCH
    assert hparams["num_params"] == int(re.search(r"model: ([\d,]+) parameters", stdout).group(1).replace(",", ""))
    values = {(m["name"]["group"], m["name"]["tag"]): m for m in groups[0]["metricValues"]}
    assert values[("validation", "loss")]["value"] == pytest.approx(final_val_loss(stdout), abs=1e-4)
    assert values[("validation", "loss")]["trainingStep"] == 98
    assert values[("validation", "perplexity")]["value"] == pytest.approx(
        math.exp(values[("validation", "loss")]["value"]), rel=1e-5
    )


def test_server_graph(server):
    info = server.get("/data/plugin/graphs/info")
    assert info["r/train"]["tags"]["train_step"]["op_graph"] is True
    # The server answers a graph request by reading and merging the traced
    # RunMetadata (the run's largest event); an HTTP error here counts as not
    # served yet and is asked again, and a failure shows the server's log.
    graph = server.wait_for(
        lambda: server.get_text("/data/plugin/graphs/graph", run="r/train", tag="train_step"), "the graph of train_step"
    )
    assert graph.count("\nnode {") + graph.startswith("node {") > 10
    for function in ("grads_fn", "apply_fn"):  # the per-replica step's parts, in the function library
        assert f'name: "__inference_{function}_' in graph


# --- from the event files ------------------------------------------------------------------


def test_speed_scalars(run):
    _, run_dir, stdout = run
    events = read_events(run_dir / "train")
    tps = np.array([float(v) for _, v in events["tokens_per_second"]])
    step_ms = np.array([float(v) for _, v in events["step_time_ms"]])
    mfu = np.array([float(v) for _, v in events["mfu"]])
    assert len(tps) == len(step_ms) == len(mfu) == len(events["loss"])
    np.testing.assert_allclose(tps, BATCH * MAXLEN / (step_ms / 1000), rtol=1e-5)
    assert np.all(mfu > 0) and np.all(mfu <= 1), mfu
    # mfu = FLOPs per token * tokens/s / peak, with the values the run recorded as hparams.
    hparams = session_hparams(run_dir)
    vocab = int(hparams["vocab_size"])  # the corpus has fewer words than --vocab-size
    fpt = flops_per_token(GPTConfig(vocab_size=vocab, maxlen=MAXLEN, embed_dim=32, ff_dim=32))
    assert hparams["flops_per_token"] == fpt
    np.testing.assert_allclose(mfu, fpt * tps / hparams["mfu_peak_flops"], rtol=1e-5)
    assert re.search(r"mfu: [\d.]+ MFLOP per token; peak 1 x [\d.]+ TFLOP/s \(float32 matmuls measured", stdout)
    # The CPU-dependent choices are stated: the kernels, and the loss's chunk
    # (the largest divisor of the rows whose float32 logits fit 32 MiB).
    assert re.search(r"^devices: .+ \(\d+ cores, (oneDNN \w+|Eigen).*\); precision float32;", stdout, re.M), stdout
    rows = BATCH * MAXLEN
    chunk = auto_chunk(rows, vocab)
    assert f"output layer and loss in chunks of {chunk} of a replica's {rows} positions" in stdout


def session_hparams(run_dir: Path) -> dict:
    """The hparams the run wrote to its root directory, read from the event file."""
    from tensorboard.plugins.hparams import metadata

    for path in run_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
                    return {k: getattr(x, x.WhichOneof("kind")) for k, x in info.hparams.items()}
    raise AssertionError("no hparams in " + str(run_dir))


def test_profile_trace(run):
    _, run_dir, stdout = run
    traces = list((run_dir / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    if not traces:
        reason = re.search(r"warning: profiler unavailable.*", stdout)
        if reason:
            pytest.skip(f"the installed TensorFlow cannot profile: {reason.group(0)}")
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert "profile of steps 3-4 written to" in stdout


def test_killed_run_keeps_its_curve(tmp_path):
    """SIGKILL mid-run (no handler can run): the scalars up to the last
    --log-every step are already on disk, and --peak-flops sets the peak."""
    corpus = write_corpus(tmp_path / "reviews.txt", 800)
    run_dir = tmp_path / "logs" / "k"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--data",
            str(corpus),
            "--logdir",
            str(tmp_path / "logs"),
            "--run-name",
            "k",
            "--epochs",
            "1000",
            "--peak-flops",
            "2e12",
        ]
        + SMALL,
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=env,
    )
    try:
        deadline = time.monotonic() + 90
        steps = []
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "train").exists():
                steps = [s for s, _ in read_events(run_dir / "train").get("loss", [])]
                if len(steps) >= 3:
                    break
            time.sleep(0.3)
        assert proc.poll() is None and len(steps) >= 3, (steps, (tmp_path / "stderr.txt").read_text()[-2000:])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    events = read_events(run_dir / "train")
    steps = [s for s, _ in events["loss"]]
    assert steps[:3] == [5, 10, 15] and set(events) >= TRAIN_TAGS
    hparams = session_hparams(run_dir)
    assert hparams["peak_flops"] == 2e12 and hparams["mfu_peak_flops"] == 2e12
