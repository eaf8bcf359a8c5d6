"""The cached path (`GPT.prefill`, `GPT.call_with_cache`, through
tfgpt.serving.decode) against the full model: the prefill and one-token
steps give the hidden states the model gives for the whole sequence, in
float32 and bfloat16; the window pass and the step that mixes both; and
the decode weights. The attention kernels themselves are
tests/test_attention.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_rows_equal

from tfgpt.config import GPTConfig
from tfgpt.model.gpt import GPT
from tfgpt.serving import decode

# Every test here depends on the CPU's kernels (`make test-isa`).
pytestmark = pytest.mark.kernels

CONFIG = GPTConfig(vocab_size=40, maxlen=8, embed_dim=16, num_heads=2, ff_dim=32, num_layers=2, dropout=0.0, head_dim=8)


def model_of(dtype=tf.float32, config=CONFIG, seed=3) -> GPT:
    """A random model with its weights times 3 (larger activations)."""
    model = GPT(config, seed=seed, compute_dtype=dtype)
    for v in model.trainable_variables:
        v.assign(v * 3.0)
    return model


@tf.function
def run_decode(model, prompts, lengths, steps_tokens, slots=CONFIG.maxlen):
    """Prefill right-padded prompts, then decode the given tokens one step at
    a time; returns the hidden state after each step, [steps, B, D]. slots:
    the cache's (a tensor: not known when traced, as in the sampler)."""
    weights = decode.DecodeWeights(model)()
    hidden, caches = model.prefill(prompts, lengths, slots, weights)
    setup = decode.decode_setup(model, tf.shape(prompts)[0], slots, weights)
    out = [hidden]
    n = lengths
    for token in tf.unstack(steps_tokens):
        n = n + 1
        hidden, caches = decode.decode_hidden(model, token, n - 1, caches, setup)
        out.append(hidden)
    return tf.stack(out)


# bfloat16: the model's attention multiplies bfloat16 keys and values, the
# decode step float32 ones (attend_one), and its query weights carry the
# 1 / sqrt(K) before their rounding to bfloat16; hidden states are layer-normed
# (entries up to ~6), and the bfloat16 model itself is about 0.01-0.03 per
# entry from float32.
@pytest.mark.parametrize("dtype, tol, mean_tol", [(tf.float32, 1e-5, 5e-6), (tf.bfloat16, 0.15, 0.05)])
def test_prefill_and_decode_steps_equal_the_full_model(dtype, tol, mean_tol):
    model = model_of(dtype)
    rows = [[5, 9, 2], [7], [3, 4, 5, 6, 8]]  # different lengths: right-padded
    extra = [[11, 12, 13], [14, 15, 16], [17, 18, 19]]  # three decoded tokens per row
    width = max(map(len, rows))
    prompts = tf.constant([r + [0] * (width - len(r)) for r in rows])
    got = run_decode(
        model, prompts, tf.constant([len(r) for r in rows]), tf.constant(np.array(extra).T, tf.int32)
    ).numpy()  # [4, B, D]
    for b, (row, more) in enumerate(zip(rows, extra)):
        for step in range(4):
            seq = row + more[:step]
            want = model.hidden(tf.constant([seq]))[0, -1].numpy()
            np.testing.assert_allclose(got[step, b], want, rtol=tol, atol=tol)
            assert np.mean(np.abs(got[step, b] - want)) < mean_tol


def test_window_hidden_reads_each_rows_last_maxlen_tokens():
    model = model_of()
    history = np.arange(2, 2 + 2 * 14).reshape(2, 14) % 38 + 2  # [B, W]
    n = np.array([5, 12], np.int32)  # the second row slides: its window is tokens 4..11
    got = decode.window_hidden(model, tf.constant(history, tf.int32), tf.constant(n)).numpy()
    for b in range(2):
        window = history[b, max(0, n[b] - CONFIG.maxlen) : n[b]]
        want = model.hidden(tf.constant([window], tf.int32))[0, -1].numpy()
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_frozen_decode_weights_equal_the_ones_computed_at_each_call(dtype):
    model = model_of(dtype)
    live, frozen = decode.DecodeWeights(model)(), decode.DecodeWeights(model, frozen=True)()
    # A frozen bfloat16 output layer is kept transposed ("head_t", [V, D]).
    head_w, head_b = frozen["head_t"] if dtype == tf.bfloat16 else frozen["head"]
    assert ("head" in frozen) == (dtype == tf.float32)
    if dtype == tf.bfloat16:
        head_w = tf.transpose(head_w)
    pairs = zip(tf.nest.flatten([live["blocks"], live["head"]]), tf.nest.flatten([frozen["blocks"], (head_w, head_b)]))
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(tf.cast(a, tf.float32).numpy(), tf.cast(b, tf.float32).numpy())
    assert head_w.dtype == dtype and head_b.dtype == tf.float32


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_the_output_layer_gives_the_same_logits_in_either_layout(dtype):
    """`logits` from the frozen weights (transposed in bfloat16) against the
    model's own output layer, and a row alone (in float32 twice, as the
    sampler runs a request of one) against the same row in a batch of 64."""
    config = GPTConfig(vocab_size=2000, maxlen=8, embed_dim=256, num_heads=2, ff_dim=32, num_layers=1, head_dim=8)
    model = GPT(config, seed=2, compute_dtype=dtype)
    frozen = decode.DecodeWeights(model, frozen=True)()
    f = tf.function(lambda h: decode.logits(h, frozen), input_signature=[tf.TensorSpec([None, 256])])
    hidden = np.random.default_rng(3).normal(size=(64, 256)).astype(np.float32)
    batch = f(hidden).numpy()
    np.testing.assert_array_equal(batch, model.head(tf.constant(hidden)).numpy())
    for r in range(0, 64, 5):
        alone = [r] if dtype == tf.bfloat16 else [r, r]
        assert_rows_equal(f(hidden[alone]).numpy()[0], batch[r], dtype.name, f"row {r}")


