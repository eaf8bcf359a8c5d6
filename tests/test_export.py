"""The exported SavedModel: its layout, a TensorFlow-only process that serves
it and replays its warmup requests, the server's configuration files,
saved_model_cli, and the export and generate commands.

Exporting traces every signature of the sampler (seconds each time): the
tests that read an export share one (the `exported` fixture)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import reference_greedy

from tfgpt.config import GPTConfig, TrainConfig, save_config
from tfgpt.data.text import PAD, UNK, read_vocab, write_vocab
from tfgpt.model.gpt import GPT
from tfgpt.runtime import devices
from tfgpt.serving import export as export_cli
from tfgpt.serving import generate as generate_cli
from tfgpt.serving.export import (
    BATCHING,
    MODEL_NAME,
    SERVED_BASE_PATH,
    WARMUP_BATCH,
    export_model,
    find_checkpoint,
    next_version,
)
from tfgpt.serving.sampler import SIGNATURES

WORDS = [PAD, UNK] + [f"w{i}" for i in range(2, 40)]
CONFIG = GPTConfig(
    vocab_size=len(WORDS), maxlen=8, embed_dim=16, num_heads=2, ff_dim=32, num_layers=1, dropout=0.0, head_dim=8
)
PROMPT = "w5 w9 w2"


def make_model(seed=1, scale=4.0) -> GPT:
    """A random model with well-separated logits that never samples the padding id."""
    model = GPT(CONFIG, seed=seed)
    for v in model.trainable_variables:
        v.assign(v * scale)
    model.head.b.assign(tf.tensor_scatter_nd_update(model.head.b, [[0]], [-1e9]))
    return model


def greedy_text(model: GPT, text: str, steps: int) -> str:
    """The prompt and its greedy continuation by the full model on the sliding sequence, no cache."""
    ids = [WORDS.index(w) for w in text.split()]
    return " ".join(WORDS[i] for i in ids + reference_greedy(model, ids, steps, stop_at_padding=False))


def reference_log_prob(model: GPT, text: str) -> float:
    ids = [WORDS.index(w) for w in text.split()]
    return sum(
        float(tf.nn.log_softmax(model(tf.constant([ids[max(0, i - CONFIG.maxlen) : i]]))[0, -1])[ids[i]])
        for i in range(1, len(ids))
    )


def greedy_inputs(max_tokens: int, prompt: str = PROMPT) -> dict:
    """`generate`'s inputs for one greedy row."""
    return dict(
        prompt=tf.constant([prompt]),
        max_tokens=tf.constant([max_tokens]),
        top_k=tf.constant([5]),
        top_p=tf.constant([1.0]),
        temperature=tf.constant([0.0]),
        repetition_penalty=tf.constant([1.0]),
        seed=tf.constant([0], tf.int64),
    )


def mirrored_strategy():
    """MirroredStrategy over the two logical CPU devices of tests/conftest.py;
    None without them."""
    devices = tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]]) if len(devices) >= 2 else None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, export base, version dir): the export of a model whose
    variables are mirrored over two devices, as a multi-replica run's are,
    and model, the same weights as plain variables, the reference of the
    tests. The vocabulary file it was exported from is deleted afterwards:
    the SavedModel must carry its own copy."""
    root = tmp_path_factory.mktemp("export")
    vocab = root / "vocab.txt"
    write_vocab(WORDS, vocab)
    strategy = mirrored_strategy()
    if strategy is None:
        mirrored = make_model()
    else:
        with strategy.scope():
            mirrored = make_model()
    path = export_model(mirrored, vocab, root / "export")
    vocab.unlink()
    return make_model(), root / "export", path


@pytest.fixture(scope="module")
def loaded(exported):
    """`exported` loaded in this process (loading takes seconds)."""
    return tf.saved_model.load(str(exported[2]))


@pytest.fixture
def load_once(monkeypatch, exported, loaded):
    """tf.saved_model.load gives `loaded` for the export's directory: the
    generate tests call the command many times, and each call loads."""
    real = tf.saved_model.load

    def load(path, *args, **kwargs):
        return (
            loaded
            if Path(path).resolve() == exported[2].resolve() and not (args or kwargs)
            else real(path, *args, **kwargs)
        )

    monkeypatch.setattr(tf.saved_model, "load", load)


def test_the_savedmodel_writer_traces_each_signature_once(tmp_path):
    """Each signature is traced once, inside the writer: a function traced
    before it is traced again there, which doubled an export's time."""
    from tfgpt.serving.sampler import Sampler

    write_vocab(WORDS, tmp_path / "vocab.txt")
    sampler = Sampler(make_model(), tmp_path / "vocab.txt", frozen=True)
    tf.saved_model.save(sampler, str(tmp_path / "saved"), signatures=sampler.signatures())
    assert {name: getattr(sampler, name).experimental_get_tracing_count() for name in SIGNATURES} == {
        name: 1 for name in SIGNATURES
    }


