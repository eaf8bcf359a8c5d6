"""Exports a model as a SavedModel for TensorFlow Serving: the version
directories, the warmup requests, and the server's configuration files.

    python -m tfgpt.export logs/<run> [--step N] [--version V] [--precision P]

Rebuilds the model from <run>/config.json, restores the latest checkpoint in
<run>/ckpt (or ckpt-N with --step N), and writes <run>/export/<version>/ with
the run's tokenizer as an asset: <run>/vocab.txt (word) or
<run>/subword.json (subword). Without --version the next
integer version is used, so a server watching <run>/export picks it up.
The exported model computes its matrix products in float32, whatever the
run trained in (as the export at the end of training does), unless
--precision says otherwise: float32 serves well on every CPU, where
bfloat16 is 2-4x slower without native bfloat16 (AVX2 CPUs); bfloat16 is
for servers that multiply it natively (AVX512-BF16, AMX, recent GPUs).
docs/serving.md has the figures.

What one export writes, under the model base path <base> (= <run>/export):

  <base>/<version>/saved_model.pb, variables/, assets/vocab.txt (or subword.json)
      the SavedModel (`tfgpt.serving.sampler.Sampler`'s three signatures)
  <base>/<version>/assets.extra/tf_serving_warmup_requests
      a TFRecord of PredictionLogs that TensorFlow Serving replays when it
      loads the version, before it serves it (`warmup_requests`)
  <base>/models.config, <base>/batching_parameters.txt
      the server's model configuration and batching parameters
      (`write_server_config`); the server ignores files that are not
      integer version directories in a base path. For a subword model
      models.config also says, in a comment, that its tokenizer is subword
      (the prompt's case and spacing are kept).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from tfgpt.config import TrainConfig, load_config
from tfgpt.console import setup_logging
from tfgpt.errors import UserError, run_main
from tfgpt.model.gpt import GPT
from tfgpt.runtime.devices import PRECISIONS, check_bfloat16_runs, compute_dtype
from tfgpt.serving import tokenizers
from tfgpt.serving.sampler import DEFAULTS, Sampler

# The command's name in its usage and error lines.
PROG = "export"

# The precision of an export unless asked otherwise (see the module's docstring).
SERVING_PRECISION = "float32"

# Named after the module also when it runs as `python -m tfgpt.serving.export` (__name__ is then
# "__main__", a logger outside "tfgpt").
log = logging.getLogger(__spec__.name if __spec__ else __name__)

# The model's name in the server's URLs (/v1/models/tfgpt:predict).
MODEL_NAME = "tfgpt"
# Where the README's docker command mounts the base path in the container.
SERVED_BASE_PATH = "/models/tfgpt"

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
# The larger batch of the warmup requests: the largest batch the server's
# batching forms (`BATCHING["max_batch_size"]`).
WARMUP_BATCH = 32
# Each usual warmup request is written this many times: the first calls of
# a freshly loaded model run slower than later ones (TensorFlow's thread
# pools, its allocator and oneDNN's kernel cache are still filling up).
WARMUP_REPEATS = 3
WARMUP_PROMPT = "this movie is"

# TensorFlow Serving's server-side batching (--enable_batching
# --batching_parameters_file). The values come from
# `python -m benchmarks.serving_bench --batching` on the reference 2-core CPU,
# which times requests of 1 to 64 rows (docs/serving.md has the figures):
# - max_batch_size: the batch past which generated tokens/s stopped rising
#   while each request's time kept growing with the batch.
# - batch_timeout_micros: how long a batch waits for more requests, a small
#   part of the time a lone 40-token request takes.
# - num_batch_threads 1: one batch at a time; TensorFlow's own threads
#   already spread one batch over both cores.
# - max_enqueued_batches: past this the server refuses at once
#   (UNAVAILABLE) instead of queueing requests for seconds.
# No allowed_batch_sizes: padding a batch to an allowed size would generate
# text for the padding rows.
BATCHING = {"max_batch_size": 32, "batch_timeout_micros": 2000, "num_batch_threads": 1, "max_enqueued_batches": 16}


# --- versions -----------------------------------------------------------------------


def next_version(export_base) -> int:
    """1 + the largest integer directory name under export_base (1 if none)."""
    base = Path(export_base)
    versions = (
        [int(p.name) for p in base.iterdir() if p.is_dir() and re.fullmatch(r"\d+", p.name)] if base.is_dir() else []
    )
    return max(versions, default=0) + 1


def in_precision(model, precision: str = SERVING_PRECISION):
    """The model computing in `precision`: itself when it already does, else
    a new GPT with its weights (float32 variables in every precision)."""

    dtype = compute_dtype(precision)
    if model.compute_dtype == dtype:
        return model
    twin = GPT(model.config, compute_dtype=dtype)
    for mine, theirs in zip(twin.variables, model.variables, strict=True):
        mine.assign(theirs)
    return twin


def export_model(model, vocab_path, export_base, version: int | None = None) -> Path:
    """Writes a SavedModel with the signatures serving_default, generate and
    score to export_base/<version>/, the layout TensorFlow Serving loads
    (an integer version directory under a model base path), with its warmup
    requests, and the server's configuration files beside the versions.

    model: a `tfgpt.model.gpt.GPT`. vocab_path: its tokenizer's file
    (vocab.txt or subword.json, `tfgpt.serving.tokenizers`), copied into the
    SavedModel's assets. version None takes the next integer. The
    version is written to a temporary directory first and renamed, so a
    server watching export_base never sees a half-written one. Returns the
    version directory.
    """

    base = Path(export_base)
    version = next_version(base) if version is None else int(version)
    if version < 1:
        raise ValueError(f"export version must be a positive integer, got {version}")
    target = base / str(version)
    if target.exists():
        raise FileExistsError(f"export version {target} already exists")
    base.mkdir(parents=True, exist_ok=True)
    partial = base / f".partial-{version}"
    shutil.rmtree(partial, ignore_errors=True)
    sampler = Sampler(model, vocab_path, frozen=True)
    tf.saved_model.save(sampler, str(partial), signatures=sampler.signatures())
    write_warmup(partial / WARMUP_FILE, warmup_requests(model.config.maxlen, model.config.vocab_size))
    write_server_config(base, tokenizer=tokenizers.kind_of(vocab_path))
    partial.rename(target)
    return target


# --- warmup ---------------------------------------------------------------------------


def warmup_requests(maxlen: int, vocab_size: int) -> list[tuple[str, dict, int]]:
    """(signature name, inputs as NumPy arrays, times to send it) for every
    signature at batch 1 and at WARMUP_BATCH, WARMUP_REPEATS times each;
    then, once and short, what the usual requests do not reach: a batch that
    mixes the settings so that every way of choosing a token runs (greedy,
    top-k, top-p, the whole vocabulary, a penalty: `tfgpt.serving.sampling.plan`),
    and a generation and a text to score that slide past maxlen (the loop's
    window path)."""

    def generate(prompts, top_k, top_p, temperature, penalty, max_tokens=DEFAULTS["max_tokens"]):
        n = len(prompts)

        def column(values, dtype):
            return np.resize(np.asarray(values, dtype), n)

        return {
            "prompt": strings(prompts),
            "max_tokens": column([max_tokens], np.int32),
            "top_k": column(top_k, np.int32),
            "top_p": column(top_p, np.float32),
            "temperature": column(temperature, np.float32),
            "repetition_penalty": column(penalty, np.float32),
            "seed": np.arange(n, dtype=np.int64),
        }

    def strings(texts):
        return np.array([t.encode() for t in texts], object)

    usual = {"top_k": [DEFAULTS["top_k"]], "top_p": [0.9], "temperature": [1.0], "penalty": [1.2]}
    long_text = " ".join([WARMUP_PROMPT] * (maxlen // 3 + 2))  # more than maxlen tokens
    requests = []
    for n in (1, WARMUP_BATCH):
        prompts = [WARMUP_PROMPT] * n
        requests += [
            ("serving_default", {"prompt": strings(prompts)}, WARMUP_REPEATS),
            ("generate", generate(prompts, **usual), WARMUP_REPEATS),
            ("score", {"text": strings(prompts)}, WARMUP_REPEATS),
        ]
    return requests + [
        (
            "generate",
            generate(
                [WARMUP_PROMPT] * 10,
                [DEFAULTS["top_k"], 1, vocab_size, vocab_size, 100],
                [0.9, 1.0, 1.0, 0.9, 0.95],
                [1.0, 0.0, 1.0, 0.8, 1.2],
                [1.2, 1.0, 1.0, 1.1, 1.0],
                max_tokens=4,
            ),
            1,
        ),
        ("generate", generate([long_text], **usual, max_tokens=4), 1),
        ("score", {"text": strings([WARMUP_PROMPT, long_text])}, 1),
    ]


def write_warmup(path, requests, model_name: str = MODEL_NAME):
    """Writes requests [(signature, inputs, times)] as TensorFlow Serving's
    warmup file: a TFRecord of PredictionLog protos, each holding a
    PredictRequest, every request written `times` times in a row (the server
    replays each record once)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs, times in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            ).SerializeToString()
            for _ in range(times):
                writer.write(record)


