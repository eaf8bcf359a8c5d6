"""Optimiser, clipping and schedule checks against NumPy references."""

import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import NumpyAdam

from tfgpt.train.optim import Adam, clip_scale, make_schedule


def _problem(seed=0, steps=5):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=(3, 4)), rng.normal(size=(5,))]
    # Gradients of varying sign and scale, tiny ones included, so eps matters.
    grads = [
        [rng.normal(size=p.shape) * 10.0 ** rng.integers(-6, 2, size=p.shape) for p in params] for _ in range(steps)
    ]
    return params, grads


def _f32(xs):
    return [np.asarray(x, np.float32) for x in xs]


def _run_numpy(params, grads, lrs=None, **hp):
    opt = NumpyAdam(params, **hp)
    cur = [p.astype(np.float64) for p in params]
    for i, g in enumerate(grads):
        cur = opt.step(cur, [x.astype(np.float32).astype(np.float64) for x in g], lr=None if lrs is None else lrs[i])
    return cur, opt


def test_adam_matches_numpy_eager():
    """Five Adam steps with default hyper-parameters equal the NumPy version."""
    params, grads = _problem()
    variables = [tf.Variable(p) for p in _f32(params)]
    opt = Adam(variables)
    for g in grads:
        lr = opt.apply([tf.constant(x) for x in _f32(g)], variables)
        assert float(lr) == pytest.approx(1e-3)
    want, ref = _run_numpy(_f32(params), grads)
    assert int(opt.step.numpy()) == len(grads)
    for var, w, m, v, mr, vr in zip(variables, want, opt.m, opt.v, ref.m, ref.v):
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m.numpy(), mr, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(v.numpy(), vr, rtol=1e-5, atol=1e-20)
    # The parameters did move by a non-trivial amount.
    assert np.abs(variables[0].numpy() - _f32(params)[0]).max() > 1e-3


def test_adam_matches_numpy_in_tf_function():
    """The same updates happen when apply() runs inside a tf.function."""
    params, grads = _problem(seed=1)
    variables = [tf.Variable(p) for p in _f32(params)]
    opt = Adam(variables, lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6)

    @tf.function
    def step(g0, g1):
        return opt.apply([g0, g1], variables)

    for g in grads:
        step(*[tf.constant(x) for x in _f32(g)])
    want, _ = _run_numpy(_f32(params), grads, lr=1e-2, b1=0.8, b2=0.99, eps=1e-6)
    for var, w in zip(variables, want):
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-6, atol=1e-7)
    assert int(opt.step.numpy()) == len(grads)


def test_adam_default_hyperparameters_in_tf_function():
    """Defaults (1e-3, 0.9, 0.999, 1e-7) inside a tf.function match NumPy."""
    params, grads = _problem(seed=2)
    variables = [tf.Variable(p) for p in _f32(params)]
    opt = Adam(variables)
    assert (opt.lr, opt.beta1, opt.beta2, opt.eps) == (1e-3, 0.9, 0.999, 1e-7)
    step = tf.function(lambda g: opt.apply(g, variables))
    for g in grads:
        step([tf.constant(x) for x in _f32(g)])
    want, _ = _run_numpy(_f32(params), grads)
    for var, w in zip(variables, want):
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-6, atol=1e-7)


def test_adam_with_schedule_uses_one_based_step():
    """A callable lr is evaluated at the 1-based update number."""
    params, grads = _problem(seed=3, steps=4)
    variables = [tf.Variable(p) for p in _f32(params)]
    sched = make_schedule("constant", 0.01, warmup_steps=4)
    opt = Adam(variables, lr=sched)
    used = [float(opt.apply([tf.constant(x) for x in _f32(g)], variables)) for g in grads]
    lrs = [0.01 * s / 4 for s in range(1, 5)]
    np.testing.assert_allclose(used, lrs, rtol=1e-6)
    want, _ = _run_numpy(_f32(params), grads, lrs=lrs)
    for var, w in zip(variables, want):
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-6, atol=1e-7)


def _np_global_norm(grads):
    return math.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in grads))