def test_frozen_float32_weights_copy_only_what_the_step_changes():
    # In float32 the output layer and the feed-forward matrices are used as
    # the model holds them: the frozen weights are those variables, not
    # copies; q (scaled), k, v (reshaped) and out's weight (reshaped) are new
    # variables.
    model = model_of()
    weights = decode.DecodeWeights(model, frozen=True)
    held = weights._weights
    assert held["head"][0] is model.head.w and held["head"][1] is model.head.b
    for block, w in zip(model.blocks, held["blocks"]):
        assert w["fc1"][0] is block.ffn.fc1.w and w["fc2"][1] is block.ffn.fc2.b
    own = {id(v) for v in model.variables}
    new = [v for v in weights.variables if id(v) not in own]
    assert len(new) == 7 * CONFIG.num_layers
    assert not any(v.trainable for v in new)
    want = {f"decode_weights/blocks_0_{m}_{p}:0" for m in "qkv" for p in "wb"} | {"decode_weights/blocks_0_out_w:0"}
    assert {v.name for v in new if "blocks_0_" in v.name} == want


# maxlen 11 (cache rows of 2 x 11 slots unless rounded up) and the layer
# norm's [B, 1] variance: both reach the CPU kernels' scalar tail unless
# handled (tfgpt.model.batch_invariant).
ODD = GPTConfig(
    vocab_size=40, maxlen=11, embed_dim=256, num_heads=2, ff_dim=256, num_layers=2, dropout=0.0, head_dim=256
)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_decode_steps_give_a_row_the_same_bits_alone_and_in_a_batch(dtype):
    """The generation loop's contract: a row's hidden states do not depend on
    the rows decoded with it. Alone is one row in bfloat16 and two (the row
    twice) in float32, as the sampler runs a request of one."""
    model = model_of(dtype, ODD, seed=5)
    weights = decode.DecodeWeights(model, frozen=True)()
    rng = np.random.default_rng(0)
    rows, steps = 40, 6
    lengths = rng.integers(1, 5, rows)
    tokens = rng.integers(2, 40, (rows, 4 + steps)).astype(np.int32)
    slots = decode.cache_slots(tf.constant(lengths + steps, tf.int32), ODD.maxlen)
    assert int(slots) % 16 == 0 and int(slots) >= ODD.maxlen

    @tf.function
    def start(context, n):
        return model.prefill(context, n, slots, weights)

    # The batch is unknown when the step is traced, as in the sampler's loop
    # (a traced batch size lets TensorFlow's graph optimizer reorder the
    # layer norm's products by shape).
    cache_spec = [(tf.TensorSpec([None, ODD.key_dim]),) * 2] * ODD.num_layers

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)] * 2 + [cache_spec])
    def step(token, pos, caches):
        setup = decode.decode_setup(model, tf.shape(token)[0], slots, weights)
        return decode.decode_hidden(model, token, pos, caches, setup)

    def run(picked):
        """Hidden states [steps, len(picked), D] of the given rows decoded together."""
        hidden, caches = [], []
        for r in picked:  # each row's own prefill: the prefill is not the subject here
            h, c = start(tokens[r : r + 1, : lengths[r]], tf.constant(lengths[r : r + 1], tf.int32))
            hidden.append(h)
            caches.append(c)
        caches = [tuple(tf.concat([c[i][j] for c in caches], 0) for j in range(2)) for i in range(ODD.num_layers)]
        out = []
        for i in range(steps):
            token = tf.constant([tokens[r, lengths[r] + i] for r in picked], tf.int32)
            pos = tf.constant([lengths[r] + i for r in picked], tf.int32)
            h, caches = step(token, pos, caches)
            out.append(h.numpy())
        return np.stack(out)

    batched = run(list(range(rows)))
    for r in range(rows):
        alone = run([r] if dtype == tf.bfloat16 else [r, r])[:, 0]
        assert_rows_equal(alone, batched[:, r], dtype.name, f"row {r}")


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_the_prefill_gives_a_row_the_same_bits_however_far_it_is_padded(dtype):
    """A row's hidden state and keys/values from the prefill alone equal
    those from a batch whose longest prompt pads it to 30 positions. Alone
    is one row in bfloat16 and two (the row twice) in float32, as the
    sampler runs a request of one."""
    config = GPTConfig(
        vocab_size=40, maxlen=40, embed_dim=256, num_heads=2, ff_dim=256, num_layers=2, dropout=0.0, head_dim=256
    )
    model = model_of(dtype, config, seed=6)
    weights = decode.DecodeWeights(model, frozen=True)()
    rng = np.random.default_rng(1)
    lengths = np.array([1, 2, 5, 9, 16, 30, 3, 12], np.int32)
    tokens = rng.integers(2, 40, (len(lengths), 30)).astype(np.int32)
    slots = 48

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)])
    def start(context, n):
        return model.prefill(context, n, slots, weights)

    def padded(rows):
        width = max(lengths[r] for r in rows)
        return np.stack([np.pad(tokens[r, : lengths[r]], (0, width - lengths[r])) for r in rows])

    rows = list(range(len(lengths)))
    hidden, caches = start(padded(rows), lengths)
    h, kd = config.num_heads, config.key_dim
    for r in rows:
        # Alone as the sampler runs a request of one: two rows in float32.
        alone = [r] if dtype == tf.bfloat16 else [r, r]
        alone_hidden, alone_caches = start(padded(alone), lengths[alone])
        assert_rows_equal(alone_hidden.numpy()[0], hidden.numpy()[r], dtype.name, f"row {r}")
        for (k1, v1), (k, v) in zip(alone_caches, caches):
            for one, batch in ((k1, k), (v1, v)):
                one = one.numpy().reshape(len(alone), h, slots, kd)[0, :, : lengths[r]]
                batch = batch.numpy().reshape(len(rows), h, slots, kd)[r, :, : lengths[r]]
                assert_rows_equal(one, batch, dtype.name, f"row {r}")


