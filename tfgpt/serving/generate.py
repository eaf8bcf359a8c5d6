"""Generates text from an exported SavedModel, with TensorFlow alone.

    python -m tfgpt.generate logs/<run>/export/1 --prompt "this movie is" \\
        --max-tokens 40 --top-k 10 --top-p 0.9 --temperature 1.0 \\
        --repetition-penalty 1.2 --seed 7 --num-samples 4
    python -m tfgpt.generate logs/<run>/export/1 --prompt "this movie is" --stream

Every prompt (--prompt may be repeated) is continued --num-samples times in
one batch, through the model's `generate` signature, every row with the same
settings; row i gets the seed --seed + i, so the same --seed gives the same
text; without it each run draws a new seed. --stream prints the tokens of
one prompt as they come. --score prints each prompt's log-probability and
perplexity instead (the `score` signature). Of tfgpt this module uses
only its error reporting (tfgpt.errors): the SavedModel carries the model,
the tokenizer and the sampling loop. A model with the word tokenizer
returns the standardized prompt and the words joined by spaces; one with
the subword tokenizer (assets/subword.json) the prompt as given, then the
completion's text.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import tensorflow as tf

from tfgpt.errors import UserError, run_main

# The command's name in its usage and error lines.
PROG = "generate"

# The asset of a SavedModel whose tokenizer is subword (tfgpt.data.subword.SUBWORD_FILE).
SUBWORD_ASSET = Path("assets") / "subword.json"


def _error_line(error) -> str:
    """The useful line of a TensorFlow error: the assertion's message if any
    ("assertion failed: [message]" becomes "message")."""
    text = getattr(error, "message", str(error))
    for line in text.splitlines():
        if "assertion failed:" in line:
            parts = line.split("assertion failed:", 1)[1].strip()
            return " ".join(p.strip("[] ") for p in parts.split("] ["))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _inputs(tf, prompts, args, seed) -> dict:
    """`generate`'s inputs: one row per prompt, the same settings in each,
    seeds seed, seed + 1, ..."""
    n = len(prompts)

    def column(value, dtype):
        return tf.fill([n], tf.constant(value, dtype))

    return dict(
        prompt=tf.constant(prompts),
        max_tokens=column(args.max_tokens, tf.int32),
        top_k=column(args.top_k, tf.int32),
        top_p=column(args.top_p, tf.float32),
        temperature=column(args.temperature, tf.float32),
        repetition_penalty=column(args.repetition_penalty, tf.float32),
        seed=tf.range(seed, seed + n, dtype=tf.int64),
    )


def stream(model, prompt: str, args, seed: int, out=None, exact: bool = False):
    """Prints the continuation of one prompt token by token.

    The exported loop runs inside one graph call and returns at its end, so
    each next token comes from a call for one more token than the last:
    with the same seed a row's first tokens do not depend on how many are
    asked for (its random numbers are a function of the seed and the step),
    so the printed text is the text of one call for all of them. Each call
    runs the loop from the start: printing m tokens costs about m / 2 calls
    of m tokens.

    exact (a subword model): the text is the tokens' bytes, not words
    joined by spaces, so each call's text extends the one printed; a
    character whose bytes are not all generated yet (U+FFFD at the end) is
    printed once it is whole, or at the end."""

    out = out or sys.stdout
    printed = 0
    if not 0 <= args.max_tokens <= 1024:
        # Refused by the model (its limit is 1024): fail before printing.
        model.generate(**_inputs(tf, [prompt], args, seed))
    if exact:
        _stream_text(model, prompt, args, seed, out)
        return
    first = model.generate(**_inputs(tf, [prompt], _with(args, max_tokens=0), seed))
    out.write(first["text"].numpy()[0].decode("utf-8", errors="replace"))
    out.flush()
    for asked in range(1, args.max_tokens + 1):
        result = model.generate(**_inputs(tf, [prompt], _with(args, max_tokens=asked), seed))
        words = result["completion"].numpy()[0].decode("utf-8", errors="replace").split(" ")
        length = int(result["lengths"].numpy()[0])
        for word in words[printed:length]:
            out.write(" " + word)
        out.flush()
        printed = max(printed, length)
        if length < asked:  # the row ended (it sampled the end of a review)
            break
    out.write("\n")


def _stream_text(model, prompt: str, args, seed: int, out) -> None:
    """`stream` for a subword model: prints what each call's text adds."""
    shown = ""
    text = ""
    for asked in range(0, args.max_tokens + 1):
        result = model.generate(**_inputs(tf, [prompt], _with(args, max_tokens=asked), seed))
        text = result["text"].numpy()[0].decode("utf-8", errors="replace")
        whole = text.rstrip("\ufffd")  # a character cut in its bytes may still change
        if whole.startswith(shown) and len(whole) > len(shown):
            out.write(whole[len(shown) :])
            out.flush()
            shown = whole
        if asked and int(result["lengths"].numpy()[0]) < asked:  # the row ended
            break
    out.write(text[len(shown) :] + "\n")
    out.flush()