# --- the server's configuration -------------------------------------------------------


def models_config(model_name: str = MODEL_NAME, base_path: str = SERVED_BASE_PATH, tokenizer: str = "word") -> str:
    """TensorFlow Serving's --model_config_file: one model, its base path as
    the server sees it, serving the latest version only (a new version
    replaces the old one once it is loaded and warmed up). A subword
    model's file says so in a comment (a word model's is as it always was)."""
    subword = (
        f"# The model's tokenizer is subword (assets/{tokenizers.FILES['subword']} in each version): a prompt\n"
        "# keeps its case and spacing, and the text returned is the prompt followed by the completion.\n"
        if tokenizer == "subword"
        else ""
    )
    return (
        "# TensorFlow Serving model configuration (--model_config_file), written by tfgpt.export.\n"
        f"# base_path is where the server sees this directory: the README's docker command\n"
        f"# mounts it at {base_path}; for a server started otherwise, put this directory's path.\n"
        + subword
        + "model_config_list {\n"
        "  config {\n"
        f'    name: "{model_name}"\n'
        f'    base_path: "{base_path}"\n'
        '    model_platform: "tensorflow"\n'
        "    model_version_policy { latest { num_versions: 1 } }\n"
        "  }\n"
        "}\n"
    )


def batching_parameters(params: dict | None = None) -> str:
    """TensorFlow Serving's --batching_parameters_file (see BATCHING)."""
    params = params or BATCHING
    lines = [
        "# TensorFlow Serving batching (--enable_batching --batching_parameters_file), written by tfgpt.export;",
        "# how the values were chosen: docs/serving.md.",
    ]
    lines += [f"{name} {{ value: {value} }}" for name, value in params.items()]
    return "\n".join(lines) + "\n"


