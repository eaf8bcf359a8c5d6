"""Loss checks (tfgpt.model.loss): the chunked cross-entropy sum and its
gradients against NumPy and against tf.GradientTape of a plain
sparse-softmax cross-entropy, chunked against unchunked, bfloat16, targets
whose probability underflows float32, label smoothing, row weights, the
model's `loss_sum`, and the per-token log-probability `score` uses."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.model.gpt import GPT, count_params
from tfgpt.model.loss import auto_chunk, chunked_xent_sum, token_log_probs

TINY = GPTConfig(vocab_size=23, maxlen=8, embed_dim=8, num_heads=2, ff_dim=12, num_layers=2, dropout=0.0, head_dim=4)


def _tiny(seed=0, **overrides):
    return GPT(dataclasses.replace(TINY, **overrides), seed=seed)


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_xent_sum(logits, targets, weights):
    """sum_i weights[i] * -log softmax(logits[i])[targets[i]], in float64."""
    lp = np_log_softmax(logits.astype(np.float64))
    picked = np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    return float(np.sum(weights * -picked))


def np_xent_grads(h, w, b, targets, weights):
    """Gradients of np_xent_sum(h w + b) w.r.t. h, w, b: (softmax - onehot) rule."""
    logits = h @ w + b
    p = np.exp(np_log_softmax(logits))
    g = p - np.eye(w.shape[1])[targets]
    g *= weights[:, None]
    return g @ w.T, h.T @ g, g.sum(axis=0)


def _loss_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.vocab_size, size=(2, 5)).astype(np.int32)
    targets = rng.integers(0, TINY.vocab_size, size=(2, 5)).astype(np.int32)
    weights = np.ones((2, 5), np.float32)
    weights[0, 3:] = 0.0
    weights[1, 4:] = 0.0
    weights[1, 0] = 0.5
    return ids, targets, weights


@pytest.mark.parametrize("chunk", [0, 1, 5, 10])
def test_loss_sum_matches_numpy(chunk):
    """loss_sum == sum(weights * CE) from the model's own logits."""
    m = _tiny(seed=5)
    ids, targets, weights = _loss_batch()
    logits = m(tf.constant(ids)).numpy()
    expected = np_xent_sum(logits, targets, weights)
    got = m.loss_sum(tf.constant(ids), tf.constant(targets), tf.constant(weights), chunk=chunk)
    assert got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-5)


def _loss_and_grads(m, ids, targets, weights, chunk=0):
    with tf.GradientTape() as tape:
        loss = m.loss_sum(tf.constant(ids), tf.constant(targets), tf.constant(weights), chunk=chunk)
    grads = tape.gradient(loss, m.trainable_variables)
    return float(loss), grads


def test_padding_targets_do_not_matter():
    """Targets under weight 0 change neither the loss nor any gradient."""
    m = _tiny(seed=6)
    ids, targets, weights = _loss_batch(seed=1)
    other = targets.copy()
    other[weights == 0] = (other[weights == 0] + 7) % TINY.vocab_size
    assert not np.array_equal(other, targets)
    l1, g1 = _loss_and_grads(m, ids, targets, weights, chunk=5)
    l2, g2 = _loss_and_grads(m, ids, other, weights, chunk=5)
    assert l1 == pytest.approx(l2, rel=1e-6)
    for v, a, b in zip(m.trainable_variables, g1, g2):
        assert a is not None, v.name
        np.testing.assert_allclose(
            tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(), rtol=1e-6, atol=1e-7, err_msg=v.name
        )
    # ... while a weighted target does change it.
    changed = targets.copy()
    changed[0, 0] = (changed[0, 0] + 1) % TINY.vocab_size
    l3, _ = _loss_and_grads(m, ids, changed, weights, chunk=5)
    assert abs(l3 - l1) > 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_loss_sum_gradients_match_plain_xent(tied):
    """Gradients of loss_sum w.r.t. every variable equal those of a plain
    sparse-softmax cross-entropy on the full logits; with tied embeddings the
    token table gets both its input and its output share, and the logits are
    hidden @ table^T + b."""
    m = _tiny(seed=7, tie_embeddings=tied)
    if tied:
        assert count_params(m) == count_params(_tiny()) - TINY.embed_dim * TINY.vocab_size
        ids = tf.constant(_loss_batch(seed=2)[0])
        want_logits = tf.matmul(m.hidden(ids), m.token_emb.table, transpose_b=True) + m.head.b
        np.testing.assert_allclose(m(ids).numpy(), want_logits.numpy(), rtol=1e-5, atol=1e-6)
    ids, targets, weights = _loss_batch(seed=2)
    _, got = _loss_and_grads(m, ids, targets, weights, chunk=2)
    with tf.GradientTape() as tape:
        logits = m(tf.constant(ids))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.constant(targets), logits=logits)
        ref_loss = tf.reduce_sum(ce * weights)
    want = tape.gradient(ref_loss, m.trainable_variables)
    for v, a, b in zip(m.trainable_variables, got, want):
        np.testing.assert_allclose(
            tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(), rtol=1e-4, atol=1e-5, err_msg=v.name
        )


