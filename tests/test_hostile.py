"""The exported SavedModel under hostile input, in a separate process that
imports only TensorFlow: it never dies, and every refusal is an
InvalidArgumentError whose message names the input and the row."""

import json
import subprocess
import sys
import textwrap

import pytest

from tfgpt.config import GPTConfig
from tfgpt.data.text import PAD, UNK, write_vocab
from tfgpt.model.gpt import GPT
from tfgpt.serving.export import export_model

CLIENT = textwrap.dedent(r"""
    import json, random, sys
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    gen = model.signatures["generate"]

    def call(name, fn, **kw):
        try:
            out = fn(**kw)
            shapes = {k: list(v.shape) for k, v in out.items()}
            return {"case": name, "ok": True, "shapes": shapes}
        except tf.errors.InvalidArgumentError as e:
            return {"case": name, "ok": False, "error": "InvalidArgumentError", "message": e.message[:300]}
        except Exception as e:  # anything else is a failure of the test
            return {"case": name, "ok": False, "error": type(e).__name__, "message": str(e)[:300]}

    def args(prompts, max_tokens=5, top_k=3, temperature=1.0, top_p=0.9, penalty=1.2, seed=1, rows=None):
        n = len(prompts) if rows is None else rows

        def column(value, dtype):
            return tf.constant(value if isinstance(value, list) else [value] * n, dtype)

        return dict(prompt=tf.constant(prompts, tf.string), max_tokens=column(max_tokens, tf.int32),
                    top_k=column(top_k, tf.int32), top_p=column(top_p, tf.float32),
                    temperature=column(temperature, tf.float32), repetition_penalty=column(penalty, tf.float32),
                    seed=column(seed, tf.int64))

    rng = random.Random(0)
    unicode_text = "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(300))
    controls = "".join(chr(c) for c in range(0, 32)) + "\x7f this movie"
    long_prompt = " ".join(rng.choice(["this", "movie", "is", "good", "zzz"]) for _ in range(10000))
    results = [
        call("random unicode", gen, **args([unicode_text])),
        call("control characters", gen, **args([controls])),
        call("10,000-word prompt", gen, **args([long_prompt])),
        call("256 prompts", gen, **args(["this movie is"] * 256)),
        call("top_k 0", gen, **args(["this movie"], top_k=0)),
        call("top_k 10^9", gen, **args(["this movie"], top_k=10**9)),
        call("top_k per row", gen, **args(["this movie"] * 4, top_k=[-7, 0, 10**9, 2**31 - 1])),
        call("top_p extremes", gen, **args(["this movie"] * 4, top_p=[-5.0, 0.0, 1e30, 1e-30])),
        call("penalty extremes", gen, **args(["this movie"] * 3, penalty=[1e-30, 1e30, 3.4e38])),
        call("temperature extremes", gen, **args(["this movie"] * 3, temperature=[1e-30, 1e30, -1e30])),
        call("seed extremes", gen, **args(["this movie"] * 3, seed=[-2**63, 2**63 - 1, 0])),
        call("temperature NaN", gen, **args(["this movie", "is"], temperature=[1.0, float("nan")])),
        call("temperature inf", gen, **args(["this movie"], temperature=float("inf"))),
        call("top_p NaN", gen, **args(["this movie"], top_p=float("nan"))),
        call("penalty 0", gen, **args(["this movie"], penalty=0.0)),
        call("penalty -1", gen, **args(["this movie"], penalty=-1.0)),
        call("penalty inf", gen, **args(["this movie"], penalty=float("inf"))),
        call("max_tokens -1", gen, **args(["this movie"], max_tokens=-1)),
        call("max_tokens 10^9", gen, **args(["this movie", "is"], max_tokens=[5, 10**9])),
        call("max_tokens 1024", gen, **args(["this movie"], max_tokens=1024, top_p=1.0, penalty=1.0)),
        call("rows differ", gen, **args(["this movie", "is"], max_tokens=[5])),
        call("no rows of settings", gen, **args(["this movie"], rows=0)),
        call("empty prompt", gen, **args([""])),
        call("whitespace only", gen, **args([" \t  "])),
        call("punctuation only", gen, **args(["!!! ..."])),
        call("empty batch", gen, **args(tf.zeros([0], tf.string))),
        call("serving unicode", model.signatures["serving_default"], prompt=tf.constant([unicode_text])),
        call("score long", model.signatures["score"], text=tf.constant([long_prompt])),
        call("score empty", model.signatures["score"], text=tf.constant([""])),
    ]
    after = call("still serving", gen, **args(["this movie is"]))
    loaded = [m for m in sys.modules if m.split(".")[0] == "tfgpt"]
    print(json.dumps({"results": results, "after": after, "tfgpt": loaded}))
""")


@pytest.mark.slow
def test_export_survives_hostile_input(tmp_path):
    vocab = tmp_path / "vocab.txt"
    words = [PAD, UNK, "this", "movie", "is", "good", "!", ".", "the"]
    write_vocab(words, vocab)
    model = GPT(GPTConfig(vocab_size=len(words), maxlen=8, embed_dim=16, num_heads=2, ff_dim=16), seed=1)
    path = export_model(model, vocab, tmp_path / "export")
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tfgpt"] == []
    by_case = {r["case"]: r for r in report["results"]}
    for r in report["results"]:
        # Served, or refused as an InvalidArgumentError that says what is wrong.
        assert r["ok"] or (r["error"] == "InvalidArgumentError" and len(r["message"]) > 10), r
    for case in (
        "random unicode",
        "control characters",
        "10,000-word prompt",
        "256 prompts",
        "top_k 0",
        "top_k 10^9",
        "top_k per row",
        "top_p extremes",
        "penalty extremes",
        "temperature extremes",
        "seed extremes",
        "max_tokens 1024",
        "serving unicode",
        "score long",
        "empty batch",
    ):
        assert by_case[case]["ok"], by_case[case]
    assert by_case["256 prompts"]["shapes"]["text"] == [256]
    assert by_case["max_tokens 1024"]["shapes"]["token_ids"][1] <= 1024  # the random model may end early
    assert by_case["empty batch"]["shapes"]["text"] == [0]
    assert by_case["punctuation only"]["ok"]  # punctuation marks are tokens
    # Refused, naming the input and the row.
    for case, words in [
        ("temperature NaN", "temperature must be a finite number; row 1 has nan"),
        ("temperature inf", "temperature must be a finite number; row 0 has inf"),
        ("top_p NaN", "top_p must be a finite number"),
        ("penalty 0", "repetition_penalty must be a finite number above 0"),
        ("penalty -1", "row 0 has -1"),
        ("penalty inf", "row 0 has inf"),
        ("max_tokens -1", "max_tokens must be between 0 and 1024; row 0 has -1"),
        ("max_tokens 10^9", "row 1 has 1000000000"),
        ("rows differ", "max_tokens has 1 rows and prompt 2"),
        ("no rows of settings", "has 0 rows and prompt 1"),
        ("empty prompt", "at least one word"),
        ("whitespace only", "row 0"),
    ]:
        assert not by_case[case]["ok"] and words in by_case[case]["message"], (case, by_case[case])
    assert report["after"]["ok"]