def test_adam_scale_multiplies_the_gradients():
    """apply(grads, scale=s) makes the update NumPy makes for grads * s, in a tf.function too."""
    params, grads = _problem(seed=4)
    scales = [0.5, 2.0, 1e-3, 7.0, 1.0]
    want, _ = _run_numpy(_f32(params), [[g * s for g in gs] for gs, s in zip(grads, scales)])
    for graph in (False, True):
        variables = [tf.Variable(p) for p in _f32(params)]
        opt = Adam(variables)

        def step(g, s, opt=opt, variables=variables):
            return opt.apply(g, variables, s)

        step = tf.function(step) if graph else step
        for g, sc in zip(grads, scales):
            step([tf.constant(x) for x in _f32(g)], tf.constant(sc))
        for var, w in zip(variables, want):
            np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_adam_where_false_changes_nothing_without_a_conditional(jit):
    """apply(where=False) with Inf and NaN gradients leaves weights, slots and
    step as they were; where=True is the plain update (NumPy). Also under XLA."""
    params, grads = _problem(seed=5, steps=2)
    variables = [tf.Variable(p) for p in _f32(params)]
    opt = Adam(variables)
    step = tf.function(lambda g, ok: opt.apply(g, variables, tf.constant(1.0), where=ok), jit_compile=jit)
    step([tf.constant(x) for x in _f32(grads[0])], tf.constant(True))
    snapshot = [v.numpy() for v in variables + opt.m + opt.v]
    bad = [np.full(p.shape, np.inf, np.float32) for p in params]
    bad[1][0] = np.nan
    step([tf.constant(x) for x in bad], tf.constant(False))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(snapshot, variables + opt.m + opt.v))
    assert int(opt.step.numpy()) == 1
    step([tf.constant(x) for x in _f32(grads[1])], tf.constant(True))
    want, _ = _run_numpy(_f32(params), grads)
    for var, w in zip(variables, want):
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
    assert int(opt.step.numpy()) == 2


def test_adamw_decays_matrices_not_vectors():
    """Decoupled weight decay: each step first w -= lr * wd * w for matrices
    (rank >= 2), then the plain Adam step; vectors (biases, norms) undecayed."""
    params, grads = _problem(seed=6, steps=4)
    lr, wd = 1e-2, 0.1
    variables = [tf.Variable(p) for p in _f32(params)]
    opt = Adam(variables, lr=lr, weight_decay=wd)
    step = tf.function(lambda g: opt.apply(g, variables))
    numpy_opt = NumpyAdam(params, lr=lr)
    want = [p.astype(np.float64) for p in params]
    for g in grads:
        step([tf.constant(x) for x in _f32(g)])
        decayed = [p * (1 - np.float32(lr) * np.float32(wd)) if p.ndim >= 2 else p for p in want]
        want = numpy_opt.step(decayed, [x.astype(np.float32).astype(np.float64) for x in g])
    for var, w in zip(variables, want):
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
    plain = _run_numpy(_f32(params), grads, lr=lr)[0]
    assert np.abs(variables[0].numpy() - plain[0]).max() > 1e-4  # the matrix was decayed
    np.testing.assert_allclose(variables[1].numpy(), plain[1], rtol=1e-5, atol=1e-6)  # the vector was not


