"""`python -m benchmarks.gpu_check` on any machine: its one line without a GPU,
the data-sheet peaks, the precisions skipped below their compute capability,
a failing variant in one line, and the --cpu-smoke path's consistent rows.
The GPU tests themselves are tests/test_gpu.py."""

import os
import re
import shutil
import subprocess

import pytest
from helpers import ROOT, run_python

from benchmarks import gpu_check
from tfgpt.config import GPTConfig
from tfgpt.runtime.flops import flops_per_token


def cpu_env(**extra) -> dict:
    """No GPU visible; the checkout on the path, for `-m benchmarks.gpu_check` run from elsewhere."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), **extra)


def driver_lists_gpus(path: str | None = None) -> bool:
    exe = shutil.which("nvidia-smi", path=path)
    if exe is None:
        return False
    done = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and any(line.startswith("GPU ") for line in done.stdout.splitlines())


@pytest.mark.slow
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    done = run_python(["-m", "benchmarks.gpu_check"], env=cpu_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("gpu-check: no GPU visible to TensorFlow (") and lines[0].endswith("; nothing to check")
    # The reason (tfgpt.runtime.devices.why_no_gpus): no driver listing a GPU here, else the hiding variable.
    assert ("CUDA_VISIBLE_DEVICES='-1' hides" if driver_lists_gpus() else "nvidia-smi lists none") in lines[0]


@pytest.mark.slow
def test_gpu_check_names_a_hidden_gpu(tmp_path):
    """With a (fake) driver listing a GPU and CUDA_VISIBLE_DEVICES=-1, the reason is the variable."""
    folder = tmp_path / "bin"
    folder.mkdir()
    fake = folder / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA L4 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = cpu_env(PATH=f"{folder}{os.pathsep}{os.environ['PATH']}")
    done = run_python(["-m", "benchmarks.gpu_check"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "gpu-check: no GPU visible to TensorFlow (CUDA_VISIBLE_DEVICES='-1' hides the GPU that nvidia-smi "
        "lists; unset it); nothing to check"
    ]


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        # NVIDIA's data-sheet figures, dense: H100 SXM, H200, A100, L4, V100 SXM2, T4.
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 67e12),
        ("NVIDIA H200", "float16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100-PCIE-40GB", "float32", 19.5e12),
        ("NVIDIA L4", "float16", 121e12),
        ("NVIDIA L4", "float32", 30.3e12),
        ("Tesla V100-SXM2-16GB", "float16", 125e12),
        ("Tesla V100-SXM2-16GB", "float32", 15.7e12),
        ("Tesla T4", "float16", 65e12),
        ("Tesla T4", "float32", 8.1e12),
        # Not in the table: measured instead.
        ("Tesla V100-SXM2-16GB", "bfloat16", None),  # no bfloat16 on compute capability 7.0
        ("Tesla T4", "bfloat16", None),
        ("NVIDIA H100 PCIe", "bfloat16", None),  # other clocks than the SXM module
        ("NVIDIA H200 NVL", "bfloat16", None),
        ("NVIDIA L40S", "bfloat16", None),  # "L4" must not match "L40S"
        ("NVIDIA GeForce RTX 4090", "float16", None),
    ],
)
def test_known_gpu_peaks(name, precision, peak):
    assert gpu_check.known_peak(name, precision) == peak


@pytest.mark.parametrize(
    "precision, capability, skipped",
    [
        ("bfloat16", (7, 5), True),
        ("bfloat16", (8, 0), False),
        ("bfloat16", (9, 0), False),
        ("float16", (6, 1), True),
        ("float16", (7, 0), False),
        ("float32", (3, 5), False),
    ],
)
def test_precisions_skipped_below_their_compute_capability(precision, capability, skipped):
    reason = gpu_check.skip_reason(precision, capability)
    assert (reason is not None) == skipped
    if skipped:
        assert f"compute capability {capability[0]}.{capability[1]} <" in reason


def test_the_skipped_precisions_are_the_devices_table():
    """gpu-check skips a precision exactly where tfgpt.runtime.devices says a
    GPU does not multiply in it natively, and reads the one table: changing
    devices.MIN_CAPABILITY changes what it skips."""
    from tfgpt.runtime import devices

    for major in range(3, 11):
        for minor in range(10):
            gpu = devices.Devices(gpus=True, count=1, gpu_details=(dict(compute_capability=(major, minor)),))
            for precision in devices.PRECISIONS:
                skipped = gpu_check.skip_reason(precision, (major, minor)) is not None
                assert skipped == (not devices.native(precision, gpu)), (precision, major, minor)
    assert gpu_check.PRECISIONS is devices.PRECISIONS
    with pytest.MonkeyPatch.context() as m:
        m.setitem(devices.MIN_CAPABILITY, "float16", (7, 5))
        assert gpu_check.skip_reason("float16", (7, 0)) == (
            "float16 rows skipped: compute capability 7.0 < 7.5 (no float16 tensor cores)"
        )


def test_a_failing_variant_is_reported_in_one_line(tmp_path):
    windows = gpu_check.write_windows(tmp_path / "w.npy", 8, 8, 40)
    spec = dict(
        precision="float64", xla=False, replicas=1, steps=1, warmup=1, windows=str(windows), batch_size=8, gpus=None
    )
    row, why = gpu_check.run_variant(spec, timeout=300)
    assert row is None and why.startswith("failed: ") and "\n" not in why
    assert "float64" in why


@pytest.mark.slow
def test_gpu_check_cpu_smoke_prints_consistent_rows(tmp_path):
    """--cpu-smoke: the check's whole path on the CPU with one small variant.
    Its row's figures must agree with each other: tokens/s = batch x 80 /
    step time, TFLOP/s = tokens/s x FLOPs per token, MFU = TFLOP/s / peak."""
    done = run_python(["-m", "benchmarks.gpu_check", "--cpu-smoke"], env=cpu_env(), cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    out = done.stdout
    assert re.search(rf"^gpu-check: training on .+\({os.cpu_count()} cores, (oneDNN|Eigen) .+\)$", out, re.M), out
    number = r"([\d.,]+)"
    row = re.search(
        rf"^float32\s+off\s+8\s+1\s+{number}\s+{number}\s+{number}\s+{number}\s+\(measured\)\s+"
        rf"{number}%\s+{number}$",
        out,
        re.M,
    )
    assert row, out
    ms, tokens_s, tflops, peak, mfu, warmup_s = (float(g.replace(",", "")) for g in row.groups())
    assert tokens_s == pytest.approx(8 * 80 / (ms / 1000), rel=2e-3, abs=1)
    assert tflops == pytest.approx(tokens_s * flops_per_token(GPTConfig()) / 1e12, rel=2e-3)
    assert mfu == pytest.approx(100 * tflops / peak, rel=2e-3, abs=0.06)
    assert 0 < mfu and warmup_s > 0
    assert "two GPUs: skipped (0 visible)" in out
    # The sampler's table: tokens/s at batch 32 = 32 x 1000 / ms per token.
    sampled = dict(
        (int(b), (float(ms_t), float(tps)))
        for b, ms_t, tps in re.findall(r"^cache\s+(\d+)\s+4\s+([\d.]+)\s+(\d+)$", out, re.M)
    )
    assert set(sampled) == {1, 32}, out
    ms_t, tps = sampled[32]
    assert tps == pytest.approx(32 * 1000 / ms_t, rel=2e-3, abs=1)


class FakeCheck:
    """gpu_check.main on a (faked) machine with two GPUs, every process it
    would start replaced: training variants, `train.py --gpus 2`, the
    sampler and the GPU tests each succeed or fail as told."""

    def __init__(self, monkeypatch, variant_fails=False, two_gpus=None, tests=0):
        import tensorflow as tf

        from tfgpt.runtime import devices

        gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2)]
        real = tf.config.list_physical_devices
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda k=None: gpus if k == "GPU" else real(k))
        detail = dict(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), memory=80 << 30)
        monkeypatch.setattr(devices, "gpu_details", lambda: [detail, detail])
        monkeypatch.setattr(devices, "describe", lambda s: "1 x NVIDIA H100 80GB HBM3 (compute capability 9.0)")
        monkeypatch.setattr(devices, "fastest_precision", lambda s: "bfloat16")
        monkeypatch.setattr(gpu_check, "make_strategy", lambda **kw: tf.distribute.get_strategy())
        monkeypatch.setattr(gpu_check, "sampler_bench", lambda **kw: None)
        row = dict(ms_per_step=10.0, tokens_per_s=1e6, peak_gflops=1e5, warmup_s=1.0)
        monkeypatch.setattr(
            gpu_check, "run_variant", lambda spec, t: (None, "failed: boom") if variant_fails else (dict(row), "")
        )
        two = two_gpus or (
            dict(device_line="devices: 2 x H100 (compute capability 9.0); 2 replica(s);", tokens_per_s=2e6),
            "",
        )
        monkeypatch.setattr(gpu_check, "train_two_gpus", lambda *a, **k: two)
        monkeypatch.setattr(gpu_check, "run_gpu_tests", lambda left: tests)


@pytest.mark.parametrize(
    "fault, status, said",
    [
        (None, 0, None),
        ("variant", 1, "float32 xla off batch 128 x 1 GPU(s)"),
        ("two_gpus", 1, "train.py --gpus 2: failed: it did not train on two GPUs"),
        ("tests", 1, "the GPU tests (exit status 1)"),
    ],
)
def test_gpu_check_exits_non_zero_when_anything_fails(monkeypatch, capsys, fault, status, said):
    """A failed training variant, a `train.py --gpus 2` that trained on
    anything but two GPUs, or failed GPU tests: exit status 1 and a last
    line that names them; all well: 0."""
    two = (None, "failed: it did not train on two GPUs (devices: AMD EPYC (2 cores))") if fault == "two_gpus" else None
    FakeCheck(monkeypatch, variant_fails=fault == "variant", two_gpus=two, tests=1 if fault == "tests" else 0)
    assert gpu_check.main(["--budget", "100000", "--steps", "1"]) == status
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    if said:
        assert last.startswith("gpu-check: FAILED: ") and said in last, out
    else:
        assert "FAILED" not in out and "two GPUs / one GPU: 2.00x" in out, out


@pytest.mark.parametrize(
    "status, out, err, want",
    [
        (
            0,
            "devices: 2 x NVIDIA H100 80GB HBM3 (compute capability 9.0, 80 GiB); precision bfloat16; XLA on; "
            "2 replica(s); 10 step(s) per call\n"
            + "".join(
                f"10/60 - step {i} - loss: 5.0 - 20ms/step - {r} tok/s - ETA 0:01\n"
                for i, r in enumerate(["1,000", "90,000", "100,000", "110,000", "100,500", "99,000"])
            ),  # fmt: skip
            "",
            100_500.0,
        ),
        (0, "devices: AMD EPYC (2 cores, oneDNN AVX2); precision float32; XLA on; 1 replica(s);\n", "", "two GPUs"),
        (2, "", "train.py: error: --gpus 2 asked for, but TensorFlow sees 1 GPU\n", "exit status 2"),
        (0, "nothing\n", "", "no device line"),
    ],
)
def test_the_two_gpu_run_is_read_from_what_train_py_prints(status, out, err, want):
    row, why = gpu_check.read_two_gpu_run(status, out, err)
    if isinstance(want, float):
        assert why == "" and row["tokens_per_s"] == want and "2 x NVIDIA" in row["device_line"]
    else:
        assert row is None and want in why and "\n" not in why


def test_gpu_check_without_the_gpu_tests_says_so_before_benchmarking(monkeypatch, capsys, tmp_path):
    """Outside a checkout (no tests/test_gpu.py) the check stops at once with a
    one-line error naming the missing file and --no-tests, instead of after
    its benchmarks; a device error is its one line too."""
    from tfgpt.errors import UserError

    FakeCheck(monkeypatch)
    monkeypatch.setattr(gpu_check, "GPU_TESTS", tmp_path / "tests" / "test_gpu.py")
    ran = []
    monkeypatch.setattr(gpu_check, "run_variant", lambda spec, t: ran.append(spec))
    assert gpu_check.main(["--budget", "100000", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"gpu-check: error: {tmp_path / 'tests' / 'test_gpu.py'} not found: the GPU tests run from a checkout of "
        "tfgpt with its tests/ folder; pass --no-tests to run the benchmarks alone"
    ]
    assert not ran

    def refuse(**kw):
        raise UserError("--gpus 1 asked for, but TensorFlow sees 0 GPUs: something")

    monkeypatch.setattr(gpu_check, "make_strategy", refuse)
    assert gpu_check.main(["--no-tests"]) == 2
    assert (
        capsys.readouterr().err.strip() == "gpu-check: error: --gpus 1 asked for, but TensorFlow sees 0 GPUs: something"
    )
