"""FLOPs (tfgpt.runtime.flops): the per-token formula against the model's own
matrix-product weights, and the measured matmul peak is a plausible number."""

import math
import re

import tensorflow as tf

from tfgpt.config import GPTConfig
from tfgpt.runtime.devices import bfloat16_aborts
from tfgpt.runtime.flops import flops_per_token, matmul_params, measure_matmul_peak


def test_flops_formula_matches_the_model():
    from tfgpt.model.gpt import GPT

    cfg = GPTConfig(vocab_size=50, maxlen=12, embed_dim=16, num_heads=3, head_dim=8, ff_dim=24, num_layers=2)
    model = GPT(cfg)
    # Every weight of a matrix product (w, wq, wk, wv, wo); not biases, norms or embedding tables.
    weights = sum(
        v.shape.num_elements() for v in model.trainable_variables if re.fullmatch(r"w[qkvo]?:0", v.name.split("/")[-1])
    )
    assert matmul_params(cfg) == weights
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.key_dim * cfg.maxlen
    assert flops_per_token(cfg) == 6 * weights + attention
    assert flops_per_token(cfg, training=False) == (6 * weights + attention) / 3
    assert flops_per_token(cfg, seq_len=6) == 6 * weights + attention / 2
    # The example's model: L=1, D=256, H=2, K=256, F=256, V=20000, T=80.
    assert flops_per_token(GPTConfig()) == 6 * (4 * 256 * 2 * 256 + 2 * 256 * 256 + 256 * 20000) + 12 * 2 * 256 * 80


def test_measure_matmul_peak():
    # bfloat16 aborts where oneDNN is capped below its bfloat16 kernels (tests/conftest.py).
    for dtype in (tf.float32,) + (() if bfloat16_aborts() else ("bfloat16",)):
        peak = measure_matmul_peak(dtype, "/CPU:0", sizes=(128, 256), seconds=0.2)
        assert math.isfinite(peak) and 1e8 < peak < 1e15, (dtype, peak)