def _xent_inputs(n=12, d=5, v=7, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    b = rng.normal(size=(v,)).astype(np.float32)
    targets = rng.integers(0, v, size=n).astype(np.int32)
    weights = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
    weights[[2, n - 1]] = 0.0
    return h, w, b, targets, weights


@pytest.mark.parametrize("chunk", [1, 3, 4, 12, 0])
def test_chunked_xent_value_and_grads(chunk):
    """Every chunk size gives the unchunked value and gradients (NumPy and tape)."""
    h, w, b, targets, weights = _xent_inputs()
    th, tw, tb = tf.constant(h), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([th, tw, tb])
        loss = chunked_xent_sum(th, tw, tb, tf.constant(targets), tf.constant(weights), chunk=chunk)
    got = tape.gradient(loss, [th, tw, tb])

    h64, w64, b64 = h.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(float(loss), np_xent_sum(h64 @ w64 + b64, targets, weights), rtol=1e-5, atol=1e-5)
    for g, ref in zip(got, np_xent_grads(h64, w64, b64, targets, weights.astype(np.float64))):
        np.testing.assert_allclose(g.numpy(), ref, rtol=1e-5, atol=1e-5)

    with tf.GradientTape() as tape:
        tape.watch([th, tw, tb])
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.constant(targets), logits=tf.matmul(th, tw) + tb)
        plain = tf.reduce_sum(ce * weights)
    want = tape.gradient(plain, [th, tw, tb])
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-5, atol=1e-5)
    for g, ref in zip(got, want):
        np.testing.assert_allclose(g.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 12])
def test_chunked_xent_bfloat16_near_float64(chunk):
    """bfloat16 products give the float64 value and gradients to bfloat16 accuracy."""
    h, w, b, targets, weights = _xent_inputs(n=12, d=5, v=7, seed=3)
    th, tw, tb = tf.constant(h), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([th, tw, tb])
        loss = chunked_xent_sum(
            th, tw, tb, tf.constant(targets), tf.constant(weights), chunk=chunk, compute_dtype=tf.bfloat16
        )
    got = tape.gradient(loss, [th, tw, tb])
    h64, w64, b64 = h.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    # Each product rounds its inputs to 8 significant bits (relative error <= 2^-8).
    np.testing.assert_allclose(float(loss), np_xent_sum(h64 @ w64 + b64, targets, weights), rtol=2e-2)
    for g, ref in zip(got, np_xent_grads(h64, w64, b64, targets, weights.astype(np.float64))):
        assert g.shape == ref.shape
        np.testing.assert_allclose(g.numpy(), ref, rtol=0, atol=3e-2 * np.abs(ref).max())


@pytest.mark.parametrize("branch_free", [False, True])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_chunked_xent_target_probability_below_float32_range(dtype, branch_free):
    """A weighted target whose probability underflows float32 (its logit 200
    below the others) still gets its exact loss, about 200, in the blocks that
    hold one; a padding row with such a target adds nothing and no NaN. The
    same with the branch-free form (a per-row select instead of a tf.cond)."""
    h, w, b, targets, weights = _xent_inputs(n=12, d=5, v=7, seed=4)
    h, w = h * 0.1, w * 0.1
    b = np.zeros(7, np.float32)
    b[3] = -200.0
    targets[:] = [3, 0, 3, 1, 3, 2, 4, 5, 6, 0, 1, 2]
    weights[:] = 1.0
    weights[4] = 0.0  # padding in the second block of 3: that block needs no exact value
    th, tw, tb = tf.constant(h), tf.constant(w), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([th, tw, tb])
        loss = chunked_xent_sum(
            th,
            tw,
            tb,
            tf.constant(targets),
            tf.constant(weights),
            chunk=3,
            compute_dtype=dtype,
            branch_free=branch_free,
        )
    got = tape.gradient(loss, [th, tw, tb])
    h64, w64, b64 = h.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    want = np_xent_sum(h64 @ w64 + b64, targets, weights)
    assert want > 400  # two weighted rows of about 200 each
    rtol = 1e-6 if dtype == tf.float32 else 1e-2
    np.testing.assert_allclose(float(loss), want, rtol=rtol)
    for g, ref in zip(got, np_xent_grads(h64, w64, b64, targets, weights.astype(np.float64))):
        atol = (1e-5 if dtype == tf.float32 else 3e-2) * np.abs(ref).max()
        np.testing.assert_allclose(g.numpy(), ref, rtol=0, atol=atol)
    evaluated = chunked_xent_sum(
        th,
        tw,
        tb,
        tf.constant(targets),
        tf.constant(weights),
        chunk=3,
        compute_dtype=dtype,
        with_grad=False,
        branch_free=branch_free,
    )
    np.testing.assert_allclose(float(evaluated), want, rtol=rtol)


