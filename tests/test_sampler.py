"""The in-graph sampler: cached decoding against the full model, per-row
settings, sampling, batching, scoring and bad input. Every expectation comes
from an independent reference: the model run without a cache from Python,
each prompt run alone, or a model whose logits are set by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import reference_greedy

from tfgpt.config import GPTConfig
from tfgpt.data.text import PAD, UNK, write_vocab
from tfgpt.model.gpt import GPT
from tfgpt.serving.sampler import MAX_TOKENS, Sampler

WORDS = [PAD, UNK] + [f"w{i}" for i in range(2, 40)]  # id i <-> word "w{i}" for i >= 2
CONFIG = GPTConfig(
    vocab_size=len(WORDS), maxlen=8, embed_dim=16, num_heads=2, ff_dim=32, num_layers=2, dropout=0.0, head_dim=8
)
SEED = 3


def ids_of(text: str) -> list[int]:
    return [WORDS.index(w) if w in WORDS else 1 for w in text.split()]


def text_of(ids) -> str:
    return " ".join(WORDS[i] for i in ids if i != 0)


def sharp_model(seed=1, end_bias=-1e9, compute_dtype=tf.float32) -> GPT:
    """A random model with large weights (well-separated logits, so greedy
    choices do not hinge on rounding) whose padding logit gets `end_bias`
    (very negative: rows never end)."""
    model = GPT(CONFIG, seed=seed, compute_dtype=compute_dtype)
    for v in model.trainable_variables:
        v.assign(v * 4.0)
    model.head.b.assign(tf.tensor_scatter_nd_update(model.head.b, [[0]], [end_bias]))
    return model


def fixed_logit_model(bias) -> GPT:
    """A model whose logits are `bias` whatever the input: output weights 0."""
    model = GPT(CONFIG, seed=0)
    model.head.w.assign(tf.zeros_like(model.head.w))
    model.head.b.assign(tf.constant(bias, tf.float32))
    return model


def reference_log_prob(model: GPT, ids: list[int]) -> float:
    """sum over i >= 1 of log p(ids[i] | the up to maxlen tokens before it)."""
    total = 0.0
    for i in range(1, len(ids)):
        logits = model(tf.constant([ids[max(0, i - CONFIG.maxlen) : i]]))[0, -1]
        total += float(tf.nn.log_softmax(logits)[ids[i]])
    return total


def generate(sampler, prompts, max_tokens=20, top_k=10, temperature=0.0, seed=SEED, top_p=1.0, repetition_penalty=1.0):
    """sampler.generate with one value per setting for every row, or a list
    of one per row. A single seed s gives row i the seed s + i."""
    n = len(prompts)

    def column(value, dtype):
        return tf.constant(np.broadcast_to(np.asarray(value), [n]), dtype)

    seeds = np.asarray(seed) if np.ndim(seed) else seed + np.arange(n)
    return sampler.generate(
        prompt=tf.constant(prompts, tf.string),
        max_tokens=column(max_tokens, tf.int32),
        top_k=column(top_k, tf.int32),
        top_p=column(top_p, tf.float32),
        temperature=column(temperature, tf.float32),
        repetition_penalty=column(repetition_penalty, tf.float32),
        seed=column(seeds, tf.int64),
    )


def rows(out) -> list[list[int]]:
    """token_ids cut to each row's length."""
    return [r[:n].tolist() for r, n in zip(out["token_ids"].numpy(), out["lengths"].numpy())]


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(WORDS, path)
    return str(path)


@pytest.fixture(scope="module")
def model():
    return sharp_model()


@pytest.fixture(scope="module")
def sampler(model, vocab_path):
    return Sampler(model, vocab_path)


# --- decoding against the full model ------------------------------------------


def test_cached_greedy_equals_full_model_across_maxlen(model, sampler):
    prompt = "w5 w9 w2"
    out = generate(sampler, [prompt], max_tokens=100)
    expected = reference_greedy(model, ids_of(prompt), 100)
    assert len(expected) == 100  # far past maxlen (8): the window slides 95 times
    assert rows(out) == [expected]
    assert out["completion"].numpy()[0].decode() == text_of(expected)
    assert out["text"].numpy()[0].decode() == prompt + " " + text_of(expected)