@pytest.mark.parametrize("graph", [False, True])
def test_per_occurrence_rows_follow_their_formula(graph):
    """A table updated with per-occurrence second moments: m is the EMA of the
    summed gradient, v the EMA of the summed squares of the per-occurrence
    gradients, the step lr_t m / (sqrt(v) + eps) (NumPy, float64); the other
    variable gets plain Adam; where=False changes nothing."""
    rng = np.random.default_rng(7)
    table, other = rng.normal(size=(5, 3)), rng.normal(size=(4,))
    variables = [tf.Variable(table.astype(np.float32)), tf.Variable(other.astype(np.float32))]
    opt = Adam(variables, lr=1e-2)

    def step(g, sq, ok):
        return opt.apply(g, variables, tf.constant(0.5), where=ok, rows={0: sq})

    step = tf.function(step) if graph else step
    m, v, want, numpy_other = np.zeros_like(table), np.zeros_like(table), table.copy(), NumpyAdam([other], lr=1e-2)
    want_other = other.copy()
    b1, b2, eps, lr = (float(np.float32(x)) for x in (0.9, 0.999, 1e-7, 1e-2))
    for t in range(1, 4):
        ids = rng.integers(0, 4, size=9)  # row 4 never occurs; rows repeat
        per_occurrence = rng.normal(size=(9, 3)) * 0.5  # already times the scale below
        g = np.zeros_like(table)
        sq = np.zeros_like(table)
        np.add.at(g, ids, per_occurrence)
        np.add.at(sq, ids, per_occurrence**2)
        g_other = rng.normal(size=(4,))
        step(
            [tf.constant((g / 0.5).astype(np.float32)), tf.constant(g_other.astype(np.float32))],
            tf.constant((sq / 0.25).astype(np.float32)),
            tf.constant(True),
        )
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * sq
        want = want - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
        want_other = numpy_other.step([want_other], [g_other.astype(np.float32).astype(np.float64) * 0.5])[0]
        np.testing.assert_allclose(variables[0].numpy(), want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(variables[1].numpy(), want_other, rtol=1e-4, atol=1e-6)
    # The per-occurrence squares differ from the squared sums: dense Adam would have moved otherwise.
    assert np.abs(sq - g**2).max() > 1e-2
    before = [x.numpy() for x in variables + opt.m + opt.v]
    step([tf.fill([5, 3], np.inf), tf.zeros([4])], tf.fill([5, 3], np.nan), tf.constant(False))
    assert all(np.array_equal(a, x.numpy()) for a, x in zip(before, variables + opt.m + opt.v))


def test_clip_scale_clips_the_mean_when_above():
    """Above the threshold the scale is clip / norm over the divisor, with norm
    that of the divided gradients; the scaled gradients then have norm clip."""
    rng = np.random.default_rng(0)
    grads = _f32([rng.normal(size=(3, 2)) * 40, rng.normal(size=(4,)) * 40])
    norm = _np_global_norm(grads) / 10.0
    assert norm > 2.0
    scale, got_norm = clip_scale([tf.constant(g) for g in grads], 2.0, divisor=10.0)
    assert float(got_norm) == pytest.approx(norm, rel=1e-6)
    assert float(scale) == pytest.approx(2.0 / norm / 10.0, rel=1e-6)
    assert _np_global_norm([g * float(scale) for g in grads]) == pytest.approx(2.0, rel=1e-5)


def test_clip_scale_leaves_small_gradients():
    """At or below the threshold, or without clipping, the scale is 1 / divisor."""
    grads = [tf.constant([3.0, 0.0]), tf.constant([[4.0]])]  # global norm 5
    for clip in (10.0, None, 0.0):
        scale, norm = clip_scale(grads, clip)
        assert float(norm) == pytest.approx(5.0)
        assert float(scale) == 1.0
    scale, norm = clip_scale(grads, 10.0, divisor=tf.constant(4.0))
    assert (float(scale), float(norm)) == (pytest.approx(0.25), pytest.approx(1.25))


def test_clip_scale_zero_gradients():
    """All-zero gradients give a finite scale and norm 0."""
    scale, norm = clip_scale([tf.zeros([3]), tf.zeros([2, 2])], 1.0)
    assert float(norm) == 0.0
    assert float(scale) == 1.0


def test_clip_scale_in_tf_function():
    """Clipping gives the same numbers inside a tf.function."""
    grads = [tf.constant([6.0, 8.0]), tf.constant([[0.0]])]  # norm 10
    scale, norm = tf.function(lambda g: clip_scale(g, 5.0, divisor=2.0))(grads)
    assert float(norm) == pytest.approx(5.0)
    assert float(scale) == pytest.approx(0.5)
    scale, norm = tf.function(lambda g: clip_scale(g, 4.0, divisor=2.0))(grads)
    assert float(scale) == pytest.approx(0.4)


def test_constant_schedule_is_the_float():
    """'constant' without warm-up returns the learning rate itself."""
    out = make_schedule("constant", 3e-4)
    assert isinstance(out, float) and out == 3e-4


def test_constant_schedule_with_warmup_ramps_linearly():
    """Warm-up rises as lr * step / warmup, then stays at lr."""
    sched = make_schedule("constant", 0.5, warmup_steps=4)
    got = [float(sched(tf.constant(s, tf.int64))) for s in range(0, 9)]
    want = [0.5 * min(1.0, s / 4) for s in range(0, 9)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def _np_cosine(step, lr, warmup, total):
    warm = min(1.0, step / warmup) if warmup else 1.0
    frac = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
    return lr * warm * 0.5 * (1.0 + math.cos(math.pi * frac))


@pytest.mark.parametrize("warmup", [0, 10])
def test_cosine_schedule_closed_form(warmup):
    """Cosine: linear warm-up, half-cosine decay to exactly 0 at total_steps."""
    lr, total = 2e-3, 100
    sched = make_schedule("cosine", lr, warmup_steps=warmup, total_steps=total)
    for s in [1, 5, 10, 11, 37, 55, 90, 99, 100, 150]:
        assert float(sched(tf.constant(s))) == pytest.approx(_np_cosine(s, lr, warmup, total), rel=1e-5, abs=1e-9), s
    assert float(sched(tf.constant(total))) == pytest.approx(0.0, abs=1e-9)
    if warmup:
        assert float(sched(tf.constant(warmup))) == pytest.approx(lr, rel=1e-6)
        assert float(sched(tf.constant(warmup // 2))) == pytest.approx(lr / 2, rel=1e-6)
    # Monotone decay after warm-up.
    tail = [float(sched(tf.constant(s))) for s in range(warmup, total + 1, 5)]
    assert all(a >= b for a, b in zip(tail, tail[1:]))


def test_schedule_in_tf_function():
    """A schedule evaluated on a tensor step inside a tf.function gives the same value."""
    sched = make_schedule("cosine", 1.0, warmup_steps=2, total_steps=10)
    got = tf.function(sched)(tf.constant(6, tf.int64))
    assert float(got) == pytest.approx(_np_cosine(6, 1.0, 2, 10), rel=1e-6)


@pytest.mark.parametrize("name", ["linear", "Cosine", "", "exp"])
def test_unknown_schedule_raises(name):
    """Names other than constant and cosine are refused."""
    with pytest.raises(ValueError):
        make_schedule(name, 1e-3, warmup_steps=1, total_steps=10)


def test_cosine_needs_total_steps():
    """Cosine without total_steps is refused."""
    with pytest.raises(ValueError):
        make_schedule("cosine", 1e-3)
