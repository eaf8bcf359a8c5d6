"""Layer checks against NumPy references written out independently here."""

import numpy as np
import pytest
import tensorflow as tf

from tfgpt.model.batch_invariant import rsqrt_column
from tfgpt.model.layers import (
    Block,
    Dense,
    Embedding,
    FeedForward,
    LayerNorm,
    MultiHeadAttention,
    dropout,
    prefill_span,
)

# --- NumPy references ---------------------------------------------------------


def np_dense(x, w, b):
    return x @ w + b


def np_layer_norm(x, gamma, beta, eps=1e-6):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_causal_attention(x, wq, bq, wk, bk, wv, bv, wo, bo):
    """x [B, T, D]; wq/wk/wv [D, H, K]; b* [H, K]; wo [H, K, D]; bo [D]."""
    _, t, _ = x.shape
    key_dim = wq.shape[-1]
    q = np.einsum("btd,dhk->bhtk", x, wq) + bq[None, :, None, :]
    k = np.einsum("btd,dhk->bhtk", x, wk) + bk[None, :, None, :]
    v = np.einsum("btd,dhk->bhtk", x, wv) + bv[None, :, None, :]
    out = np.zeros((x.shape[0], t, wo.shape[-1]))
    for i in range(t):
        # Position i looks at positions 0..i only.
        s = np.einsum("bhk,bhjk->bhj", q[:, :, i], k[:, :, : i + 1]) / np.sqrt(key_dim)
        p = np_softmax(s)
        ctx = np.einsum("bhj,bhjk->bhk", p, v[:, :, : i + 1])
        out[:, i] = np.einsum("bhk,hkd->bd", ctx, wo) + bo
    return out


def np_ffn(x, w1, b1, w2, b2):
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def _np(v):
    return v.numpy().astype(np.float64)


def _randomise(module, seed=0):
    """Gives every variable (biases, gains too) non-trivial random values."""
    rng = np.random.default_rng(seed)
    for var in module.trainable_variables:
        var.assign(rng.normal(0.0, 0.3, var.shape).astype(np.float32))


def _mha_weights(mha):
    return [_np(v) for v in (mha.wq, mha.bq, mha.wk, mha.bk, mha.wv, mha.bv, mha.wo, mha.bo)]


# --- tests --------------------------------------------------------------------


def test_dense_matches_numpy():
    """Dense over a 3-D input equals x @ w + b."""
    layer = Dense(5, 7, seed=3)
    _randomise(layer)
    x = np.random.default_rng(1).normal(size=(2, 3, 5)).astype(np.float32)
    y = layer(tf.constant(x)).numpy()
    assert y.shape == (2, 3, 7)
    np.testing.assert_allclose(y, np_dense(x.astype(np.float64), _np(layer.w), _np(layer.b)), rtol=1e-5, atol=1e-5)


def test_embedding_matches_numpy():
    """Embedding is a row lookup; its init lies in [-0.05, 0.05]."""
    layer = Embedding(11, 4, seed=2)
    table = layer.table.numpy()
    assert table.shape == (11, 4)
    assert np.abs(table).max() <= 0.05
    assert np.std(table) > 0.01
    ids = np.array([[0, 10, 3], [3, 3, 7]], dtype=np.int32)
    np.testing.assert_array_equal(layer(tf.constant(ids)).numpy(), table[ids])