def write_server_config(base, model_name: str = MODEL_NAME, tokenizer: str = "word"):
    """Writes base/models.config and base/batching_parameters.txt, each
    replaced whole (written beside and renamed)."""
    base = Path(base)
    for name, text in (
        ("models.config", models_config(model_name, tokenizer=tokenizer)),
        ("batching_parameters.txt", batching_parameters()),
    ):
        partial = base / f".{name}.partial"
        partial.write_text(text)
        partial.replace(base / name)


# --- from a run directory -------------------------------------------------------------


class Restored(NamedTuple):
    """A run's model as `restore_model` rebuilds it (for an export, and for
    `tfgpt.serving.evaluate` of a run directory)."""

    model: GPT
    checkpoint: str  # the prefix restored: <run>/ckpt/ckpt-N
    vocab_path: Path  # the tokenizer's file: <run>/vocab.txt or <run>/subword.json


def find_checkpoint(run_dir: Path, step: int | None) -> str:
    """The checkpoint prefix to restore: <run>/ckpt/ckpt-<step>, or the latest."""

    ckpt_dir = Path(run_dir) / "ckpt"
    if step is not None:
        prefix = ckpt_dir / f"ckpt-{step}"
        if not Path(str(prefix) + ".index").exists():
            available = (
                sorted(
                    int(p.name[len("ckpt-") : -len(".index")])
                    for p in ckpt_dir.glob("ckpt-*.index")
                    if p.name[len("ckpt-") : -len(".index")].isdigit()
                )
                if ckpt_dir.is_dir()
                else []
            )
            raise UserError(
                f"no checkpoint for step {step} in {ckpt_dir} (available steps: "
                f"{', '.join(map(str, available)) or 'none'})"
            )
        return str(prefix)
    latest = tf.train.latest_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if latest is None:
        raise UserError(f"no checkpoint in {ckpt_dir}")
    return latest


