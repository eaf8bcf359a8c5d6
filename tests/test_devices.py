"""Devices: --gpus means GPUs (with a one-line reason when TensorFlow sees
too few), --cpu-replicas means logical CPUs, only the GPUs used are visible,
and the precision follows the devices. GPUs are faked at the
tf.config level; the CLI errors run in real processes."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from helpers import MICRO, run_train_py, strategy_for, train_env

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.errors import UserError
from tfgpt.runtime import devices
from tfgpt.train.plan import make_plan


class FakeGPUs:
    """tf.config's device functions for a machine with `count` GPUs."""

    def __init__(self, monkeypatch, count, capability=(9, 0), name="NVIDIA H100 80GB HBM3"):
        self.gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(count)]
        self.visible, self.growth = list(self.gpus), []
        real = tf.config.list_physical_devices
        monkeypatch.setattr(
            tf.config, "list_physical_devices", lambda kind=None: list(self.gpus) if kind == "GPU" else real(kind)
        )
        monkeypatch.setattr(tf.config, "set_visible_devices", self.set_visible)
        monkeypatch.setattr(
            tf.config, "get_visible_devices", lambda kind=None: list(self.visible) if kind == "GPU" else []
        )
        monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda d, on: self.growth.append((d, on)))
        monkeypatch.setattr(
            tf.config.experimental,
            "get_device_details",
            lambda d: {"device_name": name, "compute_capability": capability},
        )
        monkeypatch.setattr(
            devices,
            "nvidia_smi",
            lambda *a: (
                [f"{name}, 81559"]
                if "--query-gpu" in a[0]
                else [f"GPU {i}: {name} (UUID: GPU-{i})" for i in range(count)]
            ),
        )

    def set_visible(self, chosen, kind=None):
        self.visible = list(chosen)


def test_gpus_are_chosen_by_local_index_with_memory_growth(monkeypatch):
    fake = FakeGPUs(monkeypatch, 4)
    assert devices.use_gpus(2, local_index=1) == ["/gpu:0", "/gpu:1"]
    assert fake.visible == fake.gpus[2:4]
    assert fake.growth == [(fake.gpus[2], True), (fake.gpus[3], True)]
    assert devices.use_gpus(1, local_index=3) and fake.visible == [fake.gpus[3]]
    with pytest.raises(UserError, match=r"local index 2 needs GPUs 4\.\.5, but TensorFlow sees 4"):
        devices.use_gpus(2, local_index=2)


def test_a_scheduler_that_gave_each_process_its_gpus_is_respected(monkeypatch):
    """Exactly the asked number visible (e.g. SLURM set CUDA_VISIBLE_DEVICES):
    the local index is not applied again."""
    fake = FakeGPUs(monkeypatch, 2)
    assert devices.use_gpus(2, local_index=3) == ["/gpu:0", "/gpu:1"]
    assert fake.visible == fake.gpus


def test_too_few_gpus_is_one_line_saying_what_tensorflow_sees(monkeypatch):
    FakeGPUs(monkeypatch, 2)
    with pytest.raises(UserError) as e:
        devices.use_gpus(3)
    assert str(e.value).startswith("--gpus 3 asked for, but TensorFlow sees 2 GPUs; use --gpus 2 or fewer")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "cuda_build, listed, hidden, libraries, expect",
    [
        (
            False,
            2,
            None,
            False,
            "this TensorFlow build has no CUDA support; install the GPU build with `make venv GPU=1`",
        ),
        (
            True,
            0,
            None,
            False,
            "nvidia-smi lists none (no NVIDIA driver or GPU on this machine); to train several "
            "replicas on the CPU use --cpu-replicas N",
        ),
        (True, 2, "-1", True, "CUDA_VISIBLE_DEVICES='-1' hides all 2 GPUs that nvidia-smi lists; unset it"),
        (True, 2, None, False, "while nvidia-smi lists 2: TensorFlow's CUDA libraries are not installed"),
        (True, 2, None, True, "could not load its CUDA libraries or they do not match the driver"),
    ],
)
def test_the_reason_for_no_gpu(monkeypatch, cuda_build, listed, hidden, libraries, expect):
    monkeypatch.setattr(tf.test, "is_built_with_cuda", lambda: cuda_build)
    monkeypatch.setattr(devices, "driver_gpus", lambda: [f"GPU {i}: X" for i in range(listed)])
    monkeypatch.setattr(devices, "cuda_libraries_installed", lambda: libraries)
    if hidden is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    message = devices.why_no_gpus(2, 0)
    assert message.startswith("--gpus 2 asked for, but TensorFlow sees 0 GPUs")
    assert expect in message and "\n" not in message
    # The reason alone (a warning's, gpu-check's) is the same words, without what --gpus asked.
    reason = devices.why_no_gpus()
    assert reason in message and not reason.startswith("--gpus") and "\n" not in reason


