"""Data-parallel training: several replicas must train exactly like one device.

Every numerical check compares a multi-replica run with an independent
single-device run on the same global batches. One step against NumPy is
tests/test_trainer.py; several worker processes are tests/test_cluster.py.
"""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import TRAINER_BATCH as BATCH
from helpers import TRAINER_MODEL as MODEL
from helpers import Recorder, make_windows, max_diff, report, strategy_for, weights

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.data.windows import train_dataset
from tfgpt.train.trainer import NonFiniteLoss, Trainer

STEPS = 6
TOL = 1e-5


# --- helpers ------------------------------------------------------------------


def make_trainer(
    replicas: int,
    run_dir: Path,
    xla: str = "off",
    dropout: float = 0.0,
    seed: int = 0,
    max_steps: int = STEPS,
    lr: float = 3e-3,
    **settings,
) -> Trainer:
    cfg = TrainConfig(
        batch_size=BATCH,
        epochs=10,
        max_steps=max_steps,
        xla=xla,
        seed=seed,
        lr=lr,
        keep_checkpoints=2,
        precision="float32",
        **settings,
    )
    trainer = Trainer(GPTConfig(dropout=dropout, **MODEL), cfg, strategy_for(replicas), run_dir)
    trainer.checkpoints.open()
    return trainer


def train(trainer: Trainer, windows: np.ndarray) -> list[float]:
    rec = Recorder()
    trainer.fit(windows, None, rec)
    return rec.losses


# --- 2 replicas against 1 device ----------------------------------------------


@pytest.fixture(scope="module")
def windows():
    return make_windows()  # 4 global batches per epoch: 6 steps cross an epoch boundary


@pytest.fixture(scope="module")
def runs(windows, tmp_path_factory):
    """(xla, replicas) -> (losses, weights, trainer) after STEPS steps, dropout 0."""
    out = {}
    for xla in ("off", "on"):
        for replicas in (1, 2):
            trainer = make_trainer(replicas, tmp_path_factory.mktemp(f"xla{xla}-r{replicas}"), xla=xla)
            assert trainer.replicas == replicas and trainer.xla == (xla == "on")
            losses = train(trainer, windows)
            assert len(losses) == STEPS
            out[xla, replicas] = (losses, weights(trainer), trainer)
    return out


@pytest.mark.parametrize("xla", ["off", "on"])
def test_two_replicas_match_one_device(runs, xla):
    one_losses, one_weights, _ = runs[xla, 1]
    two_losses, two_weights, _ = runs[xla, 2]
    assert one_losses[-1] < one_losses[0]  # it trains
    loss_diff, weight_diff = max_diff(one_losses, two_losses), max_diff(one_weights, two_weights)
    report(f"xla {xla}: 2 replicas vs 1 device, max |loss diff| over {STEPS} steps", loss_diff)
    report(f"xla {xla}: 2 replicas vs 1 device, max |weight diff| after {STEPS} steps", weight_diff)
    assert loss_diff <= TOL
    assert weight_diff <= TOL
    # The weights moved: a comparison of untouched weights would prove nothing.
    fresh = make_trainer(1, runs[xla, 1][2].run_dir / "fresh", xla="off")
    assert max_diff(weights(fresh), one_weights) > 1e-3


@pytest.mark.parametrize("xla", ["off", "on"])
def test_every_replica_holds_the_same_variables(runs, xla):
    trainer = runs[xla, 2][2]
    variables = list(trainer.model.variables) + list(trainer.optimizer.variables)
    assert len(variables) > len(trainer.model.trainable_variables)  # slots and step included
    worst = 0.0
    for var in variables:
        copies = [np.asarray(c) for c in trainer.strategy.experimental_local_results(var)]
        assert len(copies) == 2, var.name
        worst = max(worst, float(np.max(np.abs(copies[0] - copies[1]))))
    report(f"xla {xla}: max |difference| between the two replicas' copies", worst)
    assert worst == 0.0
    assert int(trainer.optimizer.step.numpy()) == STEPS


@pytest.mark.parametrize("xla", ["off", "on"])
def test_several_steps_per_call_equal_one_step_per_call(runs, windows, tmp_path, xla):
    """4 steps per compiled call (the last call of the first epoch and of the
    run shorter: 6 steps over epochs of 4 batches) against one per call, on 2
    replicas: the same per-step losses and weights, and the same state."""
    ref_losses, ref_weights, _ = runs[xla, 2]
    trainer = make_trainer(2, tmp_path, xla=xla, steps_per_call=4)
    assert trainer.steps_per_call == 4
    calls = []
    trainer.train_steps = counting(trainer.train_steps, calls)
    losses = train(trainer, windows)
    assert calls == [4, 2]  # the epoch's 4 batches, then the 2 left to max_steps
    report(f"xla {xla}: 4 steps per call vs 1, max |loss diff|", max_diff(ref_losses, losses))
    assert max_diff(ref_losses, losses) <= 1e-6
    assert max_diff(ref_weights, weights(trainer)) <= 1e-6
    assert [
        int(v.numpy()) for v in (trainer.state.step, trainer.state.epoch, trainer.state.batch, trainer.optimizer.step)
    ] == [STEPS, 1, 2, STEPS]


def counting(fn, calls: list):
    """fn(iterator, n), recording each call's n."""

    def wrapped(iterator, n):
        calls.append(int(n))
        return fn(iterator, n)

    return wrapped