@pytest.mark.parametrize("length", [6, 7, 8])
def test_greedy_equals_full_model_from_prompts_near_maxlen(model, sampler, length):
    # The cache-only loop takes 2, 1 and 0 of the steps; the general loop the rest.
    prompt = " ".join(f"w{2 + 5 * i}" for i in range(length))
    out = generate(sampler, [prompt], max_tokens=5)
    assert rows(out) == [reference_greedy(model, ids_of(prompt), 5)]


def test_bfloat16_model_generates_like_its_full_model(vocab_path):
    model = sharp_model(seed=2, compute_dtype=tf.bfloat16)
    out = generate(Sampler(model, vocab_path), ["w4 w8 w15"], max_tokens=24)
    expected = reference_greedy(model, ids_of("w4 w8 w15"), 24)
    assert rows(out) == [expected]


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_a_frozen_sampler_generates_what_the_model_does(vocab_path, dtype):
    # The export's sampler prepares the decode step's matrices once; sampled
    # rows (top-k, top-p, penalty) and greedy rows must come out as from the
    # sampler that prepares them at every call.
    model = sharp_model(seed=5, compute_dtype=dtype)
    frozen, live = Sampler(model, vocab_path, frozen=True), Sampler(model, vocab_path)
    prompts = ["w4 w8 w15", "w3", "w9 w9 w2 w6 w7 w11 w12"]
    settings = dict(max_tokens=14, top_k=[10, 3, 40], top_p=[0.9, 1.0, 0.7], temperature=[1.0, 0.7, 0.0])
    settings["repetition_penalty"] = [1.3, 1.0, 2.0]
    want = rows(generate(live, prompts, **settings))
    assert rows(generate(frozen, prompts, **settings)) == want
    assert rows(generate(frozen, [prompts[2]], max_tokens=14)) == [reference_greedy(model, ids_of(prompts[2]), 14)]


@pytest.mark.kernels
def test_batch_of_different_lengths_equals_each_prompt_alone(model, sampler):
    # 1, 3, 6 and 11 tokens: the rows reach maxlen (8) at different steps, and
    # the last starts past it (its context is its last 8 tokens).
    prompts = ["w3", "w4 w5 w6", "w10 w11 w12 w13 w14 w15", "w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"]
    batch = generate(sampler, prompts, max_tokens=15)
    for i, prompt in enumerate(prompts):
        alone = generate(sampler, [prompt], max_tokens=15)
        assert rows(batch)[i] == rows(alone)[0], prompt
        assert batch["text"].numpy()[i] == alone["text"].numpy()[0]
    # The whole of a long prompt comes back, though the model saw its last 8 tokens.
    assert rows(batch)[3] == reference_greedy(model, ids_of(prompts[3]), 15)
    assert batch["text"].numpy()[3].decode().startswith(prompts[3] + " ")


def test_rows_end_independently_on_the_padding_id(vocab_path):
    # A padding logit high enough that some contexts make it the most likely.
    model = sharp_model(seed=4, end_bias=3.0)
    sampler = Sampler(model, vocab_path)
    prompts = ["w2", "w3", "w5", "w8", "w13", "w21"]
    out = generate(sampler, prompts, max_tokens=12)
    expected = [reference_greedy(model, ids_of(p), 12) for p in prompts]
    lengths = [len(e) for e in expected]
    assert min(lengths) < 12 and max(lengths) == 12  # some rows end early, some run on
    assert rows(out) == expected
    assert out["lengths"].numpy().tolist() == lengths
    ids = out["token_ids"].numpy()
    assert ids.shape == (len(prompts), 12)
    for row, n in zip(ids, lengths):
        assert not row[n:].any()  # 0-padded after the end


# --- sampling ----------------------------------------------------------------------

