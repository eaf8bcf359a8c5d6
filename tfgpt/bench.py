"""Benchmarks: `python -m tfgpt.bench [--sampler] [--quick] [--json PATH]`
(with no benchmark named, all of them run).

The sampler benchmark times `Sampler.generate` on the default model (random
weights and a generated vocabulary are enough for timing) and prints, for
each way of decoding, the milliseconds per generated token at batch 1 and the
tokens per second at batch 32:

  cache       the key/value cache (what is exported)
  cache+xla   the same with the one-token decode step compiled by XLA
  no cache    the whole model over each row's growing, then sliding, sequence

Each setting is timed `repeats` times after a warm-up call and the fastest
run is kept: other work on the machine only ever adds time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "this movie is"


def _default_model(precision: str, vocab_path: Path):
    """The example's model with random weights, and its vocabulary written to
    vocab_path."""
    import tensorflow as tf

    from tfgpt.config import GPTConfig
    from tfgpt.data import PAD, UNK, write_vocab
    from tfgpt.model import GPT

    config = GPTConfig()
    model = GPT(config, seed=0, compute_dtype=tf.bfloat16 if precision == "bfloat16" else tf.float32)
    # Random weights would now and then sample the padding id, which ends a
    # row early; a very negative bias keeps every row going to max_tokens so
    # that each run generates the same number of tokens.
    model.head.b.assign(tf.tensor_scatter_nd_update(model.head.b, [[0]], [-1e9]))
    words = PROMPT.split()
    write_vocab([PAD, UNK] + words + [f"w{i}" for i in range(config.vocab_size - 2 - len(words))], vocab_path)
    return model


def _generate_args(batch: int, tokens: int) -> dict:
    import tensorflow as tf

    return dict(prompt=tf.constant([PROMPT] * batch), max_tokens=tf.constant(tokens),
                top_k=tf.constant(10), temperature=tf.constant(1.0), seed=tf.constant([1, 2], tf.int64))


def sampler_bench(batches=(1, 32), tokens=(40, 200), modes=("cache", "cache+xla", "no cache"),
                  repeats: int = 5, precision: str = "float32", log=print) -> list[dict]:
    """Times generation from "this movie is" for every mode, batch size and
    number of new tokens. 40 tokens stay within maxlen (80); 200 tokens slide.

    The settings take turns, `repeats` rounds after a warm-up call each, and
    the fastest round of each is kept. Returns one dict per setting: mode,
    batch, tokens, seconds, ms_per_token (per row: seconds / tokens * 1000)
    and tokens_per_s (all rows: batch * tokens / seconds).
    """
    from tfgpt.sampler import Sampler

    with tempfile.TemporaryDirectory(prefix="tfgpt-bench-") as tmp:
        vocab_path = Path(tmp) / "vocab.txt"
        model = _default_model(precision, vocab_path)
        # The vocabulary is read here, when each sampler builds its tables.
        samplers = {
            "cache": lambda: Sampler(model, vocab_path),
            "cache+xla": lambda: Sampler(model, vocab_path, jit_compile=True),
            "no cache": lambda: Sampler(model, vocab_path, use_cache=False),
        }
        samplers = {mode: samplers[mode]() for mode in modes}
    c = model.config
    log(f"sampler: default model (vocab {c.vocab_size}, maxlen {c.maxlen}, width {c.embed_dim}, "
        f"{c.num_layers} block), random weights, {precision}; prompt {PROMPT!r}, top-k 10; "
        f"best of {repeats}; load average {os.getloadavg()[0]:.2f}")
    settings = [(mode, n, batch) for mode in modes for n in tokens for batch in batches]
    best = {}
    for setting in settings:  # traces each function once and warms the caches
        mode, n, batch = setting
        samplers[mode].generate(**_generate_args(batch, n))
    for _ in range(repeats):
        for setting in settings:
            mode, n, batch = setting
            args = _generate_args(batch, n)
            start = time.perf_counter()
            out = samplers[mode].generate(**args)
            made = int(out["lengths"].numpy().min())
            seconds = time.perf_counter() - start
            if setting not in best or seconds < best[setting][0]:
                best[setting] = (seconds, made)
    results = []
    log(f"{'mode':<10} {'batch':>5} {'tokens':>6} {'ms/token':>9} {'tokens/s':>9}")
    for setting in settings:
        (mode, _, batch), (seconds, made) = setting, best[setting]
        row = dict(mode=mode, batch=batch, tokens=made, seconds=seconds,
                   ms_per_token=1000 * seconds / made, tokens_per_s=batch * made / seconds)
        results.append(row)
        log(f"{mode:<10} {batch:>5} {made:>6} {row['ms_per_token']:>9.3f} {row['tokens_per_s']:>9.0f}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfgpt.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sampler", action="store_true", help="time the in-graph sampler")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, 40 new tokens only, cache and no cache only")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the model (default float32)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    run_all = not args.sampler  # no benchmark named: run every one
    report = {}
    if args.sampler or run_all:
        if args.quick:
            report["sampler"] = sampler_bench(tokens=(40,), modes=("cache", "no cache"), repeats=2,
                                              precision=args.precision)
        else:
            report["sampler"] = sampler_bench(precision=args.precision)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