def _with(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a SavedModel version directory, e.g. logs/<run>/export/1")
    parser.add_argument("--prompt", action="append", help="text to continue (repeatable; default 'this movie is')")
    parser.add_argument("--max-tokens", type=int, default=40, help="tokens to generate per sample (default 40)")
    parser.add_argument(
        "--top-k",
        type=int,
        default=10,
        help="sample among the k most likely tokens; the vocabulary size or more: all (default 10)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus: among those, the fewest most likely tokens whose probability reaches p (default 1.0: off)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="divides the logits; 0 or less picks the most likely token (default 1.0)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divides the positive logits, and multiplies the negative ones, of the tokens "
        "already in the text (CTRL); above 1 discourages repeats (default 1.0: off)",
    )
    parser.add_argument(
        "--seed", type=int, help="random seed of the first sample; sample i uses seed + i (default: a new one each run)"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--stream", action="store_true", help="print the tokens of one prompt as they come")
    parser.add_argument("--score", action="store_true", help="score the prompts instead of continuing them")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be at least 1")
    prompts = args.prompt or ["this movie is"]
    if args.stream and (len(prompts) > 1 or args.num_samples > 1 or args.score):
        parser.error("--stream prints one sample of one prompt (no --num-samples, --score or second --prompt)")
    return run_main(PROG, lambda: run(args, prompts))


def run(args, prompts: list[str]) -> None:
    """Loads the SavedModel and prints what the flags ask for."""
    if not (Path(args.model_dir) / "saved_model.pb").is_file():
        raise UserError(f"{args.model_dir} is not a SavedModel directory (no saved_model.pb)")
    seed = args.seed if args.seed is not None else random.randrange(2**62)

    model = tf.saved_model.load(args.model_dir)
    try:
        if args.score:
            out = model.score(text=tf.constant(prompts))
            for text, lp, n, ppl in zip(
                prompts, out["log_prob"].numpy(), out["num_tokens"].numpy(), out["perplexity"].numpy()
            ):
                print(f"log_prob {lp:.3f}  tokens {n}  perplexity {ppl:.2f}  {text}")
            return
        if args.stream:
            stream(model, prompts[0], args, seed, exact=(Path(args.model_dir) / SUBWORD_ASSET).is_file())
            return
        batch = [p for p in prompts for _ in range(args.num_samples)]
        out = model.generate(**_inputs(tf, batch, args, seed))
    except tf.errors.InvalidArgumentError as e:
        raise UserError(_error_line(e)) from None
    for i, text in enumerate(out["text"].numpy()):
        if len(batch) > 1:
            print(f"[{i + 1}] ", end="")
        print(text.decode("utf-8", errors="replace"))


if __name__ == "__main__":
    sys.exit(main())