def test_layer_norm_matches_numpy():
    """LayerNorm over the last axis, eps 1e-6, output float32."""
    layer = LayerNorm(6)
    _randomise(layer, seed=4)
    x = (np.random.default_rng(2).normal(size=(3, 4, 6)) * 3.0 + 1.5).astype(np.float32)
    y = layer(tf.constant(x))
    assert y.dtype == tf.float32
    ref = np_layer_norm(x.astype(np.float64), _np(layer.gamma), _np(layer.beta), eps=1e-6)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_layer_norm_with_another_rsqrt():
    """The rsqrt generation passes gives the layer's own numbers for a batch
    whose rows fill whole vector registers (32 rows), and NumPy's for one row."""
    layer = LayerNorm(8)
    _randomise(layer, seed=5)
    x = (np.random.default_rng(6).normal(size=(32, 8)) * 2.0).astype(np.float32)
    np.testing.assert_array_equal(layer(tf.constant(x), rsqrt=rsqrt_column).numpy(), layer(tf.constant(x)).numpy())
    ref = np_layer_norm(x[:1].astype(np.float64), _np(layer.gamma), _np(layer.beta))
    np.testing.assert_allclose(layer(tf.constant(x[:1]), rsqrt=rsqrt_column).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_layer_norm_eps_is_small():
    """A near-constant row is normalised with eps 1e-6, not a larger eps."""
    layer = LayerNorm(4)
    x = np.array([[0.0, 0.002, 0.0, -0.002]], dtype=np.float32)
    ref = np_layer_norm(x.astype(np.float64), np.ones(4), np.zeros(4), eps=1e-6)
    np.testing.assert_allclose(layer(tf.constant(x)).numpy(), ref, rtol=1e-4, atol=1e-4)


def test_attention_matches_numpy():
    """Multi-head causal attention equals a loop-over-positions reference."""
    d, h, k = 6, 3, 4
    mha = MultiHeadAttention(d, h, k, seed=5)
    assert tuple(mha.wq.shape) == (d, h, k)
    assert tuple(mha.bq.shape) == (h, k)
    assert tuple(mha.wo.shape) == (h, k, d)
    assert tuple(mha.bo.shape) == (d,)
    _randomise(mha, seed=6)
    x = np.random.default_rng(3).normal(size=(2, 5, d)).astype(np.float32)
    y = mha(tf.constant(x)).numpy()
    ref = np_causal_attention(x.astype(np.float64), *_mha_weights(mha))
    assert y.shape == (2, 5, d)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_attention_gradients_match_an_einsum_formulation():
    """The gradients of the attention layer for its input and every variable
    equal those of the same attention written with einsums and an explicit
    -inf causal mask, through tf.GradientTape."""
    d, h, k = 8, 2, 4
    mha = MultiHeadAttention(d, h, k, seed=7)
    _randomise(mha, seed=8)
    x = tf.constant(np.random.default_rng(5).normal(size=(3, 6, d)).astype(np.float32))
    r = tf.constant(np.random.default_rng(6).normal(size=(3, 6, d)).astype(np.float32))

    def plain():
        q = tf.einsum("btd,dhk->bhtk", x, mha.wq) + mha.bq[:, None, :]
        kk = tf.einsum("btd,dhk->bhtk", x, mha.wk) + mha.bk[:, None, :]
        v = tf.einsum("btd,dhk->bhtk", x, mha.wv) + mha.bv[:, None, :]
        later = np.triu(np.ones((6, 6), bool), 1)
        s = tf.where(later, -np.inf, tf.einsum("bhik,bhjk->bhij", q, kk) / np.sqrt(k))
        ctx = tf.einsum("bhij,bhjk->bhik", tf.nn.softmax(s), v)
        return tf.einsum("bhtk,hkd->btd", ctx, mha.wo) + mha.bo

    results = []
    for path in (lambda: mha(x), plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(path() * r)
        results.append(tape.gradient(loss, [x] + list(mha.trainable_variables)))
    for a, b in zip(*results):
        a, b = tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("dtype, tol", [(tf.float32, 1e-6), (tf.bfloat16, 0.05)])
def test_attention_prefill_equals_the_training_call(dtype, tol):
    """The cached path's prompt pass (its own per-head products, float32
    softmax, the query's 1 / sqrt(K) folded into its weights) and training's
    call are the same function; in bfloat16 they round at other places."""
    mha = MultiHeadAttention(8, 2, 4, seed=3, compute_dtype=dtype)
    _randomise(mha, seed=4)
    x = tf.constant(np.random.default_rng(7).normal(size=(3, 6, 8)).astype(np.float32))
    out, _ = mha.prefill(tf.reshape(x, [-1, 8]), mha.decode_weights(), prefill_span(3, 6, 16))
    np.testing.assert_allclose(tf.reshape(out, [3, 6, 8]).numpy(), mha(x).numpy(), rtol=0, atol=tol)


def _cache_step(pos, heads, slots, key_dim):
    """The decode step's `step` for rows at positions pos [B] of a cache of
    `slots` slots, worked out here from the layout [B * H * S, K]."""
    b = len(pos)
    rows = [(i * heads + h) * slots + p for i, p in enumerate(pos) for h in range(heads)]
    blocked = np.where(np.arange(slots)[None, :] <= np.asarray(pos)[:, None], 0.0, -1e9).astype(np.float32)
    return {
        "rows": tf.constant(rows),
        "blocked": tf.constant(blocked),
        "cache_shape": tf.constant([b, heads, slots, key_dim]),
    }


def test_block_cached_path_matches_numpy():
    """Block.prefill over right-padded prompts, then Block.call_with_cache for
    one more position per row: each row's outputs are the NumPy block's over
    its own tokens, and the cache holds each position's keys and values."""
    d, h, k, f, slots = 6, 2, 3, 10, 16
    block = Block(d, h, k, f, rate=0.5, seed=9)
    _randomise(block, seed=11)
    rng = np.random.default_rng(12)
    lengths = [4, 2]
    seqs = [rng.normal(size=(n + 1, d)).astype(np.float32) for n in lengths]  # each prompt and one more position
    c = max(lengths)
    x = np.zeros((2, c, d), np.float32)
    for i, (n, s) in enumerate(zip(lengths, seqs)):
        x[i, :n] = s[:n]
    weights = block.decode_weights()
    out, cache = block.prefill(tf.constant(x.reshape(-1, d)), weights, prefill_span(2, c, slots))
    out = out.numpy().reshape(2, c, d)
    new = np.stack([s[-1] for s in seqs])  # [B, D]
    last, (k_cache, v_cache) = block.call_with_cache(
        tf.constant(new), cache, weights, _cache_step(lengths, h, slots, k)
    )

    attn = block.attn
    for i, (n, s) in enumerate(zip(lengths, seqs)):
        s64 = s.astype(np.float64)[None]  # [1, n + 1, D]
        a = np_layer_norm(
            s64 + np_causal_attention(s64, *_mha_weights(attn)), _np(block.ln1.gamma), _np(block.ln1.beta)
        )
        f_out = np_ffn(a, _np(block.ffn.fc1.w), _np(block.ffn.fc1.b), _np(block.ffn.fc2.w), _np(block.ffn.fc2.b))
        want = np_layer_norm(a + f_out, _np(block.ln2.gamma), _np(block.ln2.beta))[0]  # [n + 1, D]
        np.testing.assert_allclose(out[i, :n], want[:n], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(last.numpy()[i], want[n], rtol=1e-4, atol=1e-5)
        keys = np.einsum("td,dhk->htk", s64[0], _np(attn.wk)) + _np(attn.bk)[:, None]  # [H, n + 1, K]
        values = np.einsum("td,dhk->htk", s64[0], _np(attn.wv)) + _np(attn.bv)[:, None]
        for cached, want_kv in ((k_cache, keys), (v_cache, values)):
            got = cached.numpy().reshape(2, h, slots, k)[i]
            np.testing.assert_allclose(got[:, : n + 1], want_kv, rtol=1e-5, atol=1e-5)
            assert not got[:, c + 1 :].any()  # slots past the prompts and the step are never written


def test_attention_first_position_ignores_the_rest():
    """Position 0 only sees itself: its output is v_0 projected by wo."""
    d, h, k = 4, 2, 3
    mha = MultiHeadAttention(d, h, k, seed=1)
    _randomise(mha, seed=2)
    x = np.random.default_rng(4).normal(size=(1, 3, d)).astype(np.float32)
    wq, bq, wk, bk, wv, bv, wo, bo = _mha_weights(mha)
    v0 = np.einsum("d,dhk->hk", x[0, 0].astype(np.float64), wv) + bv
    expected = np.einsum("hk,hkd->d", v0, wo) + bo
    np.testing.assert_allclose(mha(tf.constant(x)).numpy()[0, 0], expected, rtol=1e-5, atol=1e-5)


def test_feed_forward_matches_numpy():
    """FeedForward is relu(x w1 + b1) w2 + b2."""
    ffn = FeedForward(5, 8, seed=7)
    _randomise(ffn, seed=8)
    x = np.random.default_rng(5).normal(size=(2, 3, 5)).astype(np.float32)
    ref = np_ffn(x.astype(np.float64), _np(ffn.fc1.w), _np(ffn.fc1.b), _np(ffn.fc2.w), _np(ffn.fc2.b))
    np.testing.assert_allclose(ffn(tf.constant(x)).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_block_matches_numpy():
    """Post-norm block: a = LN1(x + attn(x)); y = LN2(a + ffn(a))."""
    d, h, k, f = 6, 2, 3, 10
    block = Block(d, h, k, f, rate=0.5, seed=9)
    _randomise(block, seed=10)
    x = np.random.default_rng(6).normal(size=(2, 4, d)).astype(np.float32)
    y = block(tf.constant(x), training=False).numpy()

    x64 = x.astype(np.float64)
    attn = np_causal_attention(x64, *_mha_weights(block.attn))
    a = np_layer_norm(x64 + attn, _np(block.ln1.gamma), _np(block.ln1.beta))
    f_out = np_ffn(a, _np(block.ffn.fc1.w), _np(block.ffn.fc1.b), _np(block.ffn.fc2.w), _np(block.ffn.fc2.b))
    ref = np_layer_norm(a + f_out, _np(block.ln2.gamma), _np(block.ln2.beta))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_dropout_same_seed_same_mask():
    """Stateless dropout repeats for one seed and changes with another."""
    x = tf.ones([64, 64])
    a = dropout(x, 0.3, tf.constant([7, 1]), training=True).numpy()
    b = dropout(x, 0.3, tf.constant([7, 1]), training=True).numpy()
    c = dropout(x, 0.3, tf.constant([8, 1]), training=True).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a == 0, c == 0)


def test_dropout_rate_and_scaling():
    """About `rate` of the units are zeroed; the survivors are scaled by 1/(1-rate)."""
    rate = 0.25
    y = dropout(tf.ones([100, 100]), rate, tf.constant([3, 5]), training=True).numpy()
    zeros = np.mean(y == 0)
    # 10,000 Bernoulli draws: the standard deviation of the fraction is ~0.0043.
    assert abs(zeros - rate) < 0.03
    np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - rate), rtol=1e-6)


def test_dropout_off_is_identity():
    """training=False (or rate 0) returns the input unchanged."""
    x = tf.constant(np.random.default_rng(8).normal(size=(5, 6)).astype(np.float32))
    np.testing.assert_array_equal(dropout(x, 0.5, tf.constant([1, 1]), training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(dropout(x, 0.0, tf.constant([1, 1]), training=True).numpy(), x.numpy())


def test_dense_bfloat16_close_to_float32():
    """A bfloat16 Dense keeps float32 variables and output, near the float32 result."""
    layer16 = Dense(32, 8, seed=11, compute_dtype=tf.bfloat16)
    layer32 = Dense(32, 8, seed=11)
    _randomise(layer16, seed=12)
    _randomise(layer32, seed=12)
    assert layer16.w.dtype == tf.float32 and layer16.b.dtype == tf.float32
    x = np.random.default_rng(9).normal(size=(4, 32)).astype(np.float32)
    y16 = layer16(tf.constant(x))
    assert y16.dtype == tf.float32
    y32 = layer32(tf.constant(x)).numpy()
    ref = np_dense(x.astype(np.float64), _np(layer32.w), _np(layer32.b))
    np.testing.assert_allclose(y32, ref, rtol=1e-5, atol=1e-5)
    # bfloat16 keeps 8 significant bits: each input/weight rounding is <= 2^-8
    # relative, so the error is bounded by a few 2^-8 of sum |x| |w|.
    bound = 3 * 2.0**-8 * (np.abs(x) @ np.abs(layer32.w.numpy())) + 1e-6
    err = np.abs(y16.numpy() - ref)
    assert np.all(err <= bound)
    # ... and the products really did run in bfloat16.
    assert err.max() > 1e-5


def test_attention_bfloat16_keeps_float32_variables():
    """bfloat16 attention: float32 variables and output, close to float32."""
    mha16 = MultiHeadAttention(8, 2, 4, seed=13, compute_dtype=tf.bfloat16)
    assert all(v.dtype == tf.float32 for v in mha16.trainable_variables)
    mha32 = MultiHeadAttention(8, 2, 4, seed=13)
    x = tf.constant(np.random.default_rng(10).normal(size=(1, 5, 8)).astype(np.float32))
    y16 = mha16(x)
    assert y16.dtype == tf.float32
    np.testing.assert_allclose(y16.numpy(), mha32(x).numpy(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_inside_tf_function_matches_eager(rate):
    """The stateless mask is the same in a tf.function as eagerly."""
    x = tf.ones([16, 16])
    seed = tf.constant([4, 2])
    eager = dropout(x, rate, seed, training=True)
    graph = tf.function(lambda t, s: dropout(t, rate, s, training=True))(x, seed)
    np.testing.assert_array_equal(eager.numpy(), graph.numpy())