def test_dropout_is_reproducible_per_seed(runs, windows, tmp_path):
    def run(name, seed):
        return train(make_trainer(2, tmp_path / name, dropout=0.2, seed=seed, max_steps=3), windows)

    first, again, other_seed = run("a", 0), run("b", 0), run("c", 1)
    no_dropout = runs["off", 2][0][:3]  # the same seed, dropout 0
    report("dropout 0.2, 2 replicas, same seed twice: max |loss diff|", max_diff(first, again))
    assert max_diff(first, again) <= 1e-6
    assert max_diff(first, other_seed) > 1e-3
    assert max_diff(first, no_dropout) > 1e-3  # dropout is really applied


def test_xla_with_dropout_on_two_replicas(runs, windows, tmp_path):
    """The GPU defaults, XLA on and dropout 0.1, on two replicas (XLA
    compiles on the CPU too): the steps train, dropout is applied (the
    losses differ from the same run without it), and the replicas' copies
    of every variable stay bit for bit equal. (Stateless random numbers
    differ inside and outside XLA, so there is no non-XLA twin to compare
    with; reproducibility per seed is the test above.)"""
    trainer = make_trainer(2, tmp_path, xla="on", dropout=0.1, max_steps=3)
    losses = train(trainer, windows)
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert max_diff(losses, runs["on", 2][0][:3]) > 1e-3
    for var in trainer.model.trainable_variables:
        one, two = (np.asarray(c) for c in trainer.strategy.experimental_local_results(var))
        np.testing.assert_array_equal(one, two, err_msg=var.name)


# --- checkpoints across device counts -------------------------------------------


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_checkpoint_resumes_across_device_counts(runs, windows, tmp_path, saved, resumed):
    """3 steps at `saved` replicas, a checkpoint, then 3 more at `resumed`:
    the same losses and weights as 6 steps straight at `saved` replicas."""
    ref_losses, ref_weights, _ = runs["off", saved]
    first = make_trainer(saved, tmp_path, max_steps=3)
    losses = train(first, windows)
    assert first.checkpoints.manager.latest_checkpoint.endswith("ckpt-3")
    second = make_trainer(resumed, tmp_path, max_steps=STEPS)
    assert second.replicas == resumed
    assert second.checkpoints.restore_latest() is not None
    assert int(second.optimizer.step.numpy()) == 3
    losses += train(second, windows)
    loss_diff, weight_diff = max_diff(ref_losses, losses), max_diff(ref_weights, weights(second))
    report(f"checkpoint {saved} -> {resumed} replicas: max |loss diff|", loss_diff)
    report(f"checkpoint {saved} -> {resumed} replicas: max |weight diff|", weight_diff)
    assert loss_diff <= TOL
    assert weight_diff <= TOL


# --- the steps-per-call loop ----------------------------------------------------


def test_the_steps_per_call_loop_reads_no_value_a_step_computes(tmp_path):
    """The loop of `train_steps` is driven by the host: its condition reads
    the counter and n alone (int32), never a loss, a finiteness flag or a
    scale (a GPU would otherwise make the host wait for every step)."""
    trainer = make_trainer(2, tmp_path, steps_per_call=4)
    iterator = iter(trainer.distribute(lambda ctx: train_dataset(make_windows(), BATCH, 0, 0, "truncate", ctx)))
    graph = trainer.train_steps.get_concrete_function(iterator, tf.constant(4)).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) == 1
    functions = {f.signature.name: f for f in graph.as_graph_def().library.function}
    cond = functions[loops[0].get_attr("cond").name]
    nodes = {n.name: n for n in cond.node_def}
    args = {a.name: a.type for a in cond.signature.input_arg}
    read, todo = set(), [cond.ret[cond.signature.output_arg[0].name]]
    while todo:  # every input the condition's output depends on
        name = todo.pop().split(":")[0].lstrip("^")
        if name in args:
            read.add(name)
        elif name in nodes:
            todo.extend(nodes[name].input)
    assert read and {args[a] for a in read} == {tf.int32.as_datatype_enum}, read
    # The loop carries a bool (whether training goes on) that the condition does not read.
    assert tf.bool.as_datatype_enum in args.values()


@pytest.mark.parametrize("xla", ["off", "on"])
def test_a_call_changes_nothing_after_the_step_that_stops_training(tmp_path, xla):
    """lr 1e30 makes step 2's loss non-finite. With 4 steps per call, steps
    3 and 4 still run in the same call but change nothing: training stops at
    step 2 with the same state and weights (those after step 1, finite) as
    with one step per call, where the host stops the loop itself."""
    got = {}
    for per_call in (1, 4):
        trainer = make_trainer(1, tmp_path / f"spc{per_call}", xla=xla, lr=1e30, steps_per_call=per_call)
        with pytest.raises(NonFiniteLoss, match="not finite at step 2"):
            train(trainer, make_windows())
        state = [int(v.numpy()) for v in (trainer.state.step, trainer.state.batch, trainer.optimizer.step)]
        got[per_call] = state, weights(trainer)
        assert state == [2, 2, 1]
        assert all(np.all(np.isfinite(w)) for w in got[per_call][1].values())
    assert max_diff(got[1][1], got[4][1]) == 0.0
