"""`python -m benchmarks.bench`: on a CPU where bfloat16 would abort, its
machine line names the kernels, and bfloat16 is left out with a note rather
than taking the process down; a user error is one line; the sampler
benchmark's generation without a cache is the full model's."""

import pytest
import tensorflow as tf
from helpers import reference_greedy

from benchmarks import bench
from tfgpt.config import GPTConfig
from tfgpt.errors import UserError
from tfgpt.model.gpt import GPT
from tfgpt.runtime import devices


def test_bfloat16_is_left_out_where_it_would_abort(monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(devices, "bfloat16_aborts", lambda: True)
    monkeypatch.setattr(bench, "sampler_bench", lambda **kw: asked.append(kw["precision"]) or [])
    assert bench.main(["--sampler"]) == 0
    out = capsys.readouterr().out
    assert asked == ["float32"]
    assert "note: bfloat16 left out" in out
    machine = next(line for line in out.splitlines() if line.startswith("machine: "))
    assert machine.endswith(f"kernels {devices.cpu_kernels()}")


def test_both_precisions_where_bfloat16_runs(monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(devices, "bfloat16_aborts", lambda: False)
    monkeypatch.setattr(bench, "sampler_bench", lambda **kw: asked.append(kw["precision"]) or [])
    assert bench.main(["--sampler"]) == 0
    assert asked == ["float32", "bfloat16"] and "left out" not in capsys.readouterr().out


def test_a_user_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    def refuse(data, flags):
        raise UserError(f"no such corpus: {data}")

    monkeypatch.setattr(bench, "heldout_protocol", refuse)
    assert bench.main(["--heldout", "--data", "nowhere"]) == 2
    assert capsys.readouterr().err == "bench: error: no such corpus: nowhere\n"


def test_generation_without_a_cache_is_the_full_models():
    """The "no cache" mode at top-k 1 (greedy) gives the tokens of the whole
    model run from Python on the growing, then sliding, sequence."""
    config = GPTConfig(vocab_size=40, maxlen=8, embed_dim=16, num_heads=2, ff_dim=32, num_layers=2, head_dim=8)
    model = GPT(config, seed=1)
    for v in model.trainable_variables:
        v.assign(v * 4.0)  # well-separated logits: no choice hinges on rounding
    prompts = [[7, 3, 9], [5, 11, 2]]
    got = bench.uncached_generate(model, top_k=1)(tf.constant(prompts), tf.constant(20), tf.constant([0, 1], tf.int64))
    assert got.shape == (2, 20)
    for row, prompt in zip(got.numpy().tolist(), prompts):
        assert row == reference_greedy(model, prompt, 20, stop_at_padding=False)


def test_unknown_sampler_modes_are_refused():
    with pytest.raises(ValueError, match="cache\\+xla"):
        bench.sampler_bench(modes=("cache+xla",))
