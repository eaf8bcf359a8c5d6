"""The exported SavedModel under hostile input, in a separate process that
imports only TensorFlow: it never dies, and every refusal is an
InvalidArgumentError with a message."""

import json
import subprocess
import sys
import textwrap

from tfgpt.config import GPTConfig
from tfgpt.data import PAD, UNK, write_vocab
from tfgpt.model import GPT
from tfgpt.sampler import export_model

CLIENT = textwrap.dedent(r'''
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

    def args(prompts, max_tokens=5, top_k=3, temperature=1.0):
        return dict(prompt=tf.constant(prompts), max_tokens=tf.constant(max_tokens, tf.int32),
                    top_k=tf.constant(top_k, tf.int32), temperature=tf.constant(temperature, tf.float32),
                    seed=tf.constant([1, 2], tf.int64))

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
        call("temperature NaN", gen, **args(["this movie"], temperature=float("nan"))),
        call("temperature inf", gen, **args(["this movie"], temperature=float("inf"))),
        call("max_tokens -1", gen, **args(["this movie"], max_tokens=-1)),
        call("max_tokens 10^9", gen, **args(["this movie"], max_tokens=10**9)),
        call("empty prompt", gen, **args([""])),
        call("whitespace only", gen, **args([" \t  "])),
        call("punctuation only", gen, **args(["!!! ..."])),
        call("empty batch", gen, **args(tf.zeros([0], tf.string))),
        call("serving unicode", model.signatures["serving_default"], prompt=tf.constant([unicode_text])),
        call("score long", model.signatures["score"], text=tf.constant([long_prompt])),
        call("score empty", model.signatures["score"], text=tf.constant([""])),
    ]
    after = call("still serving", gen, **args(["this movie is"]))
    print(json.dumps({"results": results, "after": after, "tfgpt": [m for m in sys.modules if m.split(".")[0] == "tfgpt"]}))
''')


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
    for case in ("random unicode", "control characters", "10,000-word prompt", "256 prompts", "top_k 0",
                 "top_k 10^9", "serving unicode", "score long", "empty batch"):
        assert by_case[case]["ok"], by_case[case]
    assert by_case["256 prompts"]["shapes"]["text"] == [256]
    assert by_case["empty batch"]["shapes"]["text"] == [0]
    assert by_case["punctuation only"]["ok"]  # punctuation marks are tokens
    for case in ("temperature NaN", "max_tokens -1", "max_tokens 10^9", "empty prompt", "whitespace only"):
        assert not by_case[case]["ok"], by_case[case]
    assert "temperature" in by_case["temperature NaN"]["message"]
    assert "max_tokens" in by_case["max_tokens 10^9"]["message"]
    assert report["after"]["ok"]
