"""Held-out loss and perplexity of a trained model over a corpus.

    python -m tfgpt.evaluate logs/RUN --data reviews.txt
    python -m tfgpt.evaluate logs/RUN/export/1 --data aclImdb/test --windows sliding

RUN_OR_EXPORT is a run directory (its latest checkpoint, or --step N) or an
exported SavedModel version (scored with TensorFlow alone, through its
`score` signature). The texts are the corpus's (any form `--data` of
train.py accepts) lines for a word model, its documents (files) for a
subword model, as each is trained (--texts chooses otherwise). The figure is
the mean cross-entropy per real token, in nats, over every token but the
first of each text, each predicted from the tokens before it:

  truncate  each text cut to its first maxlen + 1 tokens: the windows
            training reads in truncate mode (the Keras example's)
  sliding   every token of every text; a token past maxlen sees the maxlen
            tokens before it, as in generation

Texts with fewer than two tokens have nothing to predict and are skipped.
A subword text is cut at the last token boundary, at most maxlen + 1
tokens in, whose text gives those tokens again.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfgpt.console import setup_logging
from tfgpt.data.corpus import read_corpus, split_lines
from tfgpt.data.subword import SubwordVocab
from tfgpt.data.text import split_words
from tfgpt.errors import UserError, run_main
from tfgpt.serving import tokenizers
from tfgpt.serving.export import restore_model
from tfgpt.serving.sampler import Sampler

# The command's name in its usage and error lines.
PROG = "evaluate"


def cut_texts(lines: list[str], max_tokens: int | None, batch: int = 4096) -> list[str]:
    """The standardized words of each line (its first max_tokens, if given),
    joined by spaces; lines with fewer than two words are left out.
    Standardizing twice gives the same words, so the model reads these
    texts as it would read the lines."""

    out = []
    for i in range(0, len(lines), batch):
        words = split_words(tf.constant(lines[i : i + batch], tf.string))
        if max_tokens is not None:
            words = words[:, :max_tokens]
        joined = tf.strings.reduce_join(words, axis=1, separator=" ").numpy()
        counts = words.row_lengths().numpy()
        out += [t.decode("utf-8") for t, n in zip(joined, counts) if n >= 2]
    return out


def cut_subword_texts(texts: list[str], vocab: SubwordVocab, max_tokens: int | None) -> list[str]:
    """Each text cut to its first max_tokens subword tokens (all, if None),
    as text; texts of fewer than two tokens are left out. A cut inside a
    character or a merge would tokenize otherwise when scored, so the cut
    moves back to the last boundary whose text gives the same tokens."""

    out = []
    ids, lengths = vocab.encode_lines(texts)
    ends = np.cumsum(lengths)
    for text, end, n in zip(texts, ends, lengths):
        if n < 2:
            continue
        if max_tokens is None or n <= max_tokens:
            out.append(text)
            continue
        row = ids[end - n : end].tolist()
        for k in range(max_tokens, 1, -1):
            cut = vocab.decode(row[:k])
            if vocab.encode(cut) == row[:k]:
                out.append(cut)
                break
    return out


def subword_file(path: Path) -> Path | None:
    """The subword.json of a model (a run directory, or an export's assets);
    None for a word model."""
    for folder in (path, path / "assets"):
        found = tokenizers.file_in(folder)
        if found is not None:
            return found if tokenizers.kind_of(found) == "subword" else None
    return None


def load_scorer(path: Path, step: int | None = None):
    """(score function text [N] -> dict, maxlen or None) for a run directory or a SavedModel."""

    if (path / "saved_model.pb").exists():
        if step is not None:
            raise UserError("--step applies to a run directory, not to an exported SavedModel")
        loaded = tf.saved_model.load(str(path))
        if "score" not in loaded.signatures:
            raise UserError(f"{path} has no `score` signature; export it again with python -m tfgpt.export")
        config = path.parent.parent / "config.json"  # RUN/export/VERSION -> RUN/config.json
        maxlen = json.loads(config.read_text())["model"]["maxlen"] if config.exists() else None
        fn = loaded.signatures["score"]
        return (lambda text: fn(text=text)), maxlen
    if not (path / "config.json").exists():
        raise UserError(f"{path} is neither a run directory (no config.json) nor a SavedModel (no saved_model.pb)")

    model, _, vocab_path = restore_model(path, step)  # in the precision the run trained in
    sampler = Sampler(model, str(vocab_path))
    # The closure keeps the sampler alive (its tf.function holds it weakly).
    return (lambda text: sampler.score(text)), model.config.maxlen


def evaluate(score, texts: list[str], batch: int = 256) -> dict:
    """Sums the score function's log-probabilities over texts, `batch` at a time."""

    log_prob, tokens = 0.0, 0
    for i in range(0, len(texts), batch):
        out = score(tf.constant(texts[i : i + batch], tf.string))
        log_prob += float(np.sum(out["log_prob"].numpy(), dtype=np.float64))
        tokens += int(np.sum(out["num_tokens"].numpy()))
    loss = -log_prob / max(tokens, 1)
    return dict(loss=loss, perplexity=math.exp(min(loss, 80.0)), tokens=tokens, texts=len(texts))


# The held-out protocol on IMDB that tfgpt is compared with the Keras example
# by: vocabulary and training from the 25,000 train/ reviews only, 196 steps
# of global batch 128 (one epoch of the example), then the loss per real
# token of 2,560 test/ reviews, each cut to its first 81 tokens.
PROTOCOL_STEPS, PROTOCOL_TEST = 196, 2560


def imdb_protocol_files(source, folder: Path) -> tuple[Path, Path]:
    """Writes the protocol's training reviews (train/, one per line) and its
    test reviews (2,560 of test/, evenly spaced in name order: as many
    negative as positive) into folder; returns their paths."""

    docs = read_corpus(source)
    train = [d.text.replace("\n", " ") for d in docs if "/train/" in "/" + d.name]
    test = [d.text.replace("\n", " ") for d in docs if "/test/" in "/" + d.name]
    if not train or len(test) < PROTOCOL_TEST:
        raise UserError(
            f"--data {source}: the held-out protocol needs IMDB's train/ and test/ reviews "
            f"(found {len(train)} and {len(test)})"
        )
    picked = [test[i * len(test) // PROTOCOL_TEST] for i in range(PROTOCOL_TEST)]
    paths = folder / "train.txt", folder / "test.txt"
    for path, lines in zip(paths, (train, picked)):
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def heldout_protocol(source, flags: list[str] = (), steps: int = PROTOCOL_STEPS) -> dict:
    """Trains with train.py on the protocol's training reviews (plus `flags`)
    in a fresh process and returns its held-out figures (`evaluate`)."""

    with tempfile.TemporaryDirectory(prefix="tfgpt-heldout-") as tmp:
        train_txt, test_txt = imdb_protocol_files(source, Path(tmp))
        cmd = [
            sys.executable,
            "-m",
            "tfgpt.cli",
            "--data",
            str(train_txt),
            "--val-fraction",
            "0",
            "--max-steps",
            str(steps),
            "--logdir",
            tmp,
            "--run-name",
            "run",
            "--no-export",
            "--quiet",
            "--gen-tokens",
            "1",
            *flags,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"training failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        seconds = time.perf_counter() - t0
        score, maxlen = load_scorer(Path(tmp) / "run")
        lines = test_txt.read_text(encoding="utf-8").split("\n")  # lines as training splits them
        result = evaluate(score, cut_texts(lines, maxlen + 1))
    result.update(steps=steps, flags=list(flags), train_seconds=seconds)
    return result


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a run directory (logs/RUN) or an exported version (logs/RUN/export/1)")
    parser.add_argument(
        "--data",
        required=True,
        help="the corpus: a text file, a folder of .txt files, or an IMDB archive or folder (every line one text)",
    )
    parser.add_argument(
        "--windows",
        choices=("truncate", "sliding"),
        default="truncate",
        help="truncate: each text's first maxlen + 1 tokens (default); sliding: every token",
    )
    parser.add_argument(
        "--maxlen",
        type=int,
        help="the model's context length, for --windows truncate with a "
        "SavedModel outside its run directory (default: from the run's config.json)",
    )
    parser.add_argument(
        "--texts",
        choices=("lines", "documents"),
        help="what one text is: a line of the corpus, or a whole document (file) (default: lines for a word "
        "model, documents for a subword one, the units each is trained on)",
    )
    parser.add_argument("--step", type=int, help="a run directory's checkpoint of this step (default: the latest)")
    parser.add_argument("--limit", type=int, help="only the first N texts")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    return run_main(PROG, lambda: run(args))


def run(args) -> None:
    """Scores the corpus with the model; prints (and writes) the figures."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be positive, got {args.limit}")
    path = Path(args.model)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    docs = read_corpus(args.data)
    score, maxlen = load_scorer(path, args.step)
    maxlen = args.maxlen or maxlen
    if args.windows == "truncate" and maxlen is None:
        raise UserError(
            "--windows truncate needs the context length: pass --maxlen "
            "(no config.json two folders above the SavedModel)"
        )
    subword = subword_file(path)
    units = args.texts or ("documents" if subword else "lines")
    lines = [d.text for d in docs] if units == "documents" else split_lines(docs)
    max_tokens = maxlen + 1 if args.windows == "truncate" else None
    if subword:
        texts = cut_subword_texts(lines, SubwordVocab.load(subword), max_tokens)[: args.limit]
    else:
        texts = cut_texts(lines, max_tokens)[: args.limit]
    if not texts:
        raise UserError(f"--data {args.data}: no line has two tokens to score")
    result = evaluate(score, texts)
    result.update(model=str(path), data=args.data, windows=args.windows)
    print(
        f"{result['texts']:,} texts, {result['tokens']:,} tokens scored ({args.windows}): "
        f"loss {result['loss']:.4f} nats per token, perplexity {result['perplexity']:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