def test_export_writes_integer_versions(exported, tmp_path):
    model, base, path = exported
    assert path == base / "1"
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    assert read_vocab(path / "assets" / "vocab.txt") == WORDS
    assert (path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    # Nothing half-written left behind; the server's files beside the versions.
    assert sorted(p.name for p in base.iterdir()) == ["1", "batching_parameters.txt", "models.config"]

    (tmp_path / "4").mkdir()
    (tmp_path / "notes").mkdir()
    assert next_version(tmp_path) == 5  # one past the largest integer directory
    with pytest.raises(FileExistsError):
        export_model(model, path / "assets" / "vocab.txt", tmp_path, version=4)


SERVE = r"""
import json, sys
import tensorflow as tf

model = tf.saved_model.load(sys.argv[1])
prompt, texts = sys.argv[2], sys.argv[3:]
out = {"signatures": sorted(model.signatures.keys())}
d = model.signatures["serving_default"](prompt=tf.constant([prompt, prompt]))
out["serving_default"] = [t.decode() for t in d["text"].numpy()]
def rows(n, max_tokens, top_k, temperature, seed, top_p=1.0, penalty=1.0):
    return dict(max_tokens=tf.fill([n], max_tokens), top_k=tf.fill([n], top_k), top_p=tf.fill([n], top_p),
                temperature=tf.fill([n], temperature), repetition_penalty=tf.fill([n], penalty),
                seed=tf.fill([n], tf.constant(seed, tf.int64)))

g = model.signatures["generate"](prompt=tf.constant([prompt]), **rows(1, 12, 10, 0.0, 1))
out["generate"] = g["text"].numpy()[0].decode()
out["lengths"] = g["lengths"].numpy().tolist()
s = model.signatures["score"](text=tf.constant(texts))
out["log_prob"] = s["log_prob"].numpy().tolist()
out["num_tokens"] = s["num_tokens"].numpy().tolist()
# The functions are also methods of the loaded object.
a = model.generate(tf.constant([prompt]), *rows(1, 5, 3, 1.0, 7, 0.9, 1.2).values())
b = model.generate(tf.constant([prompt]), *rows(1, 5, 3, 1.0, 7, 0.9, 1.2).values())
out["same_seed_same_text"] = a["text"].numpy().tolist() == b["text"].numpy().tolist()
try:
    model.signatures["generate"](prompt=tf.constant([prompt, prompt]),
                                 **{**rows(2, 5, 3, 1.0, 1), "temperature": tf.constant([1.0, float("nan")])})
    out["nan"] = "accepted"
except tf.errors.InvalidArgumentError as e:
    out["nan"] = e.message
out["tfgpt_modules"] = sorted(m for m in sys.modules if m == "tfgpt" or m.startswith("tfgpt."))
print("RESULT " + json.dumps(out))
"""


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


SCORED = ["w3 w4", " ".join(f"w{2 + (5 * i) % 37}" for i in range(14))]  # the second slides past maxlen


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """The output of one process that imports TensorFlow and the serving
    protos only and runs SERVE, then REPLAY, on the export: {"serve": ..., "replay": ...}."""
    _, _, path = exported
    done = subprocess.run(
        [sys.executable, "-c", SERVE + REPLAY, str(path), PROMPT, *SCORED],
        cwd=tmp_path_factory.mktemp("served"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {
        line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
        for line in done.stdout.splitlines()
        if line.startswith(("RESULT ", "REPLAY "))
    }
    return {"serve": lines["RESULT"], "replay": lines["REPLAY"]}


@pytest.mark.slow
def test_a_tensorflow_only_process_serves_the_export(exported, served):
    model = exported[0]
    texts = SCORED
    out = served["serve"]
    assert out["tfgpt_modules"] == []
    assert out["signatures"] == sorted(SIGNATURES)
    for text in out["serving_default"]:
        assert text.startswith(PROMPT + " ") and len(text.split()) == 3 + 40
    assert out["generate"] == greedy_text(model, PROMPT, 12)
    assert out["lengths"] == [12]
    assert out["num_tokens"] == [1, 13]
    np.testing.assert_allclose(out["log_prob"], [reference_log_prob(model, t) for t in texts], rtol=1e-4)
    assert out["same_seed_same_text"]
    assert "temperature must be a finite number; row 1 has nan" in out["nan"]


@pytest.mark.slow
def test_saved_model_cli_lists_and_runs_the_signatures(exported):
    _, _, path = exported
    cli = str(Path(sys.executable).with_name("saved_model_cli"))
    show = subprocess.run(
        [cli, "show", "--dir", str(path), "--all"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert show.returncode == 0, show.stderr[-3000:]
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in show.stdout
    for field in (
        "prompt",
        "max_tokens",
        "top_k",
        "top_p",
        "temperature",
        "repetition_penalty",
        "seed",
        "text",
        "completion",
        "token_ids",
        "lengths",
        "log_prob",
        "num_tokens",
        "perplexity",
    ):
        assert f"['{field}']" in show.stdout, field
    run = subprocess.run(
        [
            cli,
            "run",
            "--dir",
            str(path),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            f'prompt=["{PROMPT}"]',
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Result for output key text:" in run.stdout
    assert f"b'{PROMPT} w" in run.stdout


# TensorFlow Serving's warmup, as the server does it: every PredictionLog of
# assets.extra/tf_serving_warmup_requests through its signature, in a process
# with TensorFlow and the serving protos only (the `served` fixture's, after SERVE).
REPLAY = r"""
import json, sys
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

model = tf.saved_model.load(sys.argv[1])
results = []
for record in tf.data.TFRecordDataset(sys.argv[1] + "/assets.extra/tf_serving_warmup_requests"):
    log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
    request = log.predict_log.request
    inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    out = model.signatures[request.model_spec.signature_name](**inputs)
    results.append({
        "model": request.model_spec.name, "signature": request.model_spec.signature_name,
        "inputs": {k: v.numpy().tolist() if v.dtype != tf.string else [x.decode() for x in v.numpy()]
                   for k, v in inputs.items()},
        "outputs": {k: v.numpy().tolist() if v.dtype != tf.string else [x.decode() for x in v.numpy()]
                    for k, v in out.items()}})
results.append(sorted(m for m in sys.modules if m == "tfgpt" or m.startswith("tfgpt.")))
print("REPLAY " + json.dumps(results))
"""


@pytest.mark.slow
def test_warmup_requests_replay_through_every_signature(exported, served):
    model = exported[0]
    *records, modules = served["replay"]
    assert modules == []
    assert {r["model"] for r in records} == {MODEL_NAME}
    batches = {(r["signature"], len(next(iter(r["inputs"].values())))) for r in records}
    for name in SIGNATURES:  # batch 1 and the larger batch, for every signature
        assert {(name, 1), (name, WARMUP_BATCH)} <= batches, name
    unk = [WORDS.index("[UNK]")]
    for r in records:
        inputs, outputs = r["inputs"], r["outputs"]
        n = len(next(iter(inputs.values())))
        assert all(len(v) == n for v in outputs.values()), r["signature"]  # batchable: dim 0 is the batch
        if r["signature"] == "score":
            # Every warmup word is unknown to this vocabulary: "[UNK] ..." texts.
            assert outputs["num_tokens"] == [len(t.split()) - 1 for t in inputs["text"]]
            assert all(np.isfinite(outputs["log_prob"])) and all(lp < 0 for lp in outputs["log_prob"])
            continue
        want = inputs.get("max_tokens", [40] * n)
        assert outputs["lengths"] == want  # make_model never ends a row early
        for prompt, text, completion, ids, length in zip(
            inputs["prompt"], outputs["text"], outputs["completion"], outputs["token_ids"], outputs["lengths"]
        ):
            assert text == " ".join(["[UNK]"] * len(prompt.split()) + ([completion] if completion else []))
            assert len(completion.split()) == length and all(i > 0 for i in ids[:length])
        if r["signature"] == "generate":
            # Greedy rows (temperature 0, no penalty) are the full model's choice.
            for i in range(n):
                if inputs["temperature"][i] <= 0 and inputs["repetition_penalty"][i] == 1.0:
                    seq = unk * len(inputs["prompt"][i].split())
                    for _ in range(want[i]):
                        seq.append(int(np.argmax(model(tf.constant([seq[-CONFIG.maxlen :]]))[0, -1])))
                    assert outputs["token_ids"][i][: want[i]] == seq[-want[i] :]


def test_server_configuration_beside_the_versions(exported):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    _, base, _ = exported
    config = text_format.Parse((base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == MODEL_NAME and model.base_path == SERVED_BASE_PATH
    assert model.model_platform == "tensorflow" and model.model_version_policy.latest.num_versions == 1
    # batching_parameters.txt is a BatchingParameters text proto (whose
    # definition the serving API package does not ship): "field { value: N }".
    fields = {}
    for line in (base / "batching_parameters.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, value = re.fullmatch(r"(\w+) \{ value: (\d+) \}", line).groups()
        fields[name] = int(value)
    assert fields == BATCHING
    assert set(fields) <= {"max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"}
    assert fields["max_batch_size"] == WARMUP_BATCH  # the warmup covers the largest batch


# --- python -m tfgpt.export -------------------------------------------------------


def _run_dir(root: Path) -> Path:
    """A run directory as training leaves it: config, vocabulary, and
    checkpoints at steps 30 (weights of make_model(seed=5)) and 60 (changed)."""
    run = root / "run"
    run.mkdir()
    save_config(run / "config.json", CONFIG, TrainConfig())
    write_vocab(WORDS, run / "vocab.txt")
    model = make_model(seed=5)
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, step=step), run / "ckpt", max_to_keep=3, checkpoint_name="ckpt"
    )
    step.assign(30)
    manager.save(checkpoint_number=30)
    model.head.b.assign(model.head.b + tf.random.stateless_normal(model.head.b.shape, seed=[9, 9]) * 50.0)
    step.assign(60)
    manager.save(checkpoint_number=60)
    return run


def test_export_command_restores_the_chosen_checkpoint_in_float32_unless_told(tmp_path, capsys):
    """A run that trained in bfloat16: --step 30 without --precision exports
    that checkpoint's weights computing in float32 (the serving default,
    fast on every CPU); the latest checkpoint with --precision bfloat16
    computes in bfloat16. Each export's scores are its own reference
    model's, and not the other precision's (two exports rather than four:
    each takes seconds)."""
    run = _run_dir(tmp_path)
    save_config(run / "config.json", CONFIG, TrainConfig(precision="bfloat16", compute_precision="bfloat16"))
    assert find_checkpoint(run, None).endswith("ckpt-60")
    assert export_cli.main([str(run), "--step", "30", "--version", "1"]) == 0
    assert "ckpt-30; float32 matrix products" in capsys.readouterr().out
    # The chosen checkpoint's weights (make_model(seed=5)'s), greedy as the full model.
    loaded = tf.saved_model.load(str(run / "export" / "1"))
    out = loaded.generate(**greedy_inputs(10))
    assert out["text"].numpy()[0].decode() == greedy_text(make_model(seed=5), PROMPT, 10)
    exports = [(1, 30, tf.float32, tf.bfloat16)]
    if devices.bfloat16_aborts():
        assert export_cli.main([str(run), "--version", "3", "--precision", "bfloat16"]) == 2
        assert "bfloat16 cannot run here" in capsys.readouterr().err
    else:
        assert export_cli.main([str(run), "--version", "3", "--precision", "bfloat16"]) == 0
        out = capsys.readouterr().out
        assert "ckpt-60; bfloat16 matrix products" in out and "exported SavedModel" in out
        exports.append((3, 60, tf.bfloat16, tf.float32))
    text = " ".join(f"w{i}" for i in (5, 9, 2, 30, 17, 4, 11))
    for version, step, dtype, other in exports:
        models = [GPT(CONFIG, compute_dtype=d) for d in (dtype, other)[: 1 if devices.bfloat16_aborts() else 2]]
        for m in models:
            tf.train.Checkpoint(model=m).read(str(run / "ckpt" / f"ckpt-{step}")).expect_partial()
        loaded = tf.saved_model.load(str(run / "export" / str(version)))
        score = float(loaded.score(tf.constant([text]))["log_prob"][0])
        np.testing.assert_allclose(score, reference_log_prob(models[0], text), rtol=1e-4)
        for twin in models[1:]:  # bfloat16 products round the logits: the other precision is a different model
            assert abs(score - reference_log_prob(twin, text)) > 1e-4 * abs(score), version


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("no_checkpoint", "no checkpoint in"),
        ("no_step", "no checkpoint for step 99"),
    ],
)
def test_export_command_errors_are_one_line(tmp_path, capsys, case, message):
    if case == "missing":
        args = [str(tmp_path / "nowhere")]
    elif case == "no_checkpoint":
        (tmp_path / "run").mkdir()
        save_config(tmp_path / "run" / "config.json", CONFIG, TrainConfig())
        write_vocab(WORDS, tmp_path / "run" / "vocab.txt")
        args = [str(tmp_path / "run")]
    else:
        args = [str(_run_dir(tmp_path)), "--step", "99"]
    assert export_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export: error: ") and message in err and "\n" not in err
    if case == "no_step":
        assert "available steps: 30, 60" in err


def test_export_flag_errors_and_run_errors_name_the_command_alike(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        export_cli.main([str(tmp_path), "--step", "x"])
    assert done.value.code == 2
    flag = capsys.readouterr().err.strip().splitlines()[-1]
    assert export_cli.main([str(tmp_path / "nowhere")]) == 2
    run = capsys.readouterr().err.strip()
    assert flag.startswith("export: error: argument --step: invalid int value"), flag
    assert run == f"export: error: run directory {tmp_path / 'nowhere'} does not exist", run


def test_export_help_says_what_it_writes(capsys):
    with pytest.raises(SystemExit) as done:
        export_cli.main(["--help"])
    assert done.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    # The description is the docstring's whole first sentence, not its first line.
    assert "the version directories, the warmup requests, and the server's configuration files." in flat
    for flag in ("--step", "--version", "--precision"):
        assert flag in flat


@pytest.mark.slow
def test_the_serving_benchmark_measures_an_export_in_a_tensorflow_only_process(exported):
    from benchmarks.serving_bench import SETTINGS, first_over_median, measure
    from tfgpt.serving.export import warmup_requests

    _, _, path = exported
    tokens = SETTINGS["max_tokens"]
    report = measure(path, repeats=2)  # one child process (about 15 s)
    records = sum(times for _, _, times in warmup_requests(CONFIG.maxlen, CONFIG.vocab_size))
    assert report["tfgpt_modules"] == [] and report["warmup_records"] == records
    for batch in (1, 32):
        figures = report[f"batch{batch}"]
        assert len(figures["runs_s"]) == 3 and min(figures["runs_s"]) > 0
        # The model never samples the padding id, so no row ends early.
        assert figures["first"]["tokens"] == figures["steady"]["tokens"] == batch * tokens
        assert figures["steady"]["ms_per_token"] <= figures["median"]["ms_per_token"]
    assert report["mixed_equal"] == 64 and report["other_prompt_first"]["tokens"] == tokens
    # first / median of the later requests: 3 s against the median of 1, 2 and 5 s.
    assert first_over_median({"runs_s": [3.0, 5.0, 1.0, 2.0]}) == 1.5


# --- python -m tfgpt.generate ------------------------------------------------------


def test_generate_command(exported, capsys, load_once):
    model, _, path = exported
    args = [
        str(path),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "6",
        "--top-k",
        "10",
        "--top-p",
        "0.9",
        "--temperature",
        "1.0",
        "--repetition-penalty",
        "1.3",
        "--seed",
        "7",
        "--num-samples",
        "4",
    ]
    assert generate_cli.main(args) == 0
    first = capsys.readouterr().out.strip().split("\n")
    assert [line[:4] for line in first] == ["[1] ", "[2] ", "[3] ", "[4] "]
    assert all(line[4:].startswith(PROMPT + " ") and len(line[4:].split()) == 3 + 6 for line in first)
    assert len(set(first)) > 1  # each sample its own seed
    assert generate_cli.main(args) == 0
    assert capsys.readouterr().out.strip().split("\n") == first  # same seed, same text

    for flags, message in [
        (["--max-tokens", "100000"], "max_tokens must be between 0 and"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a finite number above 0 (1 = off); row 0 has 0"),
    ]:
        assert generate_cli.main([str(path), "--prompt", PROMPT, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("generate: error: ") and message in err and err.count("\n") == 1, err
    assert generate_cli.main([str(path.parent), "--prompt", PROMPT]) == 2
    no_model = f"generate: error: {path.parent} is not a SavedModel directory (no saved_model.pb)\n"
    assert capsys.readouterr().err == no_model

    assert generate_cli.main([str(path), "--prompt", "w3 w4 w5", "--score"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_generate_command_streams_the_text_of_one_call(exported, capsys, load_once):
    _, _, path = exported
    common = [
        str(path),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "12",
        "--top-p",
        "0.9",
        "--temperature",
        "1.0",
        "--repetition-penalty",
        "1.2",
        "--seed",
        "11",
    ]
    assert generate_cli.main(common) == 0
    whole = capsys.readouterr().out

    class Chunks:
        def __init__(self):
            self.parts = []

        def write(self, text):
            self.parts.append(text)

        def flush(self):
            pass

    # The streamed words arrive one write at a time and make the same text.
    out = Chunks()
    loaded = tf.saved_model.load(str(path))
    args = argparse.Namespace(max_tokens=12, top_k=10, top_p=0.9, temperature=1.0, repetition_penalty=1.2)
    generate_cli.stream(loaded, PROMPT, args, 11, out=out)
    assert "".join(out.parts) == whole
    assert out.parts[0] == PROMPT and len(out.parts) == 1 + 12 + 1  # the prompt, 12 words, the newline
    assert generate_cli.main(common + ["--stream"]) == 0
    assert capsys.readouterr().out == whole
    with pytest.raises(SystemExit):
        generate_cli.main(common + ["--stream", "--num-samples", "2"])


def test_export_a_mirrored_model(exported, loaded):
    """`exported` is the export of a mirrored model: in this process too it
    generates what the plain model with the same weights does."""
    if mirrored_strategy() is None:
        pytest.skip("needs two logical CPU devices (tests/conftest.py sets them up)")
    out = loaded.generate(**greedy_inputs(10))
    assert out["text"].numpy()[0].decode() == greedy_text(exported[0], PROMPT, 10)