def test_one_hidden_gpu_is_named_in_the_singular(monkeypatch):
    monkeypatch.setattr(tf.test, "is_built_with_cuda", lambda: True)
    monkeypatch.setattr(devices, "driver_gpus", lambda: ["GPU 0: X"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.why_no_gpus(1, 0) == (
        "--gpus 1 asked for, but TensorFlow sees 0 GPUs: CUDA_VISIBLE_DEVICES='' hides the GPU that nvidia-smi "
        "lists; unset it"
    )


def test_precision_follows_the_gpus_compute_capability(monkeypatch):
    strategy = tf.distribute.get_strategy()
    for capability, fastest in (
        ((9, 0), "bfloat16"),
        ((8, 0), "bfloat16"),
        ((7, 0), "float16"),
        ((7, 5), "float16"),
        ((6, 1), "float32"),
    ):
        with monkeypatch.context() as m:
            FakeGPUs(m, 1, capability=capability)
            found = devices.of_strategy(strategy)
            assert found.gpus and devices.all_gpus(strategy)
            assert devices.fastest_precision(found) == fastest
            assert devices.resolve_precision("auto", found) == fastest
            assert devices.resolve_precision("float32", found) == "float32"
            assert devices.native("bfloat16", found) == (capability[0] >= 8)
            assert devices.native("float16", found) == (capability[0] >= 7)


def test_the_device_line_names_model_capability_and_memory(monkeypatch):
    FakeGPUs(monkeypatch, 2)
    assert (
        devices.describe(devices.of_strategy(tf.distribute.get_strategy()))
        == "1 x NVIDIA H100 80GB HBM3 (compute capability 9.0, 80 GiB)"
    )
    monkeypatch.undo()
    cpu = devices.describe(devices.of_strategy(tf.distribute.get_strategy()))
    assert devices.cpu_info()[0] in cpu and f"{os.cpu_count()} cores" in cpu


def test_compute_dtypes():
    assert [devices.compute_dtype(p) for p in devices.PRECISIONS] == [tf.float32, tf.bfloat16, tf.float16]


# --- the command line, in real processes ------------------------------------------------


def run_train(args, tmp_path, path_dir=None, **env):
    environ = train_env(**env)
    if path_dir is not None:
        environ["PATH"] = f"{path_dir}:{environ['PATH']}"
    corpus = tmp_path / "c.txt"
    corpus.write_text("this movie is good\n" * 50)
    return run_train_py(
        ["--data", str(corpus), "--logdir", str(tmp_path / "logs"), "--max-steps", "1", *args], env=environ
    )


@pytest.mark.slow
@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="about machines without a GPU")
def test_gpus_on_a_machine_without_gpu_is_one_line_not_a_cpu_fallback(tmp_path):
    out = run_train(["--gpus", "2"], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "--gpus 2 asked for, but TensorFlow sees 0 GPUs" in errors[0]
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "logs").rglob("config.json"))  # stopped before the run began


