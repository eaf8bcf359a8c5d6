"""Arithmetic cost of the model, and the matmul speed of a device.

Together they give the model FLOPs utilisation (MFU) of a run:

    mfu = flops_per_token(config) * tokens_per_second / peak_flops

where `peak_flops` is the device's matrix-multiply peak, either a figure from
its data sheet or one measured by `measure_matmul_peak`.

Symbols: L = blocks, D = model width, H = heads, K = per-head key size,
F = feed-forward width, V = vocabulary, T = positions attended over (maxlen
during training).
"""

from __future__ import annotations

import math
import time

import tensorflow as tf

from tfgpt.runtime.devices import compute_dtype


def matmul_params(config) -> int:
    """The number of weights that take part in a matrix product for every
    position: per block the query, key, value and output projections
    (4 * D * H * K) and the two feed-forward layers (2 * D * F), plus the output
    layer (D * V). Embedding tables (gathers), biases and layer norms are left
    out: they cost no matrix products.

    N_matmul = L * (4*D*H*K + 2*D*F) + D*V
    """
    d, h, k, f = config.embed_dim, config.num_heads, config.key_dim, config.ff_dim
    return config.num_layers * (4 * d * h * k + 2 * d * f) + d * config.vocab_size


def flops_per_token(config, seq_len: int | None = None, training: bool = True) -> float:
    """Model FLOPs per position (a multiply-add counts as 2 FLOPs).

    Forward pass, per position:
      - every weight in a matrix product: 2 * N_matmul (see `matmul_params`);
      - attention, per block and head: the scores q . k over T positions
        (2*T*K) and the weighted sum of the values (2*T*K). The causal mask is
        applied to a full T x T score matrix, so all T positions are counted,
        not the T/2 a position may actually see: 4 * L * H * K * T.
    The backward pass costs twice the forward one (a gradient for the input
    and one for the weight of each product), so training costs three times
    the forward pass:

      training: 6 * N_matmul + 12 * L * H * K * T
      forward:  2 * N_matmul +  4 * L * H * K * T

    Not counted: element-wise work (softmax, layer norm, dropout, Adam); MFU
    counts the model's FLOPs, not the hardware's.

    config: a GPTConfig. seq_len: T (default config.maxlen). Returns FLOPs
    per token; multiply by tokens per second for FLOP/s.
    """
    t = config.maxlen if seq_len is None else seq_len
    attention = 4 * config.num_layers * config.num_heads * config.key_dim * t
    forward = 2 * matmul_params(config) + attention
    return float(3 * forward if training else forward)


def default_device() -> str:
    """The device training runs on without a strategy: the first GPU, else the CPU."""
    return "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"


def measure_matmul_peak(
    dtype=tf.float32, device: str | None = None, sizes=None, seconds: float = 2.0, chain: int = 4
) -> float:
    """The matrix-multiply speed of one device, in FLOP/s.

    For each size n in `sizes`, a compiled function runs `chain` dependent
    [n, n] @ [n, n] products (2 * n**3 FLOPs each) in `dtype` on `device`.
    After a warm-up call per size, the sizes are timed in turn, round after
    round, for about `seconds` (at least 3 rounds, at most 100); the result is
    the speed of the fastest call of any size. Other work on the machine only
    ever slows a call down, and the rounds spread each size's calls over the
    whole time, so a short burst of other work does not decide the result;
    still, on a machine kept busy throughout it is a lower bound of the peak.

    dtype: tf.float32, tf.bfloat16, tf.float16 or their names. device: a
    TensorFlow device name (default: the first GPU, else the CPU). sizes:
    default (4096, 8192) on a GPU and (512, 1024) on a CPU, large enough to
    reach the peak and small enough for a call to take milliseconds.
    """
    dtype = tf.as_dtype(dtype)
    device = device or default_device()
    if sizes is None:
        sizes = (4096, 8192) if "GPU" in device.upper() else (512, 1024)

    @tf.function(autograph=False)
    def products(x, w):
        with tf.device(device):
            for _ in range(chain):
                x = tf.matmul(x, w)
            # A scalar to fetch: waits for the products without copying them.
            return tf.reduce_sum(tf.cast(x, tf.float32))

    operands = []
    for n in sizes:
        with tf.device(device):
            a = tf.cast(tf.random.stateless_normal([n, n], seed=[1, 2]), dtype)
            # Scaled so that the chained products keep their magnitude.
            b = tf.cast(tf.random.stateless_normal([n, n], seed=[3, 4]) / math.sqrt(n), dtype)
        products(a, b).numpy()  # trace, allocate, warm up
        operands.append((n, a, b))
    best = 0.0
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or (time.perf_counter() - start < seconds and rounds < 100):
        for n, a, b in operands:
            t0 = time.perf_counter()
            products(a, b).numpy()
            best = max(best, chain * 2.0 * n**3 / (time.perf_counter() - t0))
        rounds += 1
    return best


def peak_devices(strategy) -> tuple[str, int]:
    """(device to measure, how many such devices train together).

    One per replica on GPUs; logical CPU devices of one machine share its
    cores, so a CPU counts once per worker."""
    replicas = strategy.num_replicas_in_sync
    try:
        local = list(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError, NotImplementedError):  # the default strategy
        local = []
    device = local[0] if local else default_device()
    if "GPU" in device.upper():
        return device, replicas
    return device, max(1, replicas // max(1, len(local)))


_PEAKS: dict = {}


def measured_peak(precision: str, device: str) -> float:
    """measure_matmul_peak for the training precision on device, once per
    process (later runs in the same process reuse it)."""

    key = (precision, device)
    if key not in _PEAKS:
        _PEAKS[key] = measure_matmul_peak(compute_dtype(precision), device)
    return _PEAKS[key]
