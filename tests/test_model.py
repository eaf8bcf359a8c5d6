"""Model checks: size, causality, graph/XLA equivalence, seeded
initialisation, and the variables' checkpoint names. The loss is
tests/test_loss.py; attention and the cache are tests/test_attention.py
and tests/test_decode.py."""

import dataclasses

import numpy as np
import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.model.gpt import GPT, count_params

TINY = GPTConfig(vocab_size=23, maxlen=8, embed_dim=8, num_heads=2, ff_dim=12, num_layers=2, dropout=0.0, head_dim=4)


def _tiny(seed=0, **overrides):
    return GPT(dataclasses.replace(TINY, **overrides), seed=seed)


def _ids(shape, vocab, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(0, vocab, size=shape), dtype=tf.int32)


# --- size and initialisation ------------------------------------------------------


def test_default_parameter_count():
    """The default config has the Keras example's 10,939,168 parameters."""
    assert count_params(GPT(GPTConfig())) == 10_939_168


def test_parameter_count_formula():
    """count_params agrees with the count worked out by hand for a tiny config."""
    c = TINY
    d, hk, f, v, L = c.embed_dim, c.num_heads * c.key_dim, c.ff_dim, c.vocab_size, c.num_layers
    attn = 3 * (d * hk + hk) + hk * d + d
    ffn = d * f + f + f * d + d
    block = attn + ffn + 4 * d
    expected = v * d + c.maxlen * d + L * block + d * v + v
    assert count_params(_tiny()) == expected


def test_init_deterministic_per_seed():
    """Same seed -> identical weights; another seed -> different random weights."""
    a, b, c = _tiny(seed=3), _tiny(seed=3), _tiny(seed=4)
    names = [v.name for v in a.trainable_variables]
    assert names == [v.name for v in c.trainable_variables]
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    random_ones = 0
    for va, vc in zip(a.trainable_variables, c.trainable_variables):
        x = va.numpy()
        if np.all(x == x.flat[0]):  # biases (zeros) and gains (ones)
            np.testing.assert_array_equal(x, vc.numpy())
            continue
        random_ones += 1
        assert not np.allclose(x, vc.numpy()), va.name
    # token/pos embeddings, head, and per block wq, wk, wv, wo, fc1, fc2
    assert random_ones == 3 + 6 * TINY.num_layers


def test_init_weights_distinct_within_model():
    """No two random weight tensors of one model start from the same numbers."""
    m = _tiny(seed=0)
    seen = []
    for v in m.trainable_variables:
        x = v.numpy().ravel()
        if np.all(x == x[0]):
            continue
        head = x[:8]
        assert not any(np.allclose(head, s) for s in seen), v.name
        seen.append(head)


# --- forward pass -------------------------------------------------------------------


def test_logits_shape_and_dtype():
    """ids [B, T] -> float32 logits [B, T, V]."""
    m = _tiny()
    out = m(_ids((3, 5), TINY.vocab_size))
    assert out.shape == (3, 5, TINY.vocab_size)
    assert out.dtype == tf.float32


def test_causality():
    """Changing tokens after position t leaves logits at <= t untouched."""
    m = _tiny(seed=1)
    t = 3
    ids = _ids((2, TINY.maxlen), TINY.vocab_size, seed=1).numpy()
    other = ids.copy()
    other[:, t + 1 :] = (other[:, t + 1 :] + 1 + np.arange(TINY.maxlen - t - 1)) % TINY.vocab_size
    a = m(tf.constant(ids)).numpy()
    b = m(tf.constant(other)).numpy()
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-4


def test_tf_function_and_xla_match_eager():
    """Eager, tf.function and XLA-compiled forward passes agree."""
    m = _tiny(seed=2)
    ids = _ids((2, 6), TINY.vocab_size, seed=2)
    eager = m(ids).numpy()
    graph = tf.function(lambda x: m(x))(ids).numpy()
    xla = tf.function(lambda x: m(x), jit_compile=True)(ids).numpy()
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xla, eager, rtol=1e-5, atol=1e-5)


# --- checkpoint layout ----------------------------------------------------------------


def test_checkpoint_keys_are_the_layer_paths(tmp_path):
    """A written checkpoint names every variable by its layer path, so that
    checkpoints of earlier runs keep restoring; and it restores into a model
    of another seed, which then gives the same logits."""
    m = _tiny(seed=4, num_layers=1)
    path = tf.train.Checkpoint(model=m).write(str(tmp_path / "ckpt"))
    keys = sorted(name for name, _ in tf.train.list_variables(path) if name != "_CHECKPOINTABLE_OBJECT_GRAPH")
    attn = [f"blocks/0/attn/{v}" for v in ("bk", "bo", "bq", "bv", "wk", "wo", "wq", "wv")]
    ffn = [f"blocks/0/ffn/{layer}/{v}" for layer in ("fc1", "fc2") for v in ("b", "w")]
    norms = [f"blocks/0/{ln}/{v}" for ln in ("ln1", "ln2") for v in ("beta", "gamma")]
    rest = ["head/b", "head/w", "pos_emb/table", "token_emb/table"]
    assert keys == [f"model/{k}/.ATTRIBUTES/VARIABLE_VALUE" for k in attn + ffn + norms + rest]
    other = _tiny(seed=5, num_layers=1)
    ids = _ids((2, 6), TINY.vocab_size, seed=3)
    assert not np.allclose(other(ids).numpy(), m(ids).numpy())
    tf.train.Checkpoint(model=other).read(path).assert_consumed()
    np.testing.assert_array_equal(other(ids).numpy(), m(ids).numpy())