@pytest.mark.slow
@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="about machines without a GPU")
def test_a_driver_without_cuda_libraries_names_the_fix(tmp_path):
    """nvidia-smi lists GPUs (a fake one on PATH) but TensorFlow has no CUDA
    libraries, as with the plain tensorflow wheel on a GPU machine."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-0)'\n"
        "echo 'GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-1)'\n"
    )
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run(
        [sys.executable, "-c", "from tfgpt.runtime import devices; print(devices.why_no_gpus(2, 0))"],
        capture_output=True,
        text=True,
        env=dict(env, PATH=f"{fake}:{env['PATH']}", TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "while nvidia-smi lists 2" in out.stdout
    assert "make venv GPU=1" in out.stdout


@pytest.mark.slow
def test_gpus_and_cpu_replicas_exclude_each_other(tmp_path):
    out = run_train(["--gpus", "1", "--cpu-replicas", "2"], tmp_path)
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1]
        == "train.py: error: --gpus and --cpu-replicas exclude each other: train on GPUs or on the CPU"
    )


@pytest.mark.slow
def test_a_deterministic_float16_run_from_the_command_line(tmp_path):
    """--precision float16 --deterministic through train.py: the first line
    names the devices and settings, config.json records what was resolved,
    and the float16 export generates."""
    out = run_train(
        [
            "--precision",
            "float16",
            "--deterministic",
            "--run-name",
            "r",
        ]
        + MICRO,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first = out.stdout.splitlines()[0]
    assert first.startswith("devices: ") and "precision float16" in first and "deterministic ops" in first
    assert "1 replica(s)" in first and "XLA off" in first
    config = json.loads((tmp_path / "logs" / "r" / "config.json").read_text())["train"]
    assert config["precision"] == config["compute_precision"] == "float16" and config["deterministic"]
    assert (tmp_path / "logs" / "r" / "export" / "1" / "saved_model.pb").exists()
    assert "sample: this movie is" in out.stdout or "sample: this movie" in out.stdout


def test_resume_checks_the_precision_against_the_devices(monkeypatch):
    """A run that trained in bfloat16 (auto on an A100, say) resumed on
    devices where auto means float16 trains on in float16 and says so; an
    explicit bfloat16 on devices without it is pointed out."""
    strategy = tf.distribute.get_strategy()
    FakeGPUs(monkeypatch, 1, capability=(7, 0), name="Tesla V100-SXM2-16GB")
    saved = TrainConfig(precision="auto", compute_precision="bfloat16")
    plan = make_plan(GPTConfig(), saved, strategy, resume=True)
    assert plan.precision == "float16" and plan.native
    assert plan.notes == ("precision: float16 on these devices (--precision auto); the run trained in bfloat16 before",)
    plan = make_plan(GPTConfig(), TrainConfig(precision="bfloat16", compute_precision="bfloat16"), strategy, True)
    assert plan.precision == "bfloat16" and not plan.native
    assert plan.notes == (
        "warning: --precision bfloat16 is not native on these devices: slower than float32, or emulated",
    )
    assert make_plan(GPTConfig(), TrainConfig(precision="auto"), strategy, resume=False).notes == ()
    # Not resuming (a Trainer built from a run's resolved config): the resolved precision stands.
    assert make_plan(GPTConfig(), saved, strategy).precision == "bfloat16"


# --- the plan -------------------------------------------------------------------

# (GPU compute capability or None for this CPU, TrainConfig settings) -> what
# the code before tfgpt/train/plan.py decided (tfgpt.run.resolve_devices and
# device_line, tfgpt.trainer's use_xla, auto_steps_per_call and loss chunk),
# for GPTConfig(vocab_size=20000, maxlen=128) at batch 64 on the default
# strategy: precision, XLA, steps per call, loss rows and chunk, notes.
BIG = GPTConfig(vocab_size=20000, maxlen=128, embed_dim=16, num_heads=2, ff_dim=16, num_layers=1)
PLANS = [
    ((9, 0), dict(log_every=500), ("bfloat16", True, 100, 8192, 8192), ()),
    (
        (8, 6),
        dict(log_every=1, compute_precision="float16"),
        ("bfloat16", True, 1, 8192, 8192),
        ("precision: bfloat16 on these devices (--precision auto); the run trained in float16 before",),
    ),
    (
        (6, 1),
        dict(xla="off", steps_per_call=3, precision="bfloat16", deterministic=True),
        ("bfloat16", False, 3, 8192, 8192),
        ("warning: --precision bfloat16 is not native on these devices: slower than float32, or emulated",),
    ),
    ((7, 5), dict(log_every=10, loss_chunk=16), ("float16", True, 10, 8192, 16), ()),
    (
        None,
        dict(xla="on", precision="float16", log_every=500),
        ("float16", True, 1, 8192, 256),
        ("warning: --precision float16 is not native on these devices: slower than float32, or emulated",),
    ),
    (None, dict(precision="float32", log_every=500), ("float32", False, 1, 8192, 256), ()),
]


@pytest.mark.parametrize("capability, settings, decided, notes", PLANS)
def test_the_plan_decides_what_the_devices_decided_before(monkeypatch, capability, settings, decided, notes):
    if capability is None and tf.config.list_physical_devices("GPU"):
        pytest.skip("about machines without a GPU")
    if capability is not None:
        FakeGPUs(monkeypatch, 1, capability=capability)
    cfg = TrainConfig(batch_size=64, **settings)
    plan = make_plan(BIG, cfg, tf.distribute.get_strategy(), resume="compute_precision" in settings)
    assert (plan.precision, plan.xla, plan.steps_per_call, plan.loss_rows, plan.loss_chunk) == decided
    assert plan.notes == notes
    what = (
        f"1 x NVIDIA H100 80GB HBM3 (compute capability {capability[0]}.{capability[1]}, 80 GiB)"
        if capability
        else f"{devices.cpu_info()[0]} ({os.cpu_count()} cores, {devices.cpu_kernels()})"
    )
    precision, xla, per_call = decided[:3]
    assert plan.device_line() == (
        f"devices: {what}; precision {precision}; XLA {'on' if xla else 'off'}; 1 replica(s); "
        f"{per_call} step(s) per call"
        + ("; deterministic ops" if cfg.deterministic else "")
        + (f"; precision auto: {plan.auto}" if cfg.precision == "auto" else "")
    )
    assert bool(plan.auto) == (cfg.precision == "auto")
    # Another vocabulary (the token store's): the chunk again, the devices not asked again.
    monkeypatch.setattr(devices, "all_gpus", lambda s: pytest.fail("the devices asked again"))
    small = plan.for_model(GPTConfig(vocab_size=40, maxlen=128), cfg)
    assert small.loss_chunk == (settings.get("loss_chunk") or 8192) and small.precision == plan.precision


def test_two_cpu_replicas_share_the_batch_and_a_batch_they_cannot_share_is_refused():
    strategy = strategy_for(2)
    plan = make_plan(BIG, TrainConfig(batch_size=64, precision="float32"), strategy)
    assert (plan.replicas, plan.loss_rows, plan.loss_chunk, plan.xla, plan.steps_per_call) == (2, 4096, 256, False, 1)
    assert plan.device_line().startswith("devices: 2 logical devices on ")
    with pytest.raises(UserError, match=r"^--batch-size 7 is not divisible by the 2 replicas$"):
        make_plan(BIG, TrainConfig(batch_size=7), strategy)


def test_a_run_without_gpus_flag_warns_when_the_driver_lists_gpus_tensorflow_cannot_use(monkeypatch):
    """No --gpus on an NVIDIA machine whose TensorFlow sees no GPU: training
    may run on the CPU, but not unnoticed."""
    monkeypatch.setattr(devices, "driver_gpus", lambda: ["GPU 0: NVIDIA L4 (UUID: GPU-0)"])
    monkeypatch.setattr(devices, "cuda_libraries_installed", lambda: False)
    monkeypatch.setattr(tf.test, "is_built_with_cuda", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [] if kind == "GPU" else real(kind))
    message = devices.unused_gpus_warning()
    assert message.startswith(
        "warning: nvidia-smi lists 1 GPU but TensorFlow sees none, so this run trains on "
        "the CPU (TensorFlow's CUDA libraries are not installed"
    )
    monkeypatch.setattr(devices, "driver_gpus", lambda: [])
    assert devices.unused_gpus_warning() is None


# --- precision ------------------------------------------------------------------


AVX512 = "avx2 avx512f avx512bw avx512vl avx512dq"


def fake_cpuinfo(monkeypatch, tmp_path):
    """/proc/cpuinfo replaced by a file of the test's; returns its path."""
    cpuinfo = tmp_path / "cpuinfo"
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda path, *a, **k: real_open(cpuinfo if str(path) == "/proc/cpuinfo" else path, *a, **k)
    )
    for name in ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS"):
        monkeypatch.delenv(name, raising=False)
    return cpuinfo