# The example's widths and context, a small vocabulary: the cache's slot
# count ranges over 16, 32, ... 80.
WIDE = GPTConfig(
    vocab_size=200, maxlen=80, embed_dim=256, num_heads=2, ff_dim=256, num_layers=1, dropout=0.0, head_dim=256
)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_a_row_keeps_its_bits_when_the_cache_has_more_slots(dtype):
    """The batch's longest request sets the slot count (`cache_slots`): a
    row's prompt pass and 36 decode steps give the same hidden states with
    48 slots (its own need) as with 64 and 80 (a longer request's). In
    float32 the softmax's plain reduce_sum made several steps differ."""
    model = model_of(dtype, WIDE, seed=5)
    tokens = np.random.default_rng(0).integers(2, 200, (2, 45)).astype(np.int32)  # two rows, as float32 serves one
    prompt = 9

    def run(slots):  # [37, 2, D]
        context, later = tf.constant(tokens[:, :prompt]), tf.constant(tokens[:, prompt:].T)
        return run_decode(model, context, tf.constant([prompt] * 2), later, slots=tf.constant(slots)).numpy()

    own = run(48)
    for slots in (64, 80):
        np.testing.assert_array_equal(run(slots), own)


def test_the_general_step_decodes_short_rows_and_slides_long_ones():
    """`next_hidden` on a batch of a row that fits in maxlen (8) positions
    and one past it: the first from the cache, the second from a window of
    its last 8 tokens, each what the full model gives for its tokens; and
    `cached_hidden` alone gives the first row's."""
    model = model_of()
    history = np.random.default_rng(7).integers(2, 40, (2, 12)).astype(np.int32)  # [B, W]
    n = np.array([4, 10], np.int32)  # row 0: 3 context tokens + 1 new; row 1 slides

    @tf.function
    def run(live, general=True):
        weights = decode.DecodeWeights(model)()
        slots = decode.cache_slots(tf.constant([8, 8]), CONFIG.maxlen)
        _, caches = model.prefill(history[:, :3], tf.constant([3, 3]), slots, weights)
        setup = decode.decode_setup(model, 2, slots, weights)
        token = tf.gather(history, n - 1, batch_dims=1)
        if not general:
            return decode.cached_hidden(model, token, n, caches, setup)[0]
        old = tf.fill([2, CONFIG.embed_dim], 7.0)
        return decode.next_hidden(model, token, n, live, old, caches, tf.constant(history), setup)[0]

    mixed = run(tf.constant([True, True])).numpy()
    for b in range(2):
        want = model.hidden(tf.constant(history[b : b + 1, max(0, n[b] - CONFIG.maxlen) : n[b]]))[0, -1].numpy()
        np.testing.assert_allclose(mixed[b], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(tf.constant([True, True]), general=False).numpy()[0], mixed[0], rtol=1e-5, atol=1e-5)
    # No row live: nothing runs, every row keeps the old hidden state.
    np.testing.assert_array_equal(run(tf.constant([False, False])).numpy(), np.full((2, CONFIG.embed_dim), 7.0))
