"""Benchmarks: `python -m benchmarks.bench [--train] [--pipeline] [--sampler]
[--data PATH] [--quick] [--json PATH]` (with no benchmark named, all run).

The training benchmark runs each variant (float32 / bfloat16, XLA on / off,
1 / 2 replicas) of the default model at the example's global batch (128 x 80)
in a fresh process, so that its peak resident memory is its own, and prints
ms/step, tokens/s, the limit (the tokens/s at which every FLOP of the model
would run at the matmul peak measured in that process at that precision,
`tfgpt.runtime.flops`) and the share of it reached (= MFU), achieved GFLOP/s,
the peak itself, peak RSS, and the ratio to the Keras example's tokens/s on
the reference machine. The pipeline benchmark times the
vocabulary build and the tf.data pipeline alone.

The sampler benchmark times generation in this process on the default
model (random weights and a generated vocabulary are enough for timing) and
prints, for each way of decoding, the milliseconds per generated token at
batch 1 and the tokens per second at batch 32:

  cache       the key/value cache: `Sampler.generate`, what the export runs
  no cache    the whole model over each row's growing, then sliding,
              sequence, the Keras example's way (`uncached_generate`, a
              loop here over the model and `tfgpt.serving.sampling`)

Each setting is timed `repeats` times after a warm-up call and the fastest
run is kept: other work on the machine only ever adds time. The exported
SavedModel as a server loads it is timed by `benchmarks.serving_bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks import bench_data
from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.console import LOGGER, quiet, setup_logging
from tfgpt.data.corpus import read_corpus, split_lines
from tfgpt.data.text import PAD, UNK, Tokenizer, build_vocab, tokenize_lines, write_vocab
from tfgpt.data.windows import make_windows, train_dataset
from tfgpt.errors import run_main
from tfgpt.model.gpt import GPT
from tfgpt.runtime.devices import BFLOAT16_LEFT_OUT, compute_dtype, cpu_info, cpu_kernels, runnable_precisions
from tfgpt.runtime.distribute import make_strategy
from tfgpt.runtime.flops import flops_per_token, measure_matmul_peak
from tfgpt.runtime.memory import peak_rss_mb
from tfgpt.serving import decode, sampling
from tfgpt.serving.evaluate import heldout_protocol
from tfgpt.serving.sampler import Sampler
from tfgpt.train.trainer import Trainer

# A child of the "tfgpt" logger, whose handler `setup_logging` installs: a logger named after
# this module ("benchmarks.bench", or "__main__" under `python -m`) would be outside it, and
# its INFO lines, the sampler's table, would not be printed.
log = logging.getLogger(f"{LOGGER}.bench")

PROMPT = "this movie is"


def cpu_summary() -> str:
    """This machine's CPU: model name, cores and the instructions that decide
    its bfloat16 speed (the bfloat16 matmul peak measured 1,411 GFLOP/s on a
    2-core CPU with AMX, about 400 on one with AVX512-BF16 alone)."""

    name, flags = cpu_info()
    found = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(found) or 'no AVX-512'}, kernels {cpu_kernels()}"


def _default_model(precision: str, vocab_path: Path):
    """The example's model with random weights, and its vocabulary written to
    vocab_path."""

    config = GPTConfig()
    model = GPT(config, seed=0, compute_dtype=compute_dtype(precision))
    # Random weights would now and then sample the padding id, which ends a
    # row early; a very negative bias keeps every row going to max_tokens so
    # that each run generates the same number of tokens.
    model.head.b.assign(tf.tensor_scatter_nd_update(model.head.b, [[0]], [-1e9]))
    words = PROMPT.split()
    write_vocab([PAD, UNK] + words + [f"w{i}" for i in range(config.vocab_size - 2 - len(words))], vocab_path)
    return model


def _generate_args(
    batch: int,
    tokens: int,
    top_k: int = 10,
    top_p: float = 1.0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
) -> dict:
    """`generate`'s inputs: `batch` copies of PROMPT with the same settings
    and seeds 0, 1, ..."""

    def column(value, dtype):
        return tf.fill([batch], tf.constant(value, dtype))

    return dict(
        prompt=tf.constant([PROMPT] * batch),
        max_tokens=column(tokens, tf.int32),
        top_k=column(top_k, tf.int32),
        top_p=column(top_p, tf.float32),
        temperature=column(temperature, tf.float32),
        repetition_penalty=column(repetition_penalty, tf.float32),
        seed=tf.range(batch, dtype=tf.int64),
    )


def uncached_generate(model, top_k: int = 10):
    """Generation without a key/value cache, for comparison: at every step
    the whole model over each row's last min(n, L) tokens
    (`decode.window_hidden`), the token chosen as the sampler chooses it
    (`sampling.pick`, top-k with temperature 1, each row's random numbers
    from its seed). Rows do not end on the padding id.

    Returns a tf.function (context int32 [B, C], steps int32 [], seed int64
    [B]) -> the new ids int32 [B, steps].
    """
    if not 1 <= top_k <= sampling.CANDIDATES:
        raise ValueError(f"top_k must be in [1, {sampling.CANDIDATES}] (the fast way of choosing), got {top_k}")

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([None], tf.int64),
        ]
    )
    def generate(context, steps, seed):
        batch, c = tf.shape(context)[0], tf.shape(context)[1]
        ones = tf.ones([batch])
        plan = sampling.plan(tf.fill([batch], top_k), ones, ones, model.config.vocab_size)
        uniforms = sampling.row_uniforms(seed, steps)  # [B, steps]
        weights = decode.DecodeWeights(model)()
        history = tf.pad(context, [[0, 0], [0, steps]])  # [B, C + steps]
        column = tf.range(c + steps)[None, :]

        def step(i, history):
            n = c + i  # tokens so far
            hidden = decode.window_hidden(model, history, tf.fill([batch], n))  # [B, D]
            token = sampling.pick(decode.logits(hidden, weights), plan, uniforms[:, i : i + 1], general=False)
            return i + 1, tf.where(column == n, token[:, None], history)

        _, history = tf.while_loop(lambda i, history: i < steps, step, (tf.constant(0), history))
        return history[:, c:]

    return generate


MODES = ("cache", "no cache")


def sampler_bench(
    batches=(1, 32),
    tokens=(40, 200),
    modes=MODES,
    repeats: int = 10,
    precision: str = "float32",
) -> list[dict]:
    """Times generation from "this movie is" for every mode, batch size and
    number of new tokens, with top-k 10 and temperature 1 (no top-p, no
    penalty). 40 tokens stay within maxlen (80); 200 tokens slide.

    Each setting runs a warm-up call and then `repeats` timed calls in a row,
    and the fastest is kept. Returns one dict per setting: mode, precision,
    batch, tokens, seconds, ms_per_token (per row: seconds / tokens * 1000)
    and tokens_per_s (all rows: batch * tokens / seconds).
    """
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ValueError(f"unknown sampler mode(s) {unknown}; the modes are {list(MODES)}")
    with tempfile.TemporaryDirectory(prefix="tfgpt-bench-") as tmp:
        vocab_path = Path(tmp) / "vocab.txt"
        model = _default_model(precision, vocab_path)
        # The vocabulary is read here, when the sampler builds its tables.
        sampler = Sampler(model, vocab_path)
    uncached = uncached_generate(model)
    prompt_ids = sampler.tokenizer(tf.constant([PROMPT])).to_tensor()  # [1, C]

    def run(mode, args):
        """One request; returns the tokens generated per row."""
        if mode == "cache":
            return int(sampler.generate(**args)["lengths"].numpy().min())
        batch = int(args["seed"].shape[0])
        context = tf.repeat(prompt_ids, batch, axis=0)
        return int(uncached(context, args["max_tokens"][0], args["seed"]).numpy().shape[1])

    c = model.config
    log.info(
        f"sampler: default model (vocab {c.vocab_size}, maxlen {c.maxlen}, width {c.embed_dim}, "
        f"{c.num_layers} block), random weights, {precision}; prompt {PROMPT!r}, top-k 10; "
        f"best of {repeats}; load average {os.getloadavg()[0]:.2f}"
    )
    results = []
    log.info(f"{'mode':<10} {'batch':>5} {'tokens':>6} {'ms/token':>9} {'tokens/s':>9}")
    for mode, n, batch in [(mode, n, batch) for mode in modes for n in tokens for batch in batches]:
        args = _generate_args(batch, n)
        run(mode, args)  # traces the function and warms the caches
        # Back-to-back requests of one shape, as a server answering a stream
        # of them: the steady state, not the first request after other work.
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            made = run(mode, args)
            runs.append((time.perf_counter() - start, made))
        seconds, made = min(runs)
        row = dict(
            mode=mode,
            precision=precision,
            batch=batch,
            tokens=made,
            seconds=seconds,
            ms_per_token=1000 * seconds / made,
            tokens_per_s=batch * made / seconds,
        )
        results.append(row)
        log.info(f"{mode:<10} {batch:>5} {made:>6} {row['ms_per_token']:>9.3f} {row['tokens_per_s']:>9.0f}")
    return results


# --- training ---------------------------------------------------------------------

KERAS_EXAMPLE = dict(ms_per_step=2500.0, tokens_per_s=3960.0, peak_rss_mb=2200.0, vocab_s=5.3)
"""The Keras example on this project's reference machine (a 2-core AMD EPYC
with AVX-512 and AVX512-BF16, no AMX: about 212 GFLOP/s in float32 matrix
products and 400 in bfloat16; TensorFlow 2.21, Keras 3.15), global batch
128 x 80 tokens: the figures the speed goals are ratios of. On another CPU
the ratios are only indicative."""


def generated_corpus(reviews: int = 50_000, words: int = 30_000, seed: int = 0) -> list[str]:
    """Reviews of Zipf-distributed made-up words, about IMDB's size (230 words
    a review): for timing when no real text is given."""

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(words)] + [".", ",", "!"])
    ranks = np.minimum(rng.zipf(1.2, size=reviews * 230), len(vocab)) - 1
    lengths = rng.integers(40, 420, size=reviews)
    ends = np.cumsum(lengths)
    ends = ends[ends <= len(ranks)]
    return [" ".join(vocab[ranks[a:b]]) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]


def prepare_windows(data: str | None, maxlen: int, vocab_size: int, folder: Path, quick: bool = False) -> dict:
    """Reads (or generates) the corpus, times the vocabulary build and the
    tokenization, and saves the training windows to folder/windows.npy."""

    t0 = time.perf_counter()
    if data:
        lines = split_lines(read_corpus(data))
        source = data
    else:
        lines = generated_corpus(reviews=5_000 if quick else 50_000)
        source = "generated corpus"
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    words, counts = build_vocab(lines, vocab_size)
    vocab_s = time.perf_counter() - t0
    write_vocab(words, folder / "vocab.txt", counts)
    t0 = time.perf_counter()
    ids, lengths = tokenize_lines(Tokenizer(folder / "vocab.txt"), lines)
    windows = make_windows(ids, lengths, maxlen, "truncate")
    tokenize_s = time.perf_counter() - t0
    np.save(folder / "windows.npy", windows)
    return dict(
        source=source,
        lines=len(lines),
        tokens=int(len(ids)),
        windows=len(windows),
        read_s=read_s,
        vocab_s=vocab_s,
        tokenize_s=tokenize_s,
    )


def pipeline_bench(windows_path: Path, batch_size: int = 128, batches: int = 200) -> dict:
    """Tokens per second the tf.data pipeline delivers on its own."""

    windows = np.load(windows_path)
    ds = train_dataset(windows, batch_size, seed=0, epoch=0, packing="truncate").repeat()
    it = iter(ds)
    next(it)  # start-up: shuffle buffer fill, first batch
    count, t0 = 0, time.perf_counter()
    for _ in range(batches - 1):
        x, _, _ = next(it)
        count += int(x.shape[0] * x.shape[1])
    seconds = time.perf_counter() - t0
    return dict(batches=batches - 1, tokens_per_s=count / seconds)


def train_variant(
    precision: str,
    xla: bool,
    replicas: int,
    steps: int,
    windows_path: Path,
    warmup: int = 2,
    batch_size: int = 128,
    gpus: int | None = None,
    loss_chunk: int = 0,
    inter_op: int = 0,
) -> dict:
    """Times `steps` training steps of the default model after `warmup` ones,
    in this process (which must not have run any TensorFlow op yet), at the
    global batch `batch_size`. gpus None: `replicas` logical CPU devices (one
    device, the first GPU else the CPU, for 1); gpus N: N GPUs. loss_chunk:
    --loss-chunk (0: auto); inter_op: TensorFlow's inter-op threads (0: its
    default), for comparing settings."""

    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)

    with quiet("tfgpt.runtime.distribute"):  # a CPU variant on a machine with GPUs is no news here
        strategy = make_strategy(gpus=gpus, cpu_replicas=replicas if replicas > 1 and not gpus else None)

    windows = np.load(windows_path)
    model_cfg = GPTConfig()
    cfg = TrainConfig(
        batch_size=batch_size,
        epochs=1,
        max_steps=warmup + steps,
        xla="on" if xla else "off",
        precision=precision,
        loss_chunk=loss_chunk,
    )
    with tempfile.TemporaryDirectory(prefix="tfgpt-bench-") as tmp:
        trainer = Trainer(model_cfg, cfg, strategy, tmp)
        times = []

        class Hooks:
            def on_step(self, info):
                times.append(info["step_time"])

            def on_epoch(self, info):
                pass

        # The warm-up steps in a fit of their own: the trainer runs several
        # steps per compiled call (on GPUs) and reports each call's mean step
        # time, so a call holding the first step would carry its tracing and
        # compilation into the timed steps.
        trainer.cfg = dataclasses.replace(cfg, max_steps=warmup)
        t0 = time.perf_counter()
        trainer.fit(windows, None, Hooks())
        warmup_s = time.perf_counter() - t0
        trainer.cfg = dataclasses.replace(cfg, max_steps=warmup + steps)
        trainer.fit(windows, None, Hooks())
    step_s = float(np.median(times[warmup:]))
    tokens = cfg.batch_size * model_cfg.maxlen
    flops = flops_per_token(model_cfg) * tokens / step_s
    peak = measure_matmul_peak(compute_dtype(precision))
    return dict(
        precision=precision,
        xla=xla,
        replicas=replicas,
        gpus=gpus,
        batch_size=batch_size,
        steps=steps,
        ms_per_step=1000 * step_s,
        tokens_per_s=tokens / step_s,
        gflops=flops / 1e9,
        peak_gflops=peak / 1e9,
        mfu=flops / peak,
        limit_tokens_per_s=peak / flops_per_token(model_cfg),
        peak_rss_mb=peak_rss_mb(),
        first_step_s=times[0],
        warmup_s=warmup_s,
    )


def train_bench(variants, steps: int, windows_path: Path) -> list[dict]:
    """Runs each variant in a fresh process (so that peak memory is its own)."""
    rows = []
    log.info(
        f"{'precision':<9} {'xla':>3} {'repl':>4} {'ms/step':>8} {'tokens/s':>9} {'limit':>7} {'of limit':>8} "
        f"{'GFLOP/s':>8} {'peak':>6} {'RSS MB':>7} {'vs example':>10}"
    )
    for precision, xla, replicas in variants:
        spec = json.dumps(
            dict(
                precision=precision,
                xla=xla,
                replicas=replicas,
                steps=steps,
                windows=str(windows_path),
                batch_size=128,
                gpus=None,
            )
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench", "--variant", spec], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            log.info(
                f"{precision:<9} {'on' if xla else 'off':>3} {replicas:>4} failed: "
                f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            )
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["speedup_vs_example"] = row["tokens_per_s"] / KERAS_EXAMPLE["tokens_per_s"]
        rows.append(row)
        log.info(
            f"{precision:<9} {'on' if xla else 'off':>3} {replicas:>4} {row['ms_per_step']:>8.0f} "
            f"{row['tokens_per_s']:>9,.0f} {row['limit_tokens_per_s']:>7,.0f} {row['mfu']:>8.1%} "
            f"{row['gflops']:>8.1f} {row['peak_gflops']:>6.0f} {row['peak_rss_mb']:>7.0f} "
            f"{row['speedup_vs_example']:>9.2f}x"
        )
    return rows


VARIANTS = [(p, x, r) for p in ("float32", "bfloat16") for x in (False, True) for r in (1, 2)]


def heldout_bench(data: str, runs: list[str], json_path: str | None) -> int:
    """The held-out protocol (tfgpt.serving.evaluate.heldout_protocol), once per FLAGS string."""

    print(f"machine: {cpu_summary()}\nheld-out protocol: {data}", flush=True)
    rows = []
    for flags in runs:
        row = heldout_protocol(data, shlex.split(flags or ""))  # a UserError ends the command (`main`)
        rows.append(row)
        print(
            f"  loss {row['loss']:.4f}  perplexity {row['perplexity']:7.1f}  ({row['tokens']:,} tokens, "
            f"trained in {row['train_seconds']:.0f} s)  flags: {flags or '(defaults)'}",
            flush=True,
        )
    if json_path:
        Path(json_path).write_text(json.dumps({"heldout": rows}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    """The command; a `UserError` prints `bench: error: MESSAGE` and exits
    with its code (2)."""
    return run_main("bench", lambda: _main(argv))


def _main(argv) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Training, input-pipeline and sampler benchmarks of the "
        "default model. With no benchmark named, all run.",
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="time training steps: float32 and bfloat16, XLA on and off, 1 and 2 replicas, each in its own process",
    )
    parser.add_argument("--pipeline", action="store_true", help="time the vocabulary build and the tf.data pipeline")
    parser.add_argument("--sampler", action="store_true", help="time the in-graph sampler")
    parser.add_argument(
        "--data-scale",
        metavar="GB,GB",
        help="the data benchmark (benchmarks.bench_data): generate "
        "corpora of these sizes, prepare their token stores, train a few steps on each; "
        "not part of the default set",
    )
    parser.add_argument(
        "--tokenizer",
        choices=("word", "subword", "both"),
        default="word",
        help="with --data-scale: the stores' tokenizer, as train.py's --tokenizer; both: each in turn (default: word)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="with --data-scale: preparations per corpus and tokenizer (default: 1)"
    )
    parser.add_argument(
        "--heldout",
        action="append",
        nargs="?",
        const="",
        metavar="FLAGS",
        help="the held-out protocol on IMDB (--data: the archive or folder): train 196 steps on "
        "train/ with train.py FLAGS (as --heldout='FLAGS'; repeat for several runs), print the "
        "loss per token of 2,560 test/ reviews; not part of the default set",
    )
    parser.add_argument(
        "--data",
        help="real text for --train/--pipeline (any --data form of train.py); "
        "default: a generated corpus of IMDB's size",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed training steps per variant (default 5; 3 with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: float32 and bfloat16 without XLA on one replica, fewer steps and "
        "repeats, a smaller generated corpus, sampler at 40 tokens with and without the cache",
    )
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "both"),
        default=None,
        help="compute dtype of the sampler's model (default: both, float32 with --quick)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one training variant, in a child
    args = parser.parse_args(argv)
    if args.variant:
        spec = json.loads(args.variant)
        row = train_variant(
            spec["precision"],
            spec["xla"],
            spec["replicas"],
            spec["steps"],
            Path(spec["windows"]),
            warmup=spec.get("warmup", 2),
            batch_size=spec.get("batch_size", 128),
            gpus=spec.get("gpus"),
            loss_chunk=spec.get("loss_chunk", 0),
            inter_op=spec.get("inter_op", 0),
        )
        print(json.dumps(row))
        return 0
    if args.data_scale:
        return bench_data.main(
            ["--data-scale", args.data_scale, "--tokenizer", args.tokenizer, "--repeats", str(args.repeats)]
            + (["--data", args.data] if args.data else [])
            + (["--json", args.json] if args.json else [])
        )
    if args.heldout:
        return heldout_bench(args.data or "imdb", args.heldout, args.json)
    run_all = not (args.train or args.pipeline or args.sampler)
    report = {
        "machine": dict(cpu=cpu_summary(), cpus=os.cpu_count(), load_average=os.getloadavg()[0]),
        "keras_example": KERAS_EXAMPLE,
    }
    print(f"machine: {report['machine']['cpu']}", flush=True)

    precisions = runnable_precisions(("float32", "bfloat16"))
    if "bfloat16" not in precisions:
        print(BFLOAT16_LEFT_OUT, flush=True)
    with tempfile.TemporaryDirectory(prefix="tfgpt-bench-") as tmp:
        if args.train or args.pipeline or run_all:
            print(f"corpus: {args.data or 'generated'}", flush=True)
            prep = prepare_windows(args.data, 80, 20000, Path(tmp), quick=args.quick)
            print(
                f"  {prep['lines']:,} lines, {prep['tokens']:,} tokens; vocabulary built in {prep['vocab_s']:.2f} s "
                f"(example: {KERAS_EXAMPLE['vocab_s']} s); tokenized in {prep['tokenize_s']:.2f} s",
                flush=True,
            )
            report["data"] = prep
        if args.pipeline or run_all:
            pipe = pipeline_bench(Path(tmp) / "windows.npy", batches=50 if args.quick else 200)
            report["pipeline"] = pipe
            print(f"input pipeline: {pipe['tokens_per_s']:,.0f} tokens/s", flush=True)
        if args.train or run_all:
            steps = args.steps or (3 if args.quick else 5)
            variants = [v for v in VARIANTS if not v[1] and v[2] == 1] if args.quick else VARIANTS
            variants = [v for v in variants if v[0] in precisions]
            report["train"] = train_bench(variants, steps, Path(tmp) / "windows.npy")
            if report.get("pipeline") and report["train"]:
                fastest = max(r["tokens_per_s"] for r in report["train"])
                print(f"input pipeline / fastest step: {report['pipeline']['tokens_per_s'] / fastest:.0f}x")
    if args.sampler or run_all:
        precision = args.precision or ("float32" if args.quick else "both")
        report["sampler"] = []
        for p in precisions if precision == "both" else (precision,):
            if args.quick:
                report["sampler"] += sampler_bench(tokens=(40,), modes=("cache", "no cache"), repeats=2, precision=p)
            else:
                report["sampler"] += sampler_bench(precision=p)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