def test_auto_precision_follows_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = fake_cpuinfo(monkeypatch, tmp_path)
    cpuinfo.write_text(
        f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse {AVX512} avx512_bf16\n\n"
        f"processor\t: 1\nflags\t\t: fpu sse {AVX512} avx512_bf16\n"
    )
    assert devices.cpu_info() == ("Some CPU", {"fpu", "sse", *AVX512.split(), "avx512_bf16"})
    found = devices.of_strategy(tf.distribute.get_strategy())
    if not found.gpus:
        assert devices.fastest_precision(found) == "bfloat16"
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN told to act as an AVX2 CPU
        assert devices.fastest_precision(found) == "float32"
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        for flags, want in (("fpu avx2 amx_bf16", "bfloat16"), (f"fpu {AVX512}", "float32"), ("avx2", "float32")):
            cpuinfo.write_text(f"flags\t: {flags}\n")
            assert devices.fastest_precision(found) == want
        cpuinfo.unlink()  # no /proc/cpuinfo at all
        assert devices.cpu_info() == ("unknown CPU", set())
        assert devices.fastest_precision(found) == "float32"


@pytest.mark.parametrize(
    "flags, cap, precision, line_ends",
    [
        (f"{AVX512} avx512_bf16", None, "bfloat16", "precision auto: bfloat16, native on this CPU (AVX512_CORE_BF16)"),
        ("fpu avx2 amx_bf16", None, "bfloat16", "precision auto: bfloat16, native on this CPU (AVX512_CORE_BF16)"),
        (
            "sse4_1 avx avx2 fma",
            None,
            "float32",
            "precision auto: float32; bfloat16 is not native on this CPU and measured no faster where it is converted",
        ),
        (
            f"{AVX512} avx512_vnni",
            None,
            "float32",
            "precision auto: float32; bfloat16 is not native on this CPU and measured no faster where it is converted",
        ),
        (
            f"{AVX512} avx512_bf16",
            "AVX2",
            "float32",
            "precision auto: float32; bfloat16 would abort on these oneDNN kernels",
        ),
    ],
)
def test_the_device_line_says_what_auto_chose_and_why(monkeypatch, tmp_path, flags, cap, precision, line_ends):
    """--precision auto states its choice on the device line: bfloat16 only
    where the CPU multiplies in it natively; an explicit precision says
    nothing more."""
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("about machines without a GPU")
    fake_cpuinfo(monkeypatch, tmp_path).write_text(f"flags\t: {flags}\n")
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    strategy = tf.distribute.get_strategy()
    plan = make_plan(BIG, TrainConfig(batch_size=64), strategy)
    assert plan.precision == precision
    assert plan.device_line().endswith("; 1 step(s) per call; " + line_ends)
    explicit = make_plan(BIG, TrainConfig(batch_size=64, precision="float32"), strategy)
    assert explicit.device_line().endswith("; 1 step(s) per call")


