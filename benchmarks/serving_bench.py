"""The generation benchmark of the exported SavedModel, loaded the way a
server loads it.

    python -m benchmarks.serving_bench [--run logs/<run>] [--precision both] [--repeats 10]
                                  [--loads 3] [--batching] [--json PATH]

For each precision (bfloat16 and float32 by default) the default model is
exported (from the latest checkpoint of --run, else with random weights) to
a temporary base path, and `loads` fresh processes, one after another, that
import TensorFlow and the serving protos only, not tfgpt, each:

  1. load the SavedModel and replay its warmup records
     (assets.extra/tf_serving_warmup_requests) through their signatures,
     as TensorFlow Serving does before it serves a version;
  2. time the first request after that, at batch 1 and at batch 32, then
     `repeats` more of each, back to back: the steady state, reported as
     the fastest (other work on a shared machine only ever adds time) and
     the median.
The first process also
  3. times the first request whose prompt has another length than the
     warmup's (a new shape for the prefill);
  4. sends one request of 64 rows with 64 different settings and compares
     each row with the same row sent alone;
  5. with --batching, times batches of 1 to 64 rows (the figures behind
     `tfgpt.serving.export.BATCHING`).

Whether the first request pays for something the later ones do not is told
by first / median of the later requests of the same process, in each of the
loads: one request's time varies by tens of percent on a shared machine,
so one process, or a comparison with the fastest of ten, cannot tell.

The requests: PROMPT, 40 new tokens, top-k 10, top-p 0.9, temperature 1,
repetition penalty 1.2, seeds 0, 1, ... A trained model may end a row
early (it samples the end of a review): ms per token and tokens/s count the
tokens generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import _default_model
from tfgpt.console import LOGGER, quiet, setup_logging
from tfgpt.data.subword import SUBWORD_FILE
from tfgpt.errors import run_main
from tfgpt.runtime.devices import (
    BFLOAT16_LEFT_OUT,
    check_bfloat16_runs,
    cpu_info,
    cpu_kernels,
    rows_batch_invariant,
    runnable_precisions,
)
from tfgpt.serving.export import export_model, export_run

# A child of the "tfgpt" logger, which setup_logging prints and quiet("tfgpt") silences.
log = logging.getLogger(f"{LOGGER}.serving_bench")

# The command's name in its usage and error lines.
PROG = "serving_bench"

PROMPT = "this movie is"
OTHER_PROMPT = "the acting was good but the story was not"  # another length than the warmup's
SETTINGS = {"max_tokens": 40, "top_k": 10, "top_p": 0.9, "temperature": 1.0, "repetition_penalty": 1.2}

# The child: TensorFlow and the serving protos, nothing of tfgpt.
CHILD = r"""
import json, sys, time
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

path, spec = sys.argv[1], json.loads(sys.argv[2])
settings, repeats = spec["settings"], spec["repeats"]
report = {}
start = time.perf_counter()
model = tf.saved_model.load(path)
report["load_s"] = time.perf_counter() - start
start, records = time.perf_counter(), 0
for record in tf.data.TFRecordDataset(path + "/assets.extra/tf_serving_warmup_requests"):
    request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
    inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    model.signatures[request.model_spec.signature_name](**inputs)
    records += 1
report["warmup_s"], report["warmup_records"] = time.perf_counter() - start, records
generate = model.signatures["generate"]


def inputs(prompts, settings, seeds=None):
    n = len(prompts)

    def column(name, dtype):
        value = settings[name]
        return tf.constant(value if isinstance(value, list) else [value] * n, dtype)

    return dict(prompt=tf.constant(prompts), max_tokens=column("max_tokens", tf.int32),
                top_k=column("top_k", tf.int32), top_p=column("top_p", tf.float32),
                temperature=column("temperature", tf.float32),
                repetition_penalty=column("repetition_penalty", tf.float32),
                seed=tf.constant(list(range(n)) if seeds is None else seeds, tf.int64))


def timed(args):
    start = time.perf_counter()
    out = generate(**args)
    made = int(out["lengths"].numpy().sum())
    return time.perf_counter() - start, made


def figures(seconds, made, batch):
    return {"seconds": seconds, "tokens": made, "ms_per_token": 1000 * seconds / max(made / batch, 1e-9),
            "tokens_per_s": made / seconds}


