"""The Reporter (tfgpt.train.report): the scalars it writes are the means since
the last write, pending steps are written on close, the epoch line, and
other workers write nothing."""

import dataclasses

import numpy as np
import pytest
from helpers import read_events

from tfgpt.train.report import ReportConfig, Reporter


def test_reporter_close_writes_pending_steps(tmp_path):
    config = ReportConfig(
        epochs=1, log_every=5, quiet=True, tokens_per_step=64, flops_per_token=10.0, peak_flops=1e6, trace_graph=False
    )
    reporter = Reporter(tmp_path, config)
    for step in range(1, 8):
        reporter.before_step(step)
        reporter.on_step(
            dict(
                step=step,
                epoch=0,
                batch=step,
                batches=100,
                loss=2.0,
                grad_norm=1.0,
                lr=1e-3,
                tokens=64.0,
                step_time=0.01,
                tokens_per_second=6400.0,
            )
        )
    assert [s for s, _ in read_events(tmp_path / "train")["loss"]] == [5]  # flushed at log_every
    reporter.close()
    reporter.close()  # twice is harmless
    events = read_events(tmp_path / "train")
    assert [s for s, _ in events["loss"]] == [5, 7]
    assert float(events["mfu"][-1][1]) == pytest.approx(10.0 * 6400 / 1e6)


def test_reporter_scalars_are_means_since_the_last_write(tmp_path, capsys):
    config = ReportConfig(epochs=2, log_every=2, tokens_per_step=100, trace_graph=False)
    reporter = Reporter(tmp_path, config)
    losses, times = [3.0, 2.0, 1.5], [0.1, 0.3, 0.2]
    for step, (loss, dt) in enumerate(zip(losses, times), start=1):
        reporter.on_step(
            dict(
                step=step,
                epoch=0,
                batch=step,
                batches=3,
                loss=loss,
                grad_norm=0.5 * step,
                lr=1e-3,
                tokens=100.0,
                step_time=dt,
                tokens_per_second=100 / dt,
            )
        )
    reporter.on_epoch(
        dict(
            step=3,
            epoch=0,
            batches=3,
            seconds=0.6,
            steps_run=3,
            loss=float(np.mean(losses)),
            val_loss=2.0,
            finished=True,
        )
    )
    reporter.close()
    train, val = read_events(tmp_path / "train"), read_events(tmp_path / "validation")
    # Written at step 2 (log_every) and step 3 (the epoch's last), each the mean since the previous write.
    assert [(s, float(v)) for s, v in train["loss"]] == [(2, 2.5), (3, 1.5)]
    assert [s for s, _ in train["perplexity"]] == [2, 3]
    np.testing.assert_allclose([float(v) for _, v in train["perplexity"]], np.exp([2.5, 1.5]), rtol=1e-6)
    np.testing.assert_allclose([float(v) for _, v in train["step_time_ms"]], [200.0, 200.0], rtol=1e-6)
    np.testing.assert_allclose([float(v) for _, v in train["tokens_per_second"]], [500.0, 500.0], rtol=1e-6)
    np.testing.assert_allclose([float(v) for _, v in train["grad_norm"]], [1.0, 1.5], rtol=1e-6)
    assert "mfu" not in train  # no peak given
    assert [(s, float(v)) for s, v in val["loss"]] == [(3, 2.0)]
    np.testing.assert_allclose(float(val["perplexity"][0][1]), np.exp(2.0), rtol=1e-6)
    out = capsys.readouterr().out
    assert "Epoch 1/2 - 3/3 - 1s - 200ms/step - loss: 2.1667 - val_loss: 2.0000 - val_perplexity: 7.4" in out


def test_other_workers_write_nothing(tmp_path):
    reporter = Reporter(tmp_path, ReportConfig(epochs=1, hparams={"lr": 0.1}), chief=False)
    reporter.on_step(
        dict(
            step=1,
            epoch=0,
            batch=1,
            batches=1,
            loss=1.0,
            grad_norm=1.0,
            lr=1e-3,
            tokens=1.0,
            step_time=0.1,
            tokens_per_second=10.0,
        )
    )
    reporter.close()
    assert list(tmp_path.iterdir()) == []


def test_report_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ReportConfig(epochs=1).epochs = 2
