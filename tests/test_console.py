"""tfgpt/console.py: the terminal lines against hand-written strings, and the
"tfgpt" logger printing messages as `print` does."""

import logging
import math

import pytest

from tfgpt.console import PrintHandler, duration, epoch_line, perplexity, progress_line, quiet, setup_logging


def test_perplexity_is_exp_of_the_loss():
    for loss in (0.0, 1.0, 4.5102, 10.0):
        assert perplexity(loss) == pytest.approx(math.exp(loss), rel=1e-12)
    assert perplexity(1000.0) == math.exp(80.0)  # capped: a diverged loss stays finite


def test_duration():
    assert duration(0) == "0:00"
    assert duration(59.9) == "0:59"
    assert duration(61) == "1:01"
    assert duration(3599) == "59:59"
    assert duration(3600) == "1:00:00"
    assert duration(3 * 3600 + 7 * 60 + 5) == "3:07:05"
    assert duration(-5) == "0:00"


def test_progress_line():
    # 40 steps left at 0.25 s each: 10 s to the end of the epoch.
    info = dict(step=1260, batch=351, batches=391, loss=4.123456, step_time=0.25, tokens_per_second=40960.4)
    assert progress_line(info) == "351/391 - step 1260 - loss: 4.1235 - 250ms/step - 40,960 tok/s - ETA 0:10"


def test_epoch_line_format():
    line = epoch_line(dict(epoch=2, steps_run=391, batches=391, seconds=17.2, loss=4.45331, val_loss=4.5102), epochs=25)
    assert line == "Epoch 3/25 - 391/391 - 17s - 44ms/step - loss: 4.4533 - val_loss: 4.5102 - val_perplexity: 90.9"


def test_epoch_line_without_validation():
    line = epoch_line(dict(epoch=0, steps_run=0, batches=10, seconds=1.4, loss=float("nan"), val_loss=None), epochs=1)
    assert line == "Epoch 1/1 - 0/10 - 1s - 1400ms/step - loss: nan"


def test_logger_prints_messages_as_print_does(capsys):
    setup_logging(chief=True)
    try:
        logging.getLogger("tfgpt.somewhere").info("data: 100% of 3 files")
        logging.getLogger("tfgpt.somewhere").warning("\nwarning: something")
        print("data: 100% of 3 files")
        print("\nwarning: something")
        out, err = capsys.readouterr()
        half = len(out) // 2
        assert out[:half] == out[half:] == "data: 100% of 3 files\n\nwarning: something\n"
        assert err == ""
        # A worker other than the chief prints nothing.
        setup_logging(chief=False)
        logging.getLogger("tfgpt.somewhere").warning("warning: not shown")
        assert capsys.readouterr() == ("", "")
        # Set up twice, one handler of its own (pytest may add its capture handlers).
        assert sum(isinstance(h, PrintHandler) for h in logging.getLogger("tfgpt").handlers) == 1
    finally:
        setup_logging(chief=True)


def test_quiet_holds_back_one_modules_messages_for_a_block(capsys):
    setup_logging(chief=True)
    with quiet("tfgpt.one"):
        logging.getLogger("tfgpt.one").warning("warning: held back")
        logging.getLogger("tfgpt.one").error("an error still shows")
        logging.getLogger("tfgpt.other").info("another module's message shows")
    logging.getLogger("tfgpt.one").info("after the block, shown again")
    assert capsys.readouterr().out == (
        "an error still shows\nanother module's message shows\nafter the block, shown again\n"
    )
