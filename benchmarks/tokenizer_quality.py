"""Word against subword tokens on IMDB: the same model trained on the same
number of tokens with each tokenizer, compared on held-out test reviews.

    python -m benchmarks.tokenizer_quality --data ../aclImdb.tar.gz [--steps 196] [--json PATH]

The protocol of docs/evaluation.md, once per tokenizer: train.py in a fresh
process on the 25,000 train/ reviews (the vocabulary, word or subword, of
--vocab-size entries learned from them), --steps steps of batch 128 x 80
tokens, each window a review's first 81 tokens (--packing truncate); then
2,560 test/ reviews, each cut to its first CHARS characters (at a space,
so that no word is cut), scored by the run's `score` function (every
token but a text's first, predicted from the tokens before it).

Per tokenizer it prints
  loss per token    nats per scored token: not comparable between the two,
                    since a token is a different amount of text
  loss per char     the same nats divided by the characters of the texts
                    scored: the measure both share. The word model reads
                    lowercased words with punctuation split off and every
                    rare word as [UNK], so its figure leaves out what the
                    subword model also has to predict (case, the spelling
                    of rare words, spacing); it flatters the word model.
  [UNK] rate        the share of the word model's tokens that are [UNK]
  tokens per text   how many tokens a text is
and a sample from each (PROMPT, 40 tokens, top-k 10, seed 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.console import LOGGER, setup_logging
from tfgpt.errors import UserError, run_main
from tfgpt.serving.evaluate import PROTOCOL_STEPS, imdb_protocol_files, load_scorer
from tfgpt.serving.export import restore_model
from tfgpt.serving.sampler import Sampler

log = logging.getLogger(f"{LOGGER}.tokenizer_quality")

CHARS = 250  # characters of each test review scored
PROMPT = "this movie is"


def cut_at_space(text: str, chars: int) -> str:
    """text's first `chars` characters, or fewer: up to its last space before them."""
    if len(text) <= chars:
        return text
    cut = text.rfind(" ", 0, chars + 1)
    return text[: cut if cut > 0 else chars]


def train(data: Path, folder: Path, name: str, tokenizer: str, steps: int, flags: list[str]) -> float:
    """train.py on data in a fresh process, truncate windows (each review's
    first 81 tokens, as the example); returns its seconds."""
    cmd = [sys.executable, "-m", "tfgpt.cli", "--data", str(data), "--val-fraction", "0"]
    cmd += ["--max-steps", str(steps), "--logdir", str(folder), "--run-name", name, "--tokenizer", tokenizer]
    cmd += ["--packing", "truncate", "--no-export", "--quiet", "--gen-tokens", "1", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"training ({tokenizer}) failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t0


def unk_rate(run: Path, texts: list[str]) -> float:
    """The share of a word model's tokens of texts that are [UNK] (id 1)."""
    _, _, vocab_path = restore_model(run)
    from tfgpt.data.text import Tokenizer

    ids = Tokenizer(str(vocab_path))(tf.constant(texts)).flat_values.numpy()
    return float(np.mean(ids == 1))


def figures(run: Path, texts: list[str]) -> dict:
    score, _ = load_scorer(run)
    log_prob, tokens, chars = 0.0, 0, 0
    for i in range(0, len(texts), 256):
        batch = texts[i : i + 256]
        out = score(tf.constant(batch))
        log_prob += float(np.sum(out["log_prob"].numpy(), dtype=np.float64))
        tokens += int(np.sum(out["num_tokens"].numpy()))
        chars += sum(len(t) for t in batch)
    model, _, vocab_path = restore_model(run)
    sampler = Sampler(model, str(vocab_path))
    sample = sampler.generate(
        prompt=tf.constant([PROMPT]),
        max_tokens=tf.constant([40]),
        top_k=tf.constant([10]),
        top_p=tf.constant([1.0]),
        temperature=tf.constant([1.0]),
        repetition_penalty=tf.constant([1.0]),
        seed=tf.constant([0], tf.int64),
    )["text"].numpy()[0]
    return dict(
        loss_per_token=-log_prob / tokens,
        loss_per_char=-log_prob / chars,
        tokens_per_text=(tokens + len(texts)) / len(texts),
        chars_per_text=chars / len(texts),
        sample=sample.decode("utf-8", errors="replace"),
    )


def main(argv=None) -> int:
    return run_main("tokenizer_quality", lambda: _main(argv))


def _main(argv) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m benchmarks.tokenizer_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="imdb", help="IMDB: the archive or its folder (default: imdb, as train.py)")
    p.add_argument("--steps", type=int, default=PROTOCOL_STEPS, help=f"training steps (default: {PROTOCOL_STEPS})")
    p.add_argument("--flags", default="", help="more train.py flags for both runs, as one string")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tfgpt-tokenizer-quality-") as tmp:
        train_txt, test_txt = imdb_protocol_files(args.data, Path(tmp))
        # A file per review: the units of both tokenizers (a word store's are
        # lines, a subword store's documents) are then the reviews.
        reviews = Path(tmp) / "train"
        reviews.mkdir()
        for i, line in enumerate(train_txt.read_text(encoding="utf-8").split("\n")):
            if line.strip():
                (reviews / f"{i:05d}.txt").write_text(line, encoding="utf-8")
        texts = [cut_at_space(t, CHARS) for t in test_txt.read_text(encoding="utf-8").split("\n") if t.strip()]
        for tokenizer in ("word", "subword"):
            seconds = train(reviews, Path(tmp), tokenizer, tokenizer, args.steps, args.flags.split())
            rows[tokenizer] = dict(figures(Path(tmp) / tokenizer, texts), train_seconds=seconds)
        rows["word"]["unk_rate"] = unk_rate(Path(tmp) / "word", texts)
    print(f"\n{len(texts)} test reviews, each its first {CHARS} characters at most; {args.steps} steps of training\n")
    print("| tokenizer | loss per token | loss per char | tokens per text | [UNK] rate | trained in |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        unk = f"{r['unk_rate']:.2%}" if "unk_rate" in r else "none"
        print(
            f"| {name} | {r['loss_per_token']:.3f} | {r['loss_per_char']:.3f} | {r['tokens_per_text']:.1f} | {unk} "
            f"| {r['train_seconds']:.0f} s |"
        )
    print()
    for name, r in rows.items():
        print(f"{name}: {r['sample']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