def test_chunked_xent_upstream_gradient_and_variables():
    """The gradient scales with the upstream gradient and reaches tf.Variables."""
    h, w, b, targets, weights = _xent_inputs(n=6, seed=1)
    th, vw, vb = tf.constant(h), tf.Variable(w), tf.Variable(b)
    with tf.GradientTape() as tape:
        tape.watch(th)
        loss = 2.5 * chunked_xent_sum(th, vw, vb, tf.constant(targets), tf.constant(weights), chunk=3)
    got = tape.gradient(loss, [th, vw, vb])
    h64, w64, b64, weights64 = (a.astype(np.float64) for a in (h, w, b, weights))
    ref = np_xent_grads(h64, w64, b64, targets, weights64)
    for g, r in zip(got, ref):
        assert g is not None
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), 2.5 * r, rtol=1e-5, atol=1e-5)


def test_chunked_xent_in_tf_function():
    """The chunked loss and its gradients are the same inside a tf.function."""
    h, w, b, targets, weights = _xent_inputs(seed=2)
    args = [tf.constant(a) for a in (h, w, b)]

    def run(th, tw, tb):
        with tf.GradientTape() as tape:
            tape.watch([th, tw, tb])
            loss = chunked_xent_sum(th, tw, tb, tf.constant(targets), tf.constant(weights), chunk=4)
        return loss, tape.gradient(loss, [th, tw, tb])

    l_eager, g_eager = run(*args)
    l_graph, g_graph = tf.function(run)(*args)
    np.testing.assert_allclose(float(l_graph), float(l_eager), rtol=1e-6)
    for a, bb in zip(g_graph, g_eager):
        np.testing.assert_allclose(a.numpy(), bb.numpy(), rtol=1e-5, atol=1e-6)


def test_chunk_must_divide_rows():
    """A chunk that does not divide N is refused."""
    h, w, b, targets, weights = _xent_inputs(n=12)
    with pytest.raises(ValueError):
        chunked_xent_sum(*(tf.constant(a) for a in (h, w, b, targets, weights)), chunk=5)


@pytest.mark.parametrize(
    "n,vocab,budget",
    [
        (12, 7, 64 << 20),
        (640, 20000, 64 << 20),
        (97, 10, 400),
        (10240, 20000, 64 << 20),
        (96, 10, 400),
        (100, 10, 400),
        (10, 10, 400),
        (7, 1000, 100),
    ],
)
def test_auto_chunk_divides_within_budget(n, vocab, budget):
    """auto_chunk returns the largest divisor of n that fits the byte budget."""
    c = auto_chunk(n, vocab, budget)
    assert n % c == 0
    fitting = [d for d in range(1, n + 1) if n % d == 0 and d * vocab * 4 <= budget]
    assert c == (max(fitting) if fitting else 1)


def test_loss_without_gradient_equals_loss_with_it():
    """The evaluation path (no gradient work) gives the training path's value."""
    rng = np.random.default_rng(5)
    h = tf.constant(rng.normal(size=[12, 6]), tf.float32)
    w = tf.constant(rng.normal(size=[6, 9]), tf.float32)
    b = tf.constant(rng.normal(size=[9]), tf.float32)
    targets = tf.constant(rng.integers(0, 9, size=[12]), tf.int32)
    weights = tf.constant(rng.integers(0, 2, size=[12]), tf.float32)
    for chunk in (3, 12):
        a = chunked_xent_sum(h, w, b, targets, weights, chunk=chunk)
        c = chunked_xent_sum(h, w, b, targets, weights, chunk=chunk, with_grad=False)
        np.testing.assert_allclose(float(a), float(c), rtol=1e-6)