BIAS = np.full(len(WORDS), -2.0, np.float32)
BIAS[[7, 11, 19, 23, 31]] = [3.0, 2.5, 2.0, 1.0, 0.5]  # the top 5, in order
BIAS[0] = -50.0  # never end


@pytest.fixture(scope="module")
def fixed_sampler(vocab_path):
    return Sampler(fixed_logit_model(BIAS), vocab_path)


def _frequencies(out, ids):
    tokens = out["token_ids"].numpy().ravel()
    return np.array([(tokens == i).mean() for i in ids])


def test_samples_come_from_the_top_k_with_softmax_frequencies(fixed_sampler):
    top5 = [7, 11, 19, 23, 31]
    out = generate(fixed_sampler, ["w2"] * 64, max_tokens=40, top_k=5, temperature=1.0)
    tokens = out["token_ids"].numpy()
    assert tokens.shape == (64, 40)
    assert set(np.unique(tokens)) <= set(top5)
    expected = np.exp(BIAS[top5]) / np.exp(BIAS[top5]).sum()
    # 2,560 draws: the standard error of each frequency is below 0.01.
    np.testing.assert_allclose(_frequencies(out, top5), expected, atol=0.04)

    # Temperature 2 flattens the same five probabilities.
    out = generate(fixed_sampler, ["w2"] * 64, max_tokens=40, top_k=5, temperature=2.0)
    hot = np.exp(BIAS[top5] / 2) / np.exp(BIAS[top5] / 2).sum()
    np.testing.assert_allclose(_frequencies(out, top5), hot, atol=0.04)


def test_top_k_is_clamped_and_temperature_zero_is_greedy(fixed_sampler):
    for k, t in [(10, 0.0), (10, -1.0), (0, 1.0), (-3, 1.0), (1, 5.0)]:
        out = generate(fixed_sampler, ["w2", "w3"], max_tokens=10, top_k=k, temperature=t)
        assert (out["token_ids"].numpy() == 7).all(), (k, t)
    # top_k far above the vocabulary means all of it: the 34 tokens of logit -2
    # share 9.5% of the draws (std. error 0.6%), and nearly all of them appear.
    out = generate(fixed_sampler, ["w2"] * 64, max_tokens=40, top_k=10**9, temperature=1.0)
    tokens = out["token_ids"].numpy()
    assert tokens.min() > 0
    low = tokens[~np.isin(tokens, [7, 11, 19, 23, 31])]
    full = np.exp(BIAS[1:]).sum()
    assert low.size / tokens.size == pytest.approx(34 * math.exp(-2.0) / full, abs=0.025)
    assert len(np.unique(low)) >= 30


def test_same_seed_same_text_other_seed_other_text(fixed_sampler, sampler):
    for s in (fixed_sampler, sampler):
        a = generate(s, ["w2", "w9 w3"], max_tokens=30, temperature=1.0, seed=[5, 6])
        b = generate(s, ["w2", "w9 w3"], max_tokens=30, temperature=1.0, seed=[5, 6])
        c = generate(s, ["w2", "w9 w3"], max_tokens=30, temperature=1.0, seed=[5, 7])
        assert a["text"].numpy().tolist() == b["text"].numpy().tolist()
        assert a["text"].numpy()[0] == c["text"].numpy()[0]  # the seed is per row
        assert a["text"].numpy()[1] != c["text"].numpy()[1]
    # The same prompt and seed in two rows: the same text.
    out = generate(fixed_sampler, ["w2", "w2"], max_tokens=30, temperature=1.0, seed=[9, 9])
    assert out["text"].numpy()[0] == out["text"].numpy()[1]


def test_serving_default_draws_a_new_seed_for_each_row(fixed_sampler):
    a = fixed_sampler.serving_default(prompt=tf.constant(["w2", "w2"]))
    b = fixed_sampler.serving_default(prompt=tf.constant(["w2"]))
    assert a["lengths"].numpy().tolist() == [40, 40]  # the example's 40 tokens
    # The top 10: the five raised logits, then ids 1-5 (ties go to the lower id).
    assert set(np.unique(a["token_ids"].numpy())) <= {1, 2, 3, 4, 5, 7, 11, 19, 23, 31}
    assert len({a["text"].numpy()[0], a["text"].numpy()[1], b["text"].numpy()[0]}) == 3


