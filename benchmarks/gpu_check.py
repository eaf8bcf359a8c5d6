"""A check of tfgpt on this machine's GPUs: `python -m benchmarks.gpu_check` (`make gpu-check`).

Within about eight minutes (--budget) on one GPU it prints:

  1. the devices: what one-GPU training runs on (`tfgpt.runtime.devices.describe`),
     every GPU's compute capability and memory, and the CUDA build;
  2. the training speed of the default model (GPTConfig(), 80 positions a
     window) on one GPU in float32, bfloat16 and float16, with XLA off and
     on, at global batches 128 and 1024: ms/step, tokens/s, model TFLOP/s
     (`tfgpt.runtime.flops.flops_per_token`) and MFU. MFU's peak is the data-sheet
     figure of a known GPU (KNOWN_PEAKS), else the matrix-multiply speed
     measured in the variant's process (`tfgpt.runtime.flops.measure_matmul_peak`).
     bfloat16 needs compute capability 8.0 and float16 7.0; below, the rows
     are skipped with a note;
  3. with two GPUs or more: `train.py --gpus 2` started as a user starts it
     (a subprocess, `devices.use_gpus` and MirroredStrategy's own
     all-reduce) at global batch 256, against one GPU at 128 (the same
     batch per GPU): its device line, which must name two GPUs, and the
     ratio of the tokens/s;
  4. the sampler (`benchmarks.bench.sampler_bench`): ms per generated token at
     batch 1, tokens/s at batch 32;
  5. then it runs the GPU tests (tests/test_gpu.py, with TFGPT_TEST_GPU=1).

It exits 1 when a training variant, the two-GPU run or a GPU test failed,
and prints a last line saying which.

Each training variant runs in a fresh process (`python -m benchmarks.bench
--variant`), so that no variant inherits another's compiled kernels or
memory pool, with a time limit; variants that no longer fit in the budget
are listed as skipped. Without a GPU visible to TensorFlow the check prints
one line saying why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from benchmarks.bench import generated_corpus, sampler_bench
from tfgpt.config import GPTConfig
from tfgpt.console import quiet, setup_logging
from tfgpt.errors import UserError, run_main
from tfgpt.runtime import devices
from tfgpt.runtime.devices import MIN_CAPABILITY, PRECISIONS, native_on_gpus
from tfgpt.runtime.distribute import make_strategy
from tfgpt.runtime.flops import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ROOT / "tests" / "test_gpu.py"
BATCHES = (128, 1024)

# Dense (no structured sparsity) matrix-multiply peaks, FLOP/s per GPU, from
# NVIDIA's data sheets, per precision of the products. "float32" is plain
# float32 (TF32 off); "tf32" is float32 products run as TF32 on tensor cores,
# which TensorFlow does by default from compute capability 8.0. A pattern is
# searched for in TensorFlow's device name; a GPU that none matches (another
# model, or another form factor with other clocks, such as the H100 PCIe or
# the V100 PCIe) is measured instead.
_H100_SXM = {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.7e12, "float32": 67e12}
KNOWN_PEAKS = [
    (r"H100.*(HBM3|SXM)", _H100_SXM),  # the SXM module reports "NVIDIA H100 80GB HBM3"
    (r"H200(?!.*NVL)", _H100_SXM),  # H200 SXM: the H100's compute, more memory
    (r"A100", {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    (r"\bL4\b", {"bfloat16": 121e12, "float16": 121e12, "tf32": 60e12, "float32": 30.3e12}),
    (r"V100-SXM", {"float16": 125e12, "float32": 15.7e12}),  # no bfloat16, no TF32
    (r"\bT4\b", {"float16": 65e12, "float32": 8.1e12}),
]

# Seconds kept back from the training variants for the sampler and the GPU
# tests, and the time limit of a single variant.
SAMPLER_RESERVE_S = 60.0
TESTS_RESERVE_S = 150.0
VARIANT_LIMIT_S = 150.0
VARIANT_MIN_S = 25.0  # less than this left: a variant would not get through its start-up


def known_peak(device_name: str, precision: str) -> float | None:
    """The data-sheet peak of a known GPU in `precision` ("tf32" for float32
    products run as TF32), FLOP/s; None when the GPU or the precision is not
    in KNOWN_PEAKS."""
    for pattern, peaks in KNOWN_PEAKS:
        if re.search(pattern, device_name):
            return peaks.get(precision)
    return None


def skip_reason(precision: str, capability: tuple[int, int]) -> str | None:
    """Why a precision is not benchmarked on a GPU of this compute capability
    (None: it is): one that does not multiply in it natively
    (`devices.MIN_CAPABILITY`)."""
    if native_on_gpus(precision, [capability]):
        return None
    need = MIN_CAPABILITY[precision]
    have = ".".join(map(str, capability))
    return f"{precision} rows skipped: compute capability {have} < {need[0]}.{need[1]} (no {precision} tensor cores)"


# --- training variants ---------------------------------------------------------


def write_windows(path: Path, rows: int, maxlen: int, vocab_size: int, seed: int = 0) -> Path:
    """Random full windows (no padding) of maxlen + 1 ids: the step time does
    not depend on which ids are trained on."""

    rng = np.random.default_rng(seed)
    np.save(path, rng.integers(1, vocab_size, size=[rows, maxlen + 1], dtype=np.int32))
    return path


def run_variant(spec: dict, timeout: float) -> tuple[dict | None, str]:
    """One training variant in a fresh process; (its row, "") or (None, why not)."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench", "--variant", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        return None, "failed: " + _error_line(proc.stderr)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), ""
    except (json.JSONDecodeError, IndexError):
        return None, "failed: no result line in its output"