def np_smoothed_xent(h, w, b, targets, weights, e):
    """Label-smoothed cross-entropy sum and its gradients, in float64: the
    target distribution (1 - e) one_hot + e / V, by the chain rule written out."""
    logits = h @ w + b
    lp = np_log_softmax(logits)
    q = (1.0 - e) * np.eye(w.shape[1])[targets] + e / w.shape[1]
    loss = float(np.sum(weights * -(q * lp).sum(axis=1)))
    g = (np.exp(lp) - q) * weights[:, None]
    return loss, (g @ w.T, h.T @ g, g.sum(axis=0))


@pytest.mark.parametrize(
    "chunk, dtype, branch_free", [(3, tf.float32, False), (12, tf.float32, True), (4, tf.bfloat16, False)]
)
def test_chunked_xent_label_smoothing(chunk, dtype, branch_free):
    """Label smoothing 0.1: the value and the three gradients against NumPy;
    with_grad=False gives the same value; smoothing 0 is the plain loss."""
    h, w, b, targets, weights = _xent_inputs(n=12, d=5, v=7, seed=6)
    th, tw, tb = tf.constant(h), tf.constant(w), tf.constant(b)
    args = (tf.constant(targets), tf.constant(weights))
    with tf.GradientTape() as tape:
        tape.watch([th, tw, tb])
        loss = chunked_xent_sum(
            th, tw, tb, *args, chunk=chunk, compute_dtype=dtype, branch_free=branch_free, smoothing=0.1
        )
    got = tape.gradient(loss, [th, tw, tb])
    h64, w64, b64 = (x.astype(np.float64) for x in (h, w, b))
    want, grads = np_smoothed_xent(h64, w64, b64, targets, weights.astype(np.float64), 0.1)
    assert abs(want - np_xent_sum(h64 @ w64 + b64, targets, weights)) > 0.05  # smoothing changes the loss
    rtol, atol = (1e-5, 1e-5) if dtype == tf.float32 else (2e-2, 3e-2)
    np.testing.assert_allclose(float(loss), want, rtol=rtol)
    for g, ref in zip(got, grads):
        np.testing.assert_allclose(g.numpy(), ref, rtol=0, atol=atol * np.abs(ref).max())
    evaluated = chunked_xent_sum(th, tw, tb, *args, chunk=chunk, compute_dtype=dtype, with_grad=False, smoothing=0.1)
    np.testing.assert_allclose(float(evaluated), float(loss), rtol=1e-6)


def test_token_log_probs_match_numpy_log_softmax():
    """The per-token log-probability (the one `score` sums) equals a NumPy log
    softmax, also for a target whose probability underflows float32 (its
    logit 200 below the row's others) and for a row of equal logits."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 9)).astype(np.float32) * 3.0
    logits[1, 4] -= 200.0
    logits[3] = 0.5
    targets = np.array([0, 4, 8, 2, 6], np.int32)
    got = token_log_probs(tf.constant(logits), tf.constant(targets)).numpy()
    want = np.take_along_axis(np_log_softmax(logits.astype(np.float64)), targets[:, None], axis=1)[:, 0]
    assert want[1] < -190
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got[3], -np.log(9.0), rtol=1e-6)


@pytest.mark.parametrize("branch_free", [False, True])
def test_branch_free_loss_has_no_conditional_and_compiles(branch_free):
    """branch_free: the loss and its gradient hold no data-dependent
    conditional (the default form holds one per block); compiled by XLA the
    branch-free form gives the NumPy value and gradients."""
    h, w, b, targets, weights = _xent_inputs(seed=8)
    args = [tf.constant(a) for a in (h, w, b)]

    def run(th, tw, tb):
        with tf.GradientTape() as tape:
            tape.watch([th, tw, tb])
            loss = chunked_xent_sum(
                th, tw, tb, tf.constant(targets), tf.constant(weights), chunk=4, branch_free=branch_free
            )
        return loss, tape.gradient(loss, [th, tw, tb])

    graph = tf.function(run).get_concrete_function(*args).graph
    conds = [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]
    assert len(conds) == (0 if branch_free else 3)
    if branch_free:
        loss, grads = tf.function(run, jit_compile=True)(*args)
        h64, w64, b64, weights64 = (a.astype(np.float64) for a in (h, w, b, weights))
        np.testing.assert_allclose(float(loss), np_xent_sum(h64 @ w64 + b64, targets, weights), rtol=1e-5)
        for g, ref in zip(grads, np_xent_grads(h64, w64, b64, targets, weights64)):
            np.testing.assert_allclose(g.numpy(), ref, rtol=1e-5, atol=1e-5)