@pytest.mark.parametrize(
    "flags, cap, onednn, isa, kernels, exact_float32, exact_bfloat16, aborts",
    [
        (f"{AVX512} avx512_bf16", None, None, "AVX512_CORE_BF16", "oneDNN AVX512_CORE_BF16", True, True, False),
        (f"{AVX512} avx512_bf16", "AVX2", None, "AVX2", "oneDNN AVX2 (ONEDNN_MAX_CPU_ISA)", False, False, True),
        (
            f"{AVX512} avx512_bf16",
            "avx512_core",
            None,
            "AVX512_CORE",
            "oneDNN AVX512_CORE (ONEDNN_MAX_CPU_ISA)",
            True,
            False,
            False,
        ),  # fmt: skip
        (f"{AVX512} avx512_bf16", "ALL", None, "AVX512_CORE_BF16", "oneDNN AVX512_CORE_BF16", True, True, False),
        (f"{AVX512} avx512_vnni", None, None, "AVX512_CORE_VNNI", "oneDNN AVX512_CORE_VNNI", True, False, False),
        ("sse4_1 avx avx2 fma", None, None, "AVX2", "oneDNN AVX2", False, False, False),
        ("sse4_1 avx avx2 fma", "AVX512_CORE", None, "AVX2", "oneDNN AVX2", False, False, False),  # a cap only lowers
        (
            f"{AVX512} avx512_bf16",
            None,
            "0",
            "AVX512_CORE_BF16",
            "Eigen (TF_ENABLE_ONEDNN_OPTS=0)",
            False,
            False,
            False,
        ),  # fmt: skip
        ("fp asimd", None, None, None, "not x86-64", False, False, False),
    ],
)
def test_the_cpu_kernels_follow_the_flags_and_onednns_settings(
    monkeypatch, tmp_path, flags, cap, onednn, isa, kernels, exact_float32, exact_bfloat16, aborts
):
    """Which kernels oneDNN runs (its ISA capped by ONEDNN_MAX_CPU_ISA, or
    Eigen with oneDNN off) decides the precision, the batch-invariance
    guarantee and whether bfloat16 runs at all."""
    fake_cpuinfo(monkeypatch, tmp_path).write_text(f"flags\t: {flags}\n")
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    if onednn:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn)
    assert devices.cpu_isa() == isa
    assert devices.cpu_kernels() == kernels
    assert devices.rows_batch_invariant("float32") == exact_float32
    assert devices.rows_batch_invariant("bfloat16") == exact_bfloat16
    assert devices.bfloat16_aborts() == aborts
    found = devices.of_strategy(tf.distribute.get_strategy())
    if aborts:
        with pytest.raises(UserError, match="ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN no bfloat16 kernel"):
            devices.resolve_precision("bfloat16", found)
    elif not found.gpus:
        assert devices.resolve_precision("bfloat16", found) == "bfloat16"


def test_bfloat16_where_it_would_abort_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    """train.py --precision bfloat16 where oneDNN has no bfloat16 kernel
    (ONEDNN_MAX_CPU_ISA below AVX512_CORE on an AVX-512 CPU): exit status 2
    and one line, before any bfloat16 product could abort the process."""
    from helpers import write_corpus

    from tfgpt.cli import main

    monkeypatch.setattr(devices, "bfloat16_aborts", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    corpus = write_corpus(tmp_path / "c.txt", 50)
    args = ["--data", str(corpus), "--logdir", str(tmp_path), "--precision", "bfloat16", *MICRO]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "train.py: error: bfloat16 cannot run here: TensorFlow sends it to oneDNN, and ONEDNN_MAX_CPU_ISA=AVX2 "
        "leaves oneDNN no bfloat16 kernel; unset it, or use --precision float32"
    ]