def nucleus_of(bias, top_k, top_p, temperature) -> tuple[list[int], np.ndarray]:
    """(ids, probabilities) of the nucleus, from the definition: the top_k
    largest logits (ties to the lower id), softmax at the temperature, then
    the shortest prefix whose probability reaches top_p, renormalised."""
    order = np.lexsort((np.arange(len(bias)), -bias))[:top_k]
    z = np.exp((bias[order] - bias[order].max()) / temperature)
    probs = z / z.sum()
    keep = max(1, int(np.sum(np.cumsum(probs) - probs < top_p)))
    return order[:keep].tolist(), probs[:keep] / probs[:keep].sum()


@pytest.mark.parametrize("top_k, top_p, temperature", [(10, 0.7, 1.0), (40, 0.9, 2.0), (3, 0.5, 0.5)])
def test_nucleus_samples_stay_inside_it_with_its_frequencies(fixed_sampler, top_k, top_p, temperature):
    ids, probs = nucleus_of(BIAS, top_k, top_p, temperature)
    assert 1 < len(ids) < top_k or top_k == 3  # the nucleus cuts the top-k (or holds two of three)
    out = generate(fixed_sampler, ["w2"] * 64, max_tokens=40, top_k=top_k, top_p=top_p, temperature=temperature)
    assert set(np.unique(out["token_ids"].numpy())) <= set(ids)
    # 2,560 draws: the standard error of each frequency is below 0.01.
    np.testing.assert_allclose(_frequencies(out, ids), probs, atol=0.04)


def reference_penalized_greedy(bias, prompt: list[int], steps: int, penalty: float) -> list[int]:
    """Greedy decoding of fixed logits with the CTRL penalty on every token
    already in the row (the prompt and what was generated), from NumPy."""
    seq, out = list(prompt), []
    for _ in range(steps):
        logits = bias.astype(np.float64).copy()
        for token in set(seq):
            logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        token = int(np.argmax(logits))
        seq.append(token)
        out.append(token)
    return out


def test_repetition_penalty_as_in_ctrl(fixed_sampler):
    # Without a penalty greedy repeats the best token; with one, each token
    # already seen (in the prompt too: w7, the best) is pushed down.
    for penalty in (1.0, 1.3, 2.5, 10.0, 0.5):
        out = generate(fixed_sampler, ["w7 w2", "w3"], max_tokens=12, repetition_penalty=penalty)
        assert rows(out) == [reference_penalized_greedy(BIAS, ids_of(p), 12, penalty) for p in ("w7 w2", "w3")]
    assert rows(generate(fixed_sampler, ["w3"], max_tokens=3, repetition_penalty=1.0)) == [[7, 7, 7]]
    assert len(set(rows(generate(fixed_sampler, ["w3"], max_tokens=5, repetition_penalty=10.0))[0])) > 3


@pytest.mark.kernels
def test_rows_with_their_own_settings_equal_their_requests_alone(model, sampler):
    # 64 rows, each with its own prompt, max_tokens, top_k, top_p,
    # temperature, penalty and seed, in one request: every row gives what
    # it gives alone (the goal of TensorFlow Serving's batching, which
    # concatenates requests).
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{w}" for w in rng.integers(2, 40, rng.integers(1, 12))) for _ in range(64)]
    settings = dict(
        max_tokens=rng.integers(0, 21, 64),
        top_k=rng.choice([1, 3, 10, 40, 10**9], 64),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.0], 64),
        temperature=rng.choice([0.0, 0.7, 1.0, 1.5], 64),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8], 64),
        seed=rng.integers(-(2**62), 2**62, 64),
    )
    batch = generate(sampler, prompts, **settings)
    assert batch["lengths"].numpy().tolist() == settings["max_tokens"].tolist()  # sharp_model never ends
    for i, prompt in enumerate(prompts):
        alone = generate(sampler, [prompt], **{name: [value[i]] for name, value in settings.items()})
        assert rows(batch)[i] == rows(alone)[0], (prompt, {name: value[i] for name, value in settings.items()})
        assert batch["text"].numpy()[i] == alone["text"].numpy()[0]