def trained_precision(train_config: TrainConfig) -> str:
    """The precision the run's matrix products were computed in."""
    if train_config.compute_precision:
        return train_config.compute_precision
    return train_config.precision if train_config.precision != "auto" else "float32"


def restore_model(run_dir, step: int | None = None, precision: str | None = None) -> Restored:
    """The run's model with the weights of its checkpoint of `step` (None:
    the latest), computing its matrix products in `precision` ("float32",
    "bfloat16" or "float16"; None: the precision the run trained in). The
    variables are float32 in every precision."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: is {run_dir} a training run directory?")
    try:
        model_config, train_config = load_config(config_path)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from None
    vocab_path = run_dir / tokenizers.FILES.get(train_config.tokenizer, tokenizers.WORD_FILE)
    if not vocab_path.is_file():
        raise UserError(f"{vocab_path} is missing: is {run_dir} a training run directory?")
    checkpoint = find_checkpoint(run_dir, step)
    precision = precision or trained_precision(train_config)
    if precision == "bfloat16":
        check_bfloat16_runs()
    model = GPT(model_config, compute_dtype=compute_dtype(precision))
    try:
        status = tf.train.Checkpoint(model=model).read(checkpoint).expect_partial()
        status.assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot restore the model from {checkpoint}: {first}") from None
    return Restored(model, checkpoint, vocab_path)


def export_run(
    run_dir,
    step: int | None = None,
    version: int | None = None,
    precision: str | None = None,
    export_base=None,
) -> Path:
    """Restores a run's checkpoint into a fresh model and exports it.

    precision: "float32", "bfloat16" or "float16" matrix products in the exported model;
    None: SERVING_PRECISION. export_base: the model base
    path to write into (default <run>/export). Returns the version
    directory written."""
    run_dir = Path(run_dir)
    model, checkpoint, vocab_path = restore_model(run_dir, step, precision or SERVING_PRECISION)
    log.info(f"restored {checkpoint}; {model.compute_dtype.name} matrix products")
    try:
        return export_model(model, vocab_path, export_base or run_dir / "export", version)
    except FileExistsError as e:
        raise UserError(str(e)) from None


def main(argv=None) -> int:
    setup_logging()
    description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    parser.add_argument("run_dir", help="a training run directory, e.g. logs/<run>")
    parser.add_argument("--step", type=int, help="export the checkpoint of this global step (default: the latest)")
    parser.add_argument(
        "--version", type=int, help="the version directory to write (default: one more than the largest present)"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=f"matrix products of the exported model (default {SERVING_PRECISION}, fast on every CPU; bfloat16 for "
        "servers with native bfloat16: AVX512-BF16, AMX or a recent GPU)",
    )
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 1:
        parser.error("--version must be a positive integer")

    def run():
        path = export_run(args.run_dir, args.step, args.version, args.precision)
        print(f"exported SavedModel: {path}")

    return run_main(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