def _error_line(stderr: str) -> str:
    """The exception line of a child's traceback (else its last line), shortened."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    line = (errors or lines or ["no error output"])[-1]
    return line if len(line) <= 200 else line[:197] + "..."


HEADER = (
    f"{'precision':<9} {'xla':>3} {'batch':>5} {'gpus':>4} {'ms/step':>9} {'tokens/s':>11} {'TFLOP/s':>8} "
    f"{'peak':>8} {'(source)':<10} {'MFU':>6} {'warm-up s':>9}"
)


def row_line(
    precision: str,
    xla: bool,
    batch: int,
    gpus: int,
    row: dict | None = None,
    peak: float = 0.0,
    source: str = "",
    flops_per_token: float = 0.0,
    note: str = "",
) -> str:
    """One line of the training table: the measured figures, or a note."""
    head = f"{precision:<9} {'on' if xla else 'off':>3} {batch:>5} {gpus:>4}"
    if row is None:
        return f"{head} {note}"
    flops = row["tokens_per_s"] * flops_per_token
    mfu = flops / (peak * gpus)
    return (
        f"{head} {row['ms_per_step']:>9.2f} {row['tokens_per_s']:>11,.0f} {flops / 1e12:>8.4g} "
        f"{peak / 1e12:>8.4g} {'(' + source + ')':<10} {mfu:>6.1%} {row['warmup_s']:>9.1f}"
    )


class Budget:
    """The seconds left until `end` (time.monotonic())."""

    def __init__(self, end: float):
        self.end = end

    def left(self) -> float:
        return self.end - time.monotonic()


# --- the check ---------------------------------------------------------------------


def main(argv=None) -> int:
    """The check; its exit status (a UserError: `gpu-check: error: ...` and its code)."""
    return run_main("gpu-check", lambda: _check(argv))


def _check(argv) -> int:
    started = time.monotonic()
    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Training and sampling speed of the default model on this machine's GPU(s) per precision "
        "and XLA setting, then the GPU tests; exits with the tests' status. Without a GPU it says so "
        "and exits 0.",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=480.0,
        metavar="SECONDS",
        help="about how long the whole check may take (default 480); training variants that do not fit are skipped",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=30,
        help="timed training steps per variant (default 30). On a GPU the trainer runs several "
        "steps per compiled call (10 by default) and times calls, the first of which also "
        "starts the input pipeline: the median step comes from a middle call",
    )
    parser.add_argument("--no-tests", action="store_true", help="benchmarks only: do not run tests/test_gpu.py")
    # For the CPU test suite: the same path on the CPU, one small variant, no GPU tests.
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.steps < 1:
        parser.error("--budget must be positive and --steps at least 1")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # for this process and the variants' processes

    physical = tf.config.list_physical_devices("GPU")
    if not physical and not args.cpu_smoke:
        print(f"gpu-check: no GPU visible to TensorFlow ({devices.why_no_gpus()}); nothing to check")
        return 0
    if not (args.no_tests or args.cpu_smoke) and not GPU_TESTS.is_file():
        raise UserError(
            f"{GPU_TESTS} not found: the GPU tests run from a checkout of tfgpt with its tests/ folder; "
            "pass --no-tests to run the benchmarks alone"
        )

    details = devices.gpu_details()  # every visible GPU, before make_strategy hides all but one
    with quiet("tfgpt.runtime.distribute"):  # --cpu-smoke trains on the CPU on purpose
        strategy = make_strategy(gpus=1 if physical else None)
    found = devices.of_strategy(strategy)
    device = devices.describe(found)
    print(f"gpu-check: training on {device}", flush=True)
    for i, d in enumerate(details):
        memory = f", {d['memory'] / 2**30:.0f} GiB" if d["memory"] else ""
        print(f"  GPU {i}: {d['name']}, compute capability {'.'.join(map(str, d['compute_capability']))}{memory}")
    build = tf.sysconfig.get_build_info()
    print(
        f"  TensorFlow {tf.__version__}"
        + (
            f", built for CUDA {build.get('cuda_version')} and cuDNN {build.get('cudnn_version')}"
            if build.get("is_cuda_build")
            else ""
        )
    )

    name = details[0]["name"] if details else device
    capability = tuple(details[0]["compute_capability"]) if details else (0, 0)
    tf32 = bool(physical) and capability >= (8, 0) and tf.config.experimental.tensor_float_32_execution_enabled()
    model = GPTConfig()
    per_token = flops_per_token(model)

    if args.cpu_smoke:
        variants, steps, warmup, limit = [("float32", False, 8)], 1, 1, 900.0
        two_gpu_reserve, budget = 0.0, Budget(float("inf"))
    else:
        variants = [(p, x, b) for p in PRECISIONS for x in (False, True) for b in BATCHES]
        steps, warmup, limit = args.steps, 2, VARIANT_LIMIT_S
        # The single-GPU table stops early enough to leave time for the two-GPU
        # comparison, the sampler and the tests.
        two_gpu_reserve = VARIANT_LIMIT_S / 2 if len(physical) >= 2 else 0.0
        reserve = two_gpu_reserve + SAMPLER_RESERVE_S + (0.0 if args.no_tests else TESTS_RESERVE_S)
        budget = Budget(started + args.budget - reserve)

    failed = []
    with tempfile.TemporaryDirectory(prefix="tfgpt-gpu-check-") as tmp:
        # Enough windows for the largest global batch's steps in one epoch.
        most = max([b for _, _, b in variants] + ([256] if len(physical) >= 2 else []))
        windows = write_windows(Path(tmp) / "windows.npy", most * (warmup + steps), model.maxlen, model.vocab_size)

        def peak_of(precision: str, row: dict) -> tuple[float, str]:
            sheet = known_peak(name, "tf32" if precision == "float32" and tf32 else precision)
            return (sheet, "sheet") if sheet else (row["peak_gflops"] * 1e9, "measured")

        def run(precision: str, xla: bool, batch: int, gpus: int, deadline: Budget) -> dict | None:
            left = deadline.left()
            if left < VARIANT_MIN_S:
                print(row_line(precision, xla, batch, gpus, note="skipped: out of time (raise --budget)"), flush=True)
                return None
            spec = dict(
                precision=precision,
                xla=xla,
                replicas=gpus,
                steps=steps,
                warmup=warmup,
                windows=str(windows),
                batch_size=batch,
                gpus=gpus if physical else None,
            )
            row, why = run_variant(spec, min(limit, left))
            if row is None:
                if why.startswith("failed"):
                    failed.append(f"{precision} xla {'on' if xla else 'off'} batch {batch} x {gpus} GPU(s)")
                print(row_line(precision, xla, batch, gpus, note=why), flush=True)
                return None
            peak, source = peak_of(precision, row)
            print(row_line(precision, xla, batch, gpus, row, peak, source, per_token), flush=True)
            return row

        print(
            f"\ntraining: default model (vocabulary {model.vocab_size}, width {model.embed_dim}, "
            f"{model.num_layers} block), {model.maxlen} positions a window, {per_token / 1e6:.1f} MFLOP a token\n"
            f"  each variant in its own process: median of {steps} step(s) after {warmup} warm-up step(s); "
            "TFLOP/s: the model's, over all its GPUs; peak: one GPU's; MFU = TFLOP/s / (peak x gpus)",
            flush=True,
        )
        notes = sorted({skip_reason(p, capability) for p, _, _ in variants if physical} - {None})
        for note in notes:
            print(f"  {note}")
        if tf32:
            print(
                "  float32 rows: TensorFlow runs float32 matrix products as TF32 on compute capability 8.0+, "
                "so their MFU is against the TF32 peak"
            )
        print(HEADER, flush=True)
        rows = {}
        for precision, xla, batch in variants:
            if physical and skip_reason(precision, capability):
                continue
            rows[precision, xla, batch] = run(precision, xla, batch, 1, budget)

        if len(physical) >= 2:
            budget.end += two_gpu_reserve
            precision = devices.fastest_precision(found)
            print(f"\ntwo GPUs: global batch 256 (128 a GPU) against one GPU at 128, {precision}, XLA on", flush=True)
            print(HEADER, flush=True)
            one = rows.get((precision, True, 128))
            if one is None:
                one = run(precision, True, 128, 1, budget)
            else:
                print(row_line(precision, True, 128, 1, one, *peak_of(precision, one), per_token))
            two, why = train_two_gpus(precision, Path(tmp), min(VARIANT_LIMIT_S * 2, max(budget.left(), 60.0)))
            if two is None:
                failed.append(f"train.py --gpus 2: {why}")
                print(f"train.py --gpus 2: {why}", flush=True)
            else:
                print(f"train.py --gpus 2: {two['device_line']}; {two['tokens_per_s']:,.0f} tokens/s", flush=True)
            if one and two:
                ratio = two["tokens_per_s"] / one["tokens_per_s"]
                print(
                    f"two GPUs / one GPU: {ratio:.2f}x the tokens/s (2.00 would be perfect scaling, "
                    f"{ratio / 2:.0%} efficiency)"
                )
        else:
            print(f"\ntwo GPUs: skipped ({len(physical)} visible)")

    print(flush=True)
    sampler_precisions = ["float32"] + (["bfloat16"] if physical and native_on_gpus("bfloat16", [capability]) else [])
    for precision in sampler_precisions:
        if args.cpu_smoke:
            sampler_bench(tokens=(4,), modes=("cache",), repeats=1, precision=precision)
        else:
            sampler_bench(tokens=(40,), modes=("cache",), repeats=5, precision=precision)
        sys.stdout.flush()

    tests = 0 if args.cpu_smoke or args.no_tests else run_gpu_tests(Budget(started + args.budget).left())
    if tests:
        failed.append(f"the GPU tests (exit status {tests})")
    if failed:
        print(f"\ngpu-check: FAILED: {'; '.join(failed)}")
        return 1
    return 0


def train_two_gpus(precision: str, tmp: Path, timeout: float, steps: int = 60) -> tuple[dict | None, str]:
    """`train.py --gpus 2` in a subprocess, as a user starts it: XLA on, the
    default model, global batch 256. -> ({device_line, tokens_per_s}, "") or
    (None, why it failed: an error, no GPU in the device line, a time-out)."""

    corpus = tmp / "two-gpus.txt"  # made-up words: the speed does not depend on the text
    corpus.write_text("\n".join(generated_corpus(reviews=4000)) + "\n")
    args = [
        *("--data", str(corpus), "--gpus", "2", "--precision", precision, "--xla", "on"),
        *("--batch-size", "256", "--max-steps", str(steps), "--log-every", "10", "--val-fraction", "0"),
        *("--no-export", "--gen-tokens", "4", "--logdir", str(tmp / "logs"), "--run-name", "two-gpus"),
    ]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tfgpt.cli", *args], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    return read_two_gpu_run(done.returncode, done.stdout, done.stderr)


def read_two_gpu_run(status: int, out: str, err: str) -> tuple[dict | None, str]:
    """What `train_two_gpus` makes of a finished run's exit status and output."""
    if status != 0:
        return None, f"failed (exit status {status}): " + _error_line(err or out)
    lines = (out + "\n" + err).splitlines()
    device = next((line for line in lines if line.startswith("devices: ")), None)
    if device is None:
        return None, "failed: no device line in its output"
    # `devices.describe` names GPUs with their compute capability.
    if "compute capability" not in device or "; 2 replica(s);" not in device:
        return None, f"failed: it did not train on two GPUs ({device})"
    rates = [float(r.replace(",", "")) for line in lines for r in re.findall(r" ([\d,]+) tok/s", line)]
    if not rates:
        return None, "failed: no progress line with tokens/s in its output"
    # The first lines include the first call's tracing and compilation.
    later = rates[len(rates) // 2 :]
    return dict(device_line=device, tokens_per_s=sorted(later)[len(later) // 2]), ""


def run_gpu_tests(left: float) -> int:
    """tests/test_gpu.py with the GPUs visible; its exit status. `left`: the
    seconds of the budget left; the tests are stopped only well past it, as
    hung rather than slow. The check has made sure that they exist."""
    timeout = max(TESTS_RESERVE_S, left) + 300.0
    print(f"\nGPU tests: {sys.executable} -m pytest -q -m gpu {GPU_TESTS.relative_to(ROOT)}", flush=True)
    env = dict(os.environ, TFGPT_TEST_GPU="1")
    # A session of its own, so that a hung test's subprocesses end with it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(GPU_TESTS)], cwd=ROOT, env=env, start_new_session=True
    )
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"gpu-check: the GPU tests did not finish within {timeout:.0f} s and were stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


if __name__ == "__main__":
    sys.exit(main())