@pytest.mark.kernels
def test_bfloat16_rows_equal_their_requests_alone_at_the_example_width(tmp_path):
    # The same in bfloat16 at the example's width, where a product's input
    # is rounded to 8 bits: a last-bit difference in a float32 sum (another
    # kernel for another batch size) can change a rounded input and then a
    # draw. Plain random weights and 4,000 words keep the distributions
    # flat, where the most draws hinge on the last bits.
    words = [PAD, UNK] + [f"w{i}" for i in range(2, 4000)]
    write_vocab(words, tmp_path / "vocab.txt")
    config = GPTConfig(vocab_size=len(words), maxlen=32, embed_dim=256, num_heads=2, ff_dim=256, dropout=0.0)
    model = GPT(config, seed=5, compute_dtype=tf.bfloat16)
    model.head.b.assign(tf.tensor_scatter_nd_update(model.head.b, [[0]], [-1e9]))  # rows never end
    sampler = Sampler(model, str(tmp_path / "vocab.txt"))
    rng = np.random.default_rng(1)
    prompts = [" ".join(f"w{w}" for w in rng.integers(2, 4000, rng.integers(1, 12))) for _ in range(64)]
    settings = dict(
        max_tokens=rng.integers(0, 21, 64),
        top_k=rng.choice([1, 5, 10, 10**9], 64),
        top_p=rng.choice([1.0, 0.95, 0.9, 0.5], 64),
        temperature=rng.choice([0.0, 0.7, 1.0, 1.3], 64),
        repetition_penalty=rng.choice([1.0, 1.2, 1.5], 64),
        seed=rng.integers(0, 2**62, 64),
    )
    batch = rows(generate(sampler, prompts, **settings))
    alone = [rows(generate(sampler, [p], **{k: [v[i]] for k, v in settings.items()}))[0] for i, p in enumerate(prompts)]
    assert [i for i in range(64) if batch[i] != alone[i]] == []


# --- score ---------------------------------------------------------------------------


def test_score_equals_the_full_model_sliding_past_maxlen(model, sampler):
    texts = ["w5 w9", "w3 w4 w5 w6 w7", " ".join(f"w{2 + (7 * i) % 37}" for i in range(20))]
    out = sampler.score(text=tf.constant(texts))
    for i, text in enumerate(texts):
        ids = ids_of(text)
        want = reference_log_prob(model, ids)
        assert out["num_tokens"].numpy()[i] == len(ids) - 1
        assert out["log_prob"].numpy()[i] == pytest.approx(want, rel=1e-4, abs=1e-3)
        assert out["perplexity"].numpy()[i] == pytest.approx(math.exp(-want / (len(ids) - 1)), rel=1e-3)


# --- input ---------------------------------------------------------------------------


def _refused(fn, *words):
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        fn()
    for w in words:
        assert w in info.value.message
    return info.value.message


