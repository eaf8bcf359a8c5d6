"""One training step of tfgpt.train.trainer.Trainer against an independent
computation: TensorFlow's plain cross-entropy and gradient, the global-norm
clip, and Adam in NumPy; the per-token embedding update against its formula.
Several replicas against one device are tests/test_distribute.py."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from helpers import TRAINER_BATCH as BATCH
from helpers import TRAINER_MODEL as MODEL
from helpers import NumpyAdam, make_windows, strategy_for

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.data.windows import eval_dataset, split_window
from tfgpt.train.plan import make_plan
from tfgpt.train.trainer import Trainer


@pytest.mark.parametrize("clip, padding", [(None, "ignore"), (0.05, "ignore"), (None, "count")])
def test_train_step_matches_an_independent_update(tmp_path, clip, padding):
    """One train step (dense Adam for every variable) equals a separate
    computation: TensorFlow's plain sparse cross-entropy averaged over the
    real targets (over every position, padding included, with
    --padding-targets count), tf.clip_by_global_norm, then Adam in NumPy.
    With clip 0.05 the clip is active (the norm is larger)."""
    cfg = TrainConfig(
        batch_size=BATCH,
        epochs=1,
        xla="off",
        lr=3e-3,
        clip_norm=clip,
        precision="float32",
        padding_targets=padding,
        embedding_update="dense",
    )
    trainer = Trainer(GPTConfig(dropout=0.0, **MODEL), cfg, strategy_for(1), tmp_path)
    model, variables = trainer.model, trainer.model.trainable_variables
    before = [v.numpy().astype(np.float64) for v in variables]
    x, y, w = split_window(tf.constant(make_windows(BATCH, seed=3)), "truncate")
    assert 0 < float(tf.reduce_sum(w)) < w.shape.num_elements()  # some padding targets
    if padding == "count":
        w = tf.ones_like(w)
    with tf.GradientTape() as tape:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
        loss = tf.reduce_sum(ce * w) / tf.reduce_sum(w)
    grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
    norm = float(tf.linalg.global_norm(grads))
    if clip:
        assert norm > clip
        grads, _ = tf.clip_by_global_norm(grads, clip)
    real = split_window(tf.constant(make_windows(BATCH, seed=3)), "truncate")[2]
    got_loss, got_norm = trainer.train_step((x, y, real), trainer.step_seed(0))[:2]
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(got_norm), norm, rtol=1e-4)
    want = NumpyAdam(before, lr=3e-3).step(before, [g.numpy().astype(np.float64) for g in grads])
    for v, w_ in zip(variables, want):
        np.testing.assert_allclose(v.numpy(), w_, rtol=1e-5, atol=1e-6, err_msg=v.name)


@pytest.mark.parametrize("replicas", [1, 2])
def test_per_token_embedding_update_matches_its_formula(tmp_path, replicas):
    """--embedding-update per-token, one step: the token table moves by the
    per-occurrence Adam formula computed here from the lookup's own gradient
    (plain cross-entropy, per-occurrence rows summed in NumPy); on 2 replicas
    the squares of both halves of the batch are summed. Other variables get
    dense Adam (checked: the position table)."""
    cfg = TrainConfig(
        batch_size=BATCH,
        epochs=1,
        xla="off",
        lr=3e-3,
        precision="float32",
        embedding_update="per-token",
        padding_targets="ignore",
    )
    trainer = Trainer(GPTConfig(dropout=0.0, **MODEL), cfg, strategy_for(replicas), tmp_path)
    model = trainer.model
    table, pos = model.token_emb.table.numpy().astype(np.float64), model.pos_emb.table.numpy().astype(np.float64)
    windows = make_windows(BATCH, seed=4)
    x, y, w = split_window(tf.constant(windows), "truncate")
    with tf.GradientTape() as tape:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
        loss = tf.reduce_sum(ce * w) / tf.reduce_sum(w)
    g_table, g_pos = tape.gradient(loss, [model.token_emb.table, model.pos_emb.table])
    assert isinstance(g_table, tf.IndexedSlices)
    occ, ids = g_table.values.numpy().astype(np.float64), g_table.indices.numpy()
    summed, squares = np.zeros_like(table), np.zeros_like(table)
    np.add.at(summed, ids, occ)
    np.add.at(squares, ids, occ**2)
    assert np.abs(squares - summed**2).max() > 1e-6 * np.abs(squares).max()  # repeated tokens in the batch
    # The one global batch, cut into the replicas' slices as training cuts it.
    batches = trainer.distribute(lambda ctx: eval_dataset(windows, BATCH, "truncate", ctx))
    trainer.train_steps(iter(batches), tf.constant(1))
    b1, b2, eps, lr = (float(np.float32(z)) for z in (0.9, 0.999, 1e-7, 3e-3))
    lr_t = lr * math.sqrt(1 - b2) / (1 - b1)
    want = table - lr_t * ((1 - b1) * summed) / (np.sqrt((1 - b2) * squares) + eps)
    np.testing.assert_allclose(model.token_emb.table.numpy(), want, rtol=1e-4, atol=1e-6)
    want_pos = NumpyAdam([pos], lr=3e-3).step([pos], [tf.convert_to_tensor(g_pos).numpy().astype(np.float64)])[0]
    np.testing.assert_allclose(model.pos_emb.table.numpy(), want_pos, rtol=1e-4, atol=1e-6)


def test_the_trainer_runs_as_its_plan_says(tmp_path):
    """The trainer takes precision, XLA, steps per call and loss chunk from
    its plan (without one, `make_plan`'s for its configs), and refuses a plan
    made for another batch."""
    cfg = TrainConfig(batch_size=BATCH, precision="float32", xla="off")
    model_cfg, strategy = GPTConfig(dropout=0.0, **MODEL), strategy_for(1)
    plan = make_plan(model_cfg, cfg, strategy)
    assert Trainer(model_cfg, cfg, strategy, tmp_path / "a").plan == plan
    given = dataclasses.replace(plan, steps_per_call=3, loss_chunk=16)
    trainer = Trainer(model_cfg, cfg, strategy, tmp_path / "b", plan=given)
    assert (trainer.steps_per_call, trainer.loss_chunk, trainer.precision, trainer.xla) == (3, 16, "float32", False)
    with pytest.raises(ValueError, match="another strategy, batch size or model"):
        Trainer(model_cfg, dataclasses.replace(cfg, batch_size=2 * BATCH), strategy, tmp_path / "c", plan=plan)
