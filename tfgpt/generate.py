"""Generates text from an exported SavedModel, with TensorFlow alone.

    python -m tfgpt.generate logs/<run>/export/1 --prompt "this movie is" \\
        --max-tokens 40 --top-k 10 --temperature 1.0 --seed 7 --num-samples 4

Every prompt (--prompt may be repeated) is continued --num-samples times in
one batch, through the model's `generate` signature. The same --seed gives
the same text; without it each run draws a new seed. --score prints each
prompt's log-probability and perplexity instead (the `score` signature).
This module imports nothing from tfgpt: the SavedModel carries the model,
the vocabulary and the sampling loop.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path


def _error_line(error) -> str:
    """The useful line of a TensorFlow error: the assertion's message if any
    ("assertion failed: [message] [value]" becomes "message value")."""
    text = getattr(error, "message", str(error))
    for line in text.splitlines():
        if "assertion failed:" in line:
            parts = line.split("assertion failed:", 1)[1].strip()
            return " ".join(p.strip("[] ") for p in parts.split("] ["))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfgpt.generate", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a SavedModel version directory, e.g. logs/<run>/export/1")
    parser.add_argument("--prompt", action="append", help="text to continue (repeatable; default 'this movie is')")
    parser.add_argument("--max-tokens", type=int, default=40, help="tokens to generate per sample (default 40)")
    parser.add_argument("--top-k", type=int, default=10, help="sample among the k most likely tokens (default 10)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the logits; 0 or less picks the most likely token (default 1.0)")
    parser.add_argument("--seed", type=int, help="random seed (default: a new one each run)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--score", action="store_true", help="score the prompts instead of continuing them")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be at least 1")
    if not (Path(args.model_dir) / "saved_model.pb").is_file():
        print(f"error: {args.model_dir} is not a SavedModel directory (no saved_model.pb)", file=sys.stderr)
        return 2
    prompts = args.prompt or ["this movie is"]
    seed = args.seed if args.seed is not None else random.randrange(2**62)

    import tensorflow as tf

    model = tf.saved_model.load(args.model_dir)
    try:
        if args.score:
            out = model.score(text=tf.constant(prompts))
            for text, lp, n, ppl in zip(prompts, out["log_prob"].numpy(), out["num_tokens"].numpy(),
                                        out["perplexity"].numpy()):
                print(f"log_prob {lp:.3f}  tokens {n}  perplexity {ppl:.2f}  {text}")
            return 0
        batch = [p for p in prompts for _ in range(args.num_samples)]
        out = model.generate(
            prompt=tf.constant(batch), max_tokens=tf.constant(args.max_tokens, tf.int32),
            top_k=tf.constant(args.top_k, tf.int32), temperature=tf.constant(args.temperature, tf.float32),
            seed=tf.constant([seed, 0], tf.int64))
    except tf.errors.InvalidArgumentError as e:
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return 2
    for i, text in enumerate(out["text"].numpy()):
        if len(batch) > 1:
            print(f"[{i + 1}] ", end="")
        print(text.decode("utf-8", errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
