"""Dynamic loss scaling (float16): the scale's rule against a plain Python
reference, a float16 training step against float32, and an overflowing step
that is skipped, halves the scale and survives a checkpoint."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import TRAINER_MODEL as MODEL
from helpers import Recorder, make_windows, max_diff, report, strategy_for, weights

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.train.loss_scale import LossScale
from tfgpt.train.trainer import Trainer


def reference_scales(flags, initial, interval, max_scale):
    """The scale after each step, by the rule written out in Python."""
    scale, good, out = initial, 0, []
    for finite in flags:
        if finite:
            good += 1
            if good >= interval:
                scale, good = min(scale * 2, max_scale), 0
        else:
            scale, good = scale / 2, 0
        out.append((scale, good))
    return out


@pytest.mark.parametrize("graph", [False, True])
def test_scale_halves_on_overflow_and_grows_after_a_run_of_good_steps(graph):
    flags = [True] * 9 + [False, False, True, True, False] + [True] * 3
    ls = LossScale(initial=8.0, growth_interval=3, max_scale=32.0)
    update = tf.function(ls.update) if graph else ls.update
    got = []
    for finite in flags:
        update(tf.constant(finite))
        got.append((float(ls.scale.numpy()), int(ls.good_steps.numpy())))
    want = reference_scales(flags, 8.0, 3, 32.0)
    assert got == want
    assert max(s for s, _ in got) == 32.0 and min(s for s, _ in got) == 4.0  # grown to the cap, halved twice in a row


def make_trainer(run_dir, precision, replicas=1, max_steps=6):
    cfg = TrainConfig(
        batch_size=8, epochs=10, max_steps=max_steps, xla="off", lr=3e-3, precision=precision, keep_checkpoints=2
    )
    trainer = Trainer(GPTConfig(dropout=0.0, **MODEL), cfg, strategy_for(replicas), run_dir)
    trainer.checkpoints.open()
    return trainer


def test_float16_training_matches_float32(tmp_path):
    """Six steps in float16 (scaled) against float32 from the same weights.
    float16 keeps 11 significant bits (relative rounding 2^-11, about 5e-4)
    in the products; everything else is float32. The losses agree to a few
    1e-3. Single weights are no measure (Adam moves a weight by about lr
    whatever the size of its gradient, so a gradient near 0 whose sign the
    rounding flips moves it the other way): the mean distance between the
    two runs' weights must stay under a tenth of the mean distance they
    travelled."""
    windows = make_windows()
    start = weights(make_trainer(tmp_path / "start", "float32"))
    out = {}
    for precision in ("float32", "float16"):
        trainer = make_trainer(tmp_path / precision, precision)
        rec = Recorder()
        trainer.fit(windows, None, rec)
        out[precision] = rec, weights(trainer), trainer
    (r32, w32, _), (r16, w16, t16) = out["float32"], out["float16"]
    assert t16.model.compute_dtype == tf.float16
    assert not any(i["skipped"] for i in r16.infos)  # the initial scale 2^15 does not overflow here
    assert all(i["loss_scale"] == 2.0**15 for i in r16.infos)
    loss_diff = max_diff(r32.losses, r16.losses)
    apart = np.mean([np.abs(w16[k] - w32[k]).mean() for k in w32])
    travelled = np.mean([np.abs(w32[k] - start[k]).mean() for k in w32])
    report("float16 vs float32, 6 steps: max |loss diff|", loss_diff)
    report("float16 vs float32, 6 steps: mean |weight diff| / mean |weight change|", apart / travelled)
    assert r16.losses[-1] < r16.losses[0]
    assert loss_diff < 5e-3
    assert travelled > 1e-3 and apart < 0.1 * travelled


def test_an_overflow_is_skipped_halves_the_scale_and_is_checkpointed(tmp_path):
    """With a scale so large that the float16 gradients overflow, the step
    changes no weight, slot or optimizer step, halves the scale on both
    replicas, and counts as a global step; the scale is restored from the
    checkpoint; at a sane scale the next step is applied."""
    windows = make_windows()
    trainer = make_trainer(tmp_path, "float16", replicas=2, max_steps=1)
    trainer.loss_scale.scale.assign(2.0**120)
    before = weights(trainer)
    slots = [v.numpy() for v in trainer.optimizer.m + trainer.optimizer.v]
    rec = Recorder()
    trainer.fit(windows, None, rec)
    assert [i["skipped"] for i in rec.infos] == [True]
    assert max_diff(before, weights(trainer)) == 0.0
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(slots, trainer.optimizer.m + trainer.optimizer.v))
    assert int(trainer.optimizer.step.numpy()) == 0 and int(trainer.state.step.numpy()) == 1
    copies = [float(c) for c in trainer.strategy.experimental_local_results(trainer.loss_scale.scale)]
    assert copies == [2.0**119] * 2
    assert trainer.checkpoints.manager.latest_checkpoint.endswith("ckpt-1")

    resumed = make_trainer(tmp_path, "float16", replicas=1, max_steps=2)
    assert resumed.checkpoints.restore_latest() is not None
    assert float(resumed.loss_scale.scale.numpy()) == 2.0**119
    resumed.loss_scale.scale.assign(2.0**15)
    rec = Recorder()
    resumed.fit(windows, None, rec)
    assert [i["skipped"] for i in rec.infos] == [False]
    assert int(resumed.optimizer.step.numpy()) == 1 and int(resumed.state.step.numpy()) == 2
    assert max_diff(before, weights(resumed)) > 1e-4


def test_when_training_goes_on_after_a_step(tmp_path):
    """float32 stops after any non-finite step; float16 goes on after an
    overflow while the loss is finite and the scale is at least 1."""
    t32 = make_trainer(tmp_path / "a", "float32")
    t16 = make_trainer(tmp_path / "b", "float16")

    def going(trainer, finite, loss, scale):
        return bool(trainer._keeps_going(tf.constant(finite), tf.constant(loss), tf.constant(scale)))

    assert going(t32, True, 1.0, 1.0) and not going(t32, False, 1.0, 1.0)
    assert going(t16, True, 1.0, 0.5)
    assert going(t16, False, 1.0, 1.0) and going(t16, False, 1.0, 1024.0)
    assert not going(t16, False, 1.0, 0.5)  # overflowing even unscaled
    assert not going(t16, False, float("nan"), 1024.0)  # the loss itself is not finite
