"""Where a training step's time goes: `python -m benchmarks.profile_step
[--precision float32|bfloat16] [--steps N] [--json PATH]`.

Runs the default model at the Keras example's global batch (128 x 80) on
random windows for a few warm-up steps, then records `--steps` steps with
TensorFlow's profiler and sums the time of every kernel it ran, by class:

  matmul, output layer   the products of the output layer (forward and both
                         gradients), run 320 positions at a time
  matmul, block          the block's projections, feed-forward layers and
                         the attention's batched products
  loss: softmax and sums the output layer's softmax, its gather of the
                         targets' probabilities and the sums of the loss
  attention: mask, softmax  the causal mask and the attention softmax
  layer norm, dropout, ReLU, embeddings, optimizer, casts, input pipeline
  other                  everything else (the largest of them are listed)

A kernel's time is the time between its start and end on the thread that
ran it. Two kernels may run at once on a 2-core CPU (TensorFlow's inter-op
threads), so the classes add up to more than the step's wall time; the
"share" column divides by their sum. Set `ONEDNN_MAX_CPU_ISA=AVX2` to
measure the AVX2 kernels on an AVX-512 CPU (the first line names the kernels
oneDNN runs).

The limit line divides the measured matmul peak (a large `tf.matmul` at the
step's precision, `tfgpt.runtime.flops`) by the model's FLOPs per token.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from benchmarks.bench import cpu_summary
from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.errors import UserError, run_main
from tfgpt.runtime.devices import compute_dtype, runnable_precisions
from tfgpt.runtime.distribute import make_strategy
from tfgpt.runtime.flops import flops_per_token, measure_matmul_peak
from tfgpt.train.trainer import Trainer

MATMUL_TYPES = {
    "MatMul",
    "BatchMatMulV2",
    "BatchMatMulV3",
    "_MklMatMul",
    "_MklNativeFusedMatMul",
    "_MklFusedMatMul",
    "_MklBatchMatMulV2",
    "_MklNativeBatchMatMulV2",
    "_MklFusedBatchMatMulV2",
}
# Wrappers whose time contains other kernels' time.
NOT_KERNELS = {"ExecutorState::Process", "ParallelFor", "ParallelForWithWorkerId"}


def classify(name: str, kind: str) -> str:
    """An op class for the kernel `name` (its node name) of type `kind`."""
    in_model = "/gpt/" in name or name.startswith("gpt/")
    if kind in MATMUL_TYPES:
        return "matmul, block" if "/block" in name else "matmul, output layer"
    if kind in ("IteratorGetNext", "IteratorGetNextAsOptional") or "Dataset" in kind:
        return "input pipeline"
    if "StatefulPartitionedCall_1/" in name or "ApplyAdam" in kind or "Assign" in kind:
        return "optimizer"
    if "/ln" in name:
        return "layer norm"
    if "dropout" in name:
        return "dropout"
    if kind in ("Relu", "ReluGrad", "_MklRelu", "_MklReluGrad") or "/ffn/" in name:
        return "ReLU, feed-forward biases"
    if kind == "Cast":
        return "casts"
    if "/attn/" in name:
        return "attention: mask, softmax, slices"
    if "emb" in name:
        return "embeddings"
    if not in_model:
        return "loss: softmax and sums"
    return "other"


def profile(precision: str, steps: int, warmup: int = 2, batch_size: int = 128) -> dict:
    """Profiles `steps` training steps after `warmup` ones; returns the
    per-class times (ms per step) and the step's wall time."""
    strategy = make_strategy(gpus=None, cpu_replicas=None)
    model_cfg = GPTConfig()
    windows = np.random.default_rng(0).integers(2, model_cfg.vocab_size, size=(4096, model_cfg.maxlen + 1))
    cfg = TrainConfig(batch_size=batch_size, epochs=1, max_steps=warmup, xla="off", precision=precision)
    times: list[float] = []

    class Hooks:
        def on_step(self, info):
            times.append(info["step_time"])

        def on_epoch(self, info):
            pass

    with tempfile.TemporaryDirectory(prefix="tfgpt-profile-") as tmp:
        trainer = Trainer(model_cfg, cfg, strategy, tmp)
        trainer.fit(windows.astype(np.int32), None, Hooks())
        trainer.cfg = dataclasses.replace(cfg, max_steps=warmup + steps)
        times.clear()
        tf.profiler.experimental.start(str(Path(tmp) / "profile"))
        t0 = time.perf_counter()
        trainer.fit(windows.astype(np.int32), None, Hooks())
        wall = (time.perf_counter() - t0) / steps
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(glob.glob(f"{tmp}/profile/**/*.xplane.pb", recursive=True)[0]).read_bytes())
    per_class: collections.Counter = collections.Counter()
    per_kernel: collections.Counter = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_"):
                continue
            for event in line.events:
                label = plane.event_metadata[event.metadata_id].name
                if label in NOT_KERNELS or ":" not in label:
                    continue
                name, kind = label.rsplit(":", 1)
                ms = event.duration_ps / 1e9 / steps
                per_class[classify(name, kind)] += ms
                per_kernel[(name, kind)] += ms
    tokens = batch_size * model_cfg.maxlen
    peak = measure_matmul_peak(compute_dtype(precision))
    return dict(
        precision=precision,
        steps=steps,
        step_ms=1000 * float(np.median(times)) if times else 1000 * wall,
        classes=dict(per_class.most_common()),
        top_other=[
            (f"{kind} {name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}", ms)
            for (name, kind), ms in per_kernel.most_common()
            if classify(name, kind) == "other"
        ][:8],
        tokens_per_s=tokens / (float(np.median(times)) if times else wall),
        limit_tokens_per_s=peak / flops_per_token(model_cfg),
        peak_gflops=peak / 1e9,
    )


def print_table(row: dict) -> None:
    total = sum(row["classes"].values())
    print(
        f"{row['precision']}: step {row['step_ms']:.0f} ms (median of {row['steps']}), "
        f"{row['tokens_per_s']:,.0f} tokens/s = {row['tokens_per_s'] / row['limit_tokens_per_s']:.0%} of the limit "
        f"{row['limit_tokens_per_s']:,.0f} (matmul peak {row['peak_gflops']:.0f} GFLOP/s)"
    )
    print(f"  {'class':<34} {'ms/step':>8} {'share':>6}")
    for name, ms in row["classes"].items():
        print(f"  {name:<34} {ms:>8.1f} {ms / total:>6.1%}")
    print(f"  {'kernels, summed over threads':<34} {total:>8.1f}")
    if row["top_other"]:
        print("  largest in other: " + "; ".join(f"{k} {v:.1f} ms" for k, v in row["top_other"][:5]))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="profile_step", description="Where a training step's time goes, per op class (see the module's doc)."
    )
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps, after 2 warm-up steps (default: 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if args.precision not in runnable_precisions((args.precision,)):
        raise UserError(f"--precision {args.precision} would abort on this CPU's oneDNN kernels")
    print(f"machine: {cpu_summary()}", flush=True)
    row = profile(args.precision, args.steps)
    print_table(row)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    return run_main("profile_step", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