for batch in spec["batches"]:
    args = inputs([spec["prompt"]] * batch, settings)
    first = timed(args)
    runs = [timed(args) for _ in range(repeats)]
    per_token = sorted(runs, key=lambda r: r[0] / max(r[1], 1))
    report[f"batch{batch}"] = {"first": figures(*first, batch), "steady": figures(*per_token[0], batch),
                               "median": figures(*per_token[len(runs) // 2], batch),
                               "runs_s": [first[0]] + [r[0] for r in runs]}
report["tfgpt_modules"] = sorted(m for m in sys.modules if m == "tfgpt" or m.startswith("tfgpt."))
if not spec["checks"]:
    print("RESULT " + json.dumps(report))
    sys.exit(0)
other = timed(inputs([spec["other_prompt"]], settings))
report["other_prompt_first"] = figures(*other, 1)

# 64 rows, 64 settings, in one request; then each row alone.
rng = np.random.default_rng(0)
words = spec["prompt"].split() + spec["other_prompt"].split()
prompts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(64)]
mixed = {"max_tokens": rng.integers(0, 41, 64).tolist(),
         "top_k": rng.choice([1, 5, 10, 40, 64, 100, 2**31 - 1], 64).tolist(),
         "top_p": rng.choice([1.0, 0.95, 0.9, 0.5], 64).tolist(),
         "temperature": rng.choice([0.0, 0.7, 1.0, 1.3], 64).tolist(),
         "repetition_penalty": rng.choice([1.0, 1.2, 1.5], 64).tolist()}
seeds = rng.integers(0, 2**62, 64).tolist()
start = time.perf_counter()
batch = generate(**inputs(prompts, mixed, seeds))
report["mixed_s"] = time.perf_counter() - start
equal = 0
for i in range(64):
    alone = generate(**inputs([prompts[i]], {k: [v[i]] for k, v in mixed.items()}, [seeds[i]]))
    n = int(alone["lengths"].numpy()[0])
    equal += int(batch["lengths"].numpy()[i] == n and
                 batch["token_ids"].numpy()[i, :n].tolist() == alone["token_ids"].numpy()[0, :n].tolist() and
                 batch["text"].numpy()[i] == alone["text"].numpy()[0])
report["mixed_equal"] = equal

if spec["batching"]:
    report["batching"] = {}
    for size in (1, 2, 4, 8, 16, 32, 64):
        args = inputs([spec["prompt"]] * size, settings)
        timed(args)
        runs = [timed(args) for _ in range(max(2, repeats // 2))]
        report["batching"][size] = figures(*min(runs, key=lambda r: r[0] / max(r[1], 1)), size)
print("RESULT " + json.dumps(report))
"""


def export_for_bench(precision: str, base: Path, run: str | None, tokenizer: str = "word") -> tuple[Path, str]:
    """(version directory, what was exported): the run's latest checkpoint,
    or the default model with random weights and a vocabulary of its size:
    the word one, or a subword one learned from generated reviews
    (`subword_vocab_for_bench`)."""

    if run:
        with quiet("tfgpt.serving.export"):  # the table names the checkpoint's run
            return export_run(run, precision=precision, export_base=base), f"{run}, latest checkpoint"

    base.parent.mkdir(parents=True, exist_ok=True)
    vocab = base.parent / f"vocab-{precision}.txt"
    model = _default_model(precision, vocab)
    if tokenizer == "subword":
        vocab = base.parent / SUBWORD_FILE
        subword_vocab_for_bench(model.config.vocab_size).save(vocab)
    return export_model(model, vocab, base), "random weights"


def subword_vocab_for_bench(size: int):
    """A subword vocabulary of `size` entries learned from generated reviews
    (`benchmarks.bench_data.generate`, enough distinct words for 20,000)."""
    from benchmarks.bench_data import generate
    from tfgpt.data.subword import train_subword

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        generate(path, 8 << 20, seed=1)
        vocab = train_subword(path.read_text(encoding="utf-8").split("\n"), size)
    if vocab.size != size:
        raise RuntimeError(f"the generated text gave {vocab.size} subword entries, not {size}")
    return vocab


def measure(path: Path, repeats: int, batching: bool = False, checks: bool = True) -> dict:
    """Runs CHILD on an export and returns its report; checks: also the
    other prompt's first request, the 64 rows and, with batching, the batch
    sizes (steps 3-5 of the module's list)."""
    spec = {
        "settings": SETTINGS,
        "repeats": repeats,
        "batches": [1, 32],
        "prompt": PROMPT,
        "other_prompt": OTHER_PROMPT,
        "batching": batching,
        "checks": checks,
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"the serving benchmark's process failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def first_over_median(batch_report: dict) -> float:
    """The first request's time per token over the median of the later
    requests' (> 1: the first was slower)."""
    first, *later = batch_report["runs_s"]
    # runs_s are whole requests of the same prompt, settings and seeds, so
    # each makes the same tokens: a ratio of times is one of ms/token.
    return first / statistics.median(later)


def serving_bench(
    precisions=("bfloat16", "float32"),
    run: str | None = None,
    repeats: int = 10,
    batching: bool = False,
    loads: int = 3,
    tokenizers=("word",),
) -> list[dict]:
    """Exports each precision (and, for random weights, each tokenizer) and
    measures the exports in `loads` rounds of fresh processes, each round
    every export once (so that a change in the machine's speed falls on all
    of them alike); prints the table. Returns one report per export and load
    (`measure`'s, plus precision, tokenizer, load (1, 2, ...) and source)."""
    rows = []
    tokenizers = tokenizers if not run else ("word",)
    with tempfile.TemporaryDirectory(prefix="tfgpt-serving-bench-") as tmp:
        exports = []
        for precision in precisions:
            for tok in tokenizers:
                base = Path(tmp) / f"{precision}-{tok}" / "export"
                exports.append((precision, tok, *export_for_bench(precision, base, run, tok)))
        for load in range(1, loads + 1):
            for precision, tok, path, source in exports:
                report = measure(path, repeats, batching, checks=load == 1)
                name = precision if tokenizers == ("word",) else f"{precision}, {tok}"
                rows.append(dict(report, precision=precision, tokenizer=tok, name=name, load=load, source=source))
        rows.sort(key=lambda r: [e[:2] for e in exports].index((r["precision"], r["tokenizer"])))
    s = SETTINGS
    log.info(
        f"cpu: {cpu_info()[0]}, {os.cpu_count()} cores, kernels {cpu_kernels()}; rows bit-equal alone and batched: "
        + ", ".join(f"{p} {'yes' if rows_batch_invariant(p) else 'no'}" for p in precisions)
        + " (docs/serving.md)"
    )
    log.info(
        f"generation: the exported SavedModel ({rows[0]['source']}) loaded by TensorFlow alone after its "
        f"{rows[0]['warmup_records']} warmup records, {loads} load(s) per export; prompt {PROMPT!r}, "
        f"{s['max_tokens']} tokens, top-k {s['top_k']}, top-p {s['top_p']}, temperature {s['temperature']}, "
        f"repetition penalty {s['repetition_penalty']}; steady = best (median) of the {repeats} requests after the "
        f"first; load average {os.getloadavg()[0]:.2f}"
    )
    log.info("")
    log.info(
        "| export | load | load + warmup | batch 1: first request | batch 1: steady, best (median) "
        "| batch 32: first request | batch 32: steady, best (median) | first / median (batch 1, 32) "
        "| first / best (batch 1, 32) |"
    )
    log.info("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one, big = r["batch1"], r["batch32"]
        log.info(
            f"| {r['name']} | {r['load']} | {r['load_s']:.1f} + {r['warmup_s']:.1f} s "
            f"| {one['first']['ms_per_token']:.3f} ms/token "
            f"| {one['steady']['ms_per_token']:.3f} ({one['median']['ms_per_token']:.3f}) ms/token "
            f"| {big['first']['tokens_per_s']:,.0f} tokens/s "
            f"| {big['steady']['tokens_per_s']:,.0f} ({big['median']['tokens_per_s']:,.0f}) tokens/s "
            f"| {first_over_median(one):.2f}, {first_over_median(big):.2f} "
            f"| {one['first']['ms_per_token'] / one['steady']['ms_per_token']:.2f}, "
            f"{big['steady']['tokens_per_s'] / big['first']['tokens_per_s']:.2f} |"
        )
    log.info("")
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        ratios = {b: sorted(first_over_median(r[f"batch{b}"]) for r in mine) for b in (1, 32)}
        checked = mine[0]
        log.info(
            f"{name}: first / median over the loads, batch 1: "
            + ", ".join(f"{x:.2f}" for x in ratios[1])
            + "; batch 32: "
            + ", ".join(f"{x:.2f}" for x in ratios[32])
            + f". First request with another prompt length: {checked['other_prompt_first']['ms_per_token']:.3f} "
            f"ms/token. 64 rows, 64 settings: {checked['mixed_equal']}/64 rows equal alone."
        )
    if batching:
        for r in rows:
            if "batching" not in r:
                continue
            log.info("")
            log.info(f"batching, {r['name']}: rows per request -> tokens/s (ms per request)")
            log.info(
                "  "
                + ", ".join(
                    f"{size}: {f['tokens_per_s']:,.0f} ({1000 * f['seconds']:.0f} ms)"
                    for size, f in r["batching"].items()
                )
            )
    return rows


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "--run",
        help="a training run directory: export its latest checkpoint (default: the default model with random weights)",
    )
    parser.add_argument("--precision", choices=("bfloat16", "float32", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=10, help="timed requests per batch size (default 10)")
    parser.add_argument(
        "--loads",
        type=int,
        default=3,
        help="fresh processes that load each export, one after another: the first request's figure is one per load "
        "(default 3)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=("word", "subword", "both"),
        default="word",
        help="the random-weight model's tokenizer; both: a word and a subword export of each precision, measured "
        "in alternation (default: word)",
    )
    parser.add_argument("--batching", action="store_true", help="also time batches of 1 to 64 rows")
    parser.add_argument("--json", metavar="PATH", help="also write the reports as JSON to PATH")
    args = parser.parse_args(argv)
    if args.loads < 1 or args.repeats < 1:
        parser.error("--loads and --repeats must be at least 1")
    return run_main(PROG, lambda: run(args))


def run(args) -> None:
    """The benchmark of the precisions asked for that run here."""
    precisions = ("bfloat16", "float32") if args.precision == "both" else (args.precision,)
    if args.precision == "bfloat16":
        check_bfloat16_runs()
    if "bfloat16" in precisions and "bfloat16" not in runnable_precisions(precisions):
        log.info(BFLOAT16_LEFT_OUT)
        precisions = runnable_precisions(precisions)
    tokenizers = ("word", "subword") if args.tokenizer == "both" else (args.tokenizer,)
    rows = serving_bench(precisions, args.run, args.repeats, args.batching, args.loads, tokenizers)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