def test_bad_input_is_refused_naming_the_input_and_the_row(sampler):
    nan, inf = float("nan"), float("inf")
    _refused(lambda: generate(sampler, ["w2", "  <br />  "]), "at least one word", "row 1")
    _refused(lambda: generate(sampler, [""]), "at least one word", "row 0")
    _refused(
        lambda: generate(sampler, ["w2", "w3"], max_tokens=[3, -1]), "max_tokens must be between 0 and", "row 1 has -1"
    )
    _refused(
        lambda: generate(sampler, ["w2"] * 3, max_tokens=[1, MAX_TOKENS + 1, 2]),
        f"between 0 and {MAX_TOKENS}",
        f"row 1 has {MAX_TOKENS + 1}",
    )
    _refused(
        lambda: generate(sampler, ["w2", "w3"], temperature=[1.0, nan]), "temperature must be a finite", "row 1 has nan"
    )
    _refused(lambda: generate(sampler, ["w2"], temperature=inf), "temperature must be a finite", "row 0 has inf")
    _refused(lambda: generate(sampler, ["w2", "w3"], top_p=[nan, 0.5]), "top_p must be a finite", "row 0 has nan")
    for bad in (0.0, -1.0, nan, inf):
        _refused(
            lambda bad=bad: generate(sampler, ["w2", "w3", "w4"], repetition_penalty=[1.0, 1.0, bad]),
            "repetition_penalty must be a finite number above 0",
            "row 2 has",
        )
    message = _refused(
        lambda: sampler.generate(
            prompt=tf.constant(["w2", "w3"]),
            max_tokens=tf.constant([4]),
            top_k=tf.constant([1, 1]),
            top_p=tf.constant([1.0, 1.0]),
            temperature=tf.constant([1.0, 1.0]),
            repetition_penalty=tf.constant([1.0, 1.0]),
            seed=tf.constant([1, 2], tf.int64),
        ),
        "max_tokens has 1 rows and prompt 2",
    )
    assert "one row per prompt" in message
    _refused(lambda: sampler.score(text=tf.constant(["w2 w3", "w4"])), "at least two tokens", "row 1 has 1")
    # Each message is one line.
    line = [x for x in _refused(lambda: generate(sampler, ["w2"], top_p=nan)).splitlines() if "assertion" in x]
    assert len(line) == 1 and line[0].endswith("row 0 has nan]")


def test_awkward_input_is_served(sampler, model):
    # Unknown words become [UNK]; punctuation is split off; bytes that are not
    # UTF-8 and control characters are just more unknown words.
    prompts = [b"Zebra w3", b"w2 \xff\xfe w4", "\x00w5 \x07 \u202e w6".encode()]
    out = generate(sampler, prompts, max_tokens=3)
    texts = [t.decode() for t in out["text"].numpy()]
    assert texts[0].startswith("[UNK] w3 ")
    assert texts[1].startswith("w2 [UNK] w4 ")
    assert texts[2].startswith("w5 [UNK] [UNK] w6 ")  # NUL is a space, the others unknown words
    assert rows(out)[0] == reference_greedy(model, [1, 3], 3)

    # max_tokens 0: the prompt alone.
    out = generate(sampler, ["w2 w3"], max_tokens=0)
    assert out["text"].numpy().tolist() == [b"w2 w3"] and out["completion"].numpy().tolist() == [b""]
    assert out["token_ids"].shape == (1, 0) and out["lengths"].numpy().tolist() == [0]

    # An empty batch gives empty outputs.
    out = generate(sampler, [], max_tokens=5)
    assert out["text"].shape == (0,) and out["token_ids"].shape == (0, 0) and out["lengths"].shape == (0,)
    assert sampler.score(text=tf.constant([], tf.string))["log_prob"].shape == (0,)

    # 64 prompts at once, one of them far longer than maxlen.
    prompts = [f"w{2 + i % 38} w{2 + (3 * i) % 38}" for i in range(63)] + [" ".join(["w9"] * 500)]
    out = generate(sampler, prompts, max_tokens=MAX_TOKENS // 64, temperature=1.0)
    assert out["lengths"].numpy().tolist() == [MAX_TOKENS // 64] * 64
    assert out["text"].numpy()[63].decode().startswith(" ".join(["w9"] * 500) + " ")


# --- a model on several devices --------------------------------------------------


def test_generate_with_a_mirrored_model(vocab_path, model):
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (tests/conftest.py sets them up)")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    with strategy.scope():
        mirrored = sharp_model()  # the same initial weights as `model`
    assert isinstance(mirrored.head.w, tf.distribute.DistributedValues)
    out = generate(Sampler(mirrored, vocab_path), ["w5 w9 w2", "w3"], max_tokens=12)
    assert rows(out) == [reference_greedy(model, ids_of("w5 w9 w2"), 12), reference_greedy(model, [3], 12)]
