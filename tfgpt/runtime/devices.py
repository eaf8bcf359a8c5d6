"""Devices: which ones a process trains on, what they are, which precision suits them.

  --gpus N          N GPUs of this machine (never CPUs). Only those N are made
                    visible to TensorFlow, with memory growth on, so a run
                    does not take the memory of GPUs it does not use. Several
                    workers on one machine take consecutive groups of N by
                    their local index.
  --cpu-replicas N  N logical CPU devices: the multi-replica code path on a
                    machine without GPUs (correct, not faster; the tests use it)
  neither           one device: the first GPU, else the CPU

Everything here that changes devices must run before TensorFlow initialises
its runtime (before any op). TensorFlow is imported inside the functions, so
that the command line stays fast for its own checks.

What a run's replicas are (`of_strategy`: GPUs or the CPU, and which GPUs)
is asked once; `describe`, `fastest_precision`, `native` and
`resolve_precision` read that answer. Which precision each device multiplies
in natively is one table, `MIN_CAPABILITY` (GPUs) and `CPU_NATIVE` (oneDNN).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess

from tfgpt.config import PRECISIONS
from tfgpt.errors import UserError

# --- what the machine has -------------------------------------------------------


def cpu_info() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of this machine's CPU, from
    /proc/cpuinfo; ("unknown CPU", empty set) where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []

    def field(key):
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)

    return field("model name") or "unknown CPU", set((field("flags") or "").split())


# oneDNN's instruction-set levels, lowest first: the names ONEDNN_MAX_CPU_ISA
# takes (with AVX10_1_* as newer names of two of them).
ISA_LEVELS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
)
_ISA_ALIASES = {"AVX10_1_512": "AVX512_CORE_FP16", "AVX10_1_512_AMX": "AVX512_CORE_AMX"}


def _cpu_best_isa(flags: set[str]) -> str | None:
    """The highest oneDNN level whose instructions the CPU flags list; None
    for a CPU that is not x86-64 (no sse4_1 flag)."""
    if "amx_bf16" in flags:
        return "AVX512_CORE_AMX"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        if "avx512_bf16" in flags:
            return "AVX512_CORE_BF16"
        return "AVX512_CORE_VNNI" if "avx512_vnni" in flags else "AVX512_CORE"
    for level, flag in (("AVX2", "avx2"), ("AVX", "avx"), ("SSE41", "sse4_1")):
        if flag in flags:
            return level
    return None


def cpu_isa() -> str | None:
    """The instruction set of oneDNN's CPU kernels in this process: the CPU's
    best, lowered by ONEDNN_MAX_CPU_ISA when that names a lower level (oneDNN
    reads it once, at start-up); None on a CPU that is not x86-64."""
    best = _cpu_best_isa(cpu_info()[1])
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    cap = _ISA_ALIASES.get(cap, cap)
    if best is not None and cap in ISA_LEVELS and ISA_LEVELS.index(cap) < ISA_LEVELS.index(best):
        return cap
    return best


def onednn_enabled() -> bool:
    """Whether TensorFlow sends matrix products to oneDNN (on x86-64 unless
    TF_ENABLE_ONEDNN_OPTS turns it off), rather than to Eigen."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false")


def isa_at_least(level: str) -> bool:
    """Whether oneDNN runs here at `level` (a name of ISA_LEVELS) or above."""
    isa = cpu_isa()
    return onednn_enabled() and isa is not None and ISA_LEVELS.index(isa) >= ISA_LEVELS.index(level)


def cpu_kernels() -> str:
    """The CPU's matrix-product kernels in a few words, for the device line
    and the benchmarks: e.g. "oneDNN AVX512_CORE_BF16", "oneDNN AVX2
    (ONEDNN_MAX_CPU_ISA)", "Eigen (TF_ENABLE_ONEDNN_OPTS=0)"."""
    if not onednn_enabled():
        return "Eigen (TF_ENABLE_ONEDNN_OPTS=0)"
    isa = cpu_isa()
    if isa is None:
        return "not x86-64"
    capped = isa != _cpu_best_isa(cpu_info()[1])
    return f"oneDNN {isa}" + (" (ONEDNN_MAX_CPU_ISA)" if capped else "")


def bfloat16_aborts() -> bool:
    """True where a bfloat16 product would abort the process: TensorFlow sends
    bfloat16 products to oneDNN on any CPU with AVX-512 (it asks the CPU,
    not ONEDNN_MAX_CPU_ISA), and oneDNN has no bfloat16 kernel below its
    AVX512_CORE level ("could not create a primitive descriptor")."""
    isa = cpu_isa()
    return (
        onednn_enabled()
        and "avx512f" in cpu_info()[1]
        and isa is not None
        and ISA_LEVELS.index(isa) < ISA_LEVELS.index("AVX512_CORE")
    )


BFLOAT16_LEFT_OUT = "note: bfloat16 left out: oneDNN has no bfloat16 kernel under this ONEDNN_MAX_CPU_ISA"


def runnable_precisions(precisions) -> tuple:
    """`precisions` less bfloat16 where it would abort the process
    (`bfloat16_aborts`); the benchmarks then print BFLOAT16_LEFT_OUT."""
    return tuple(p for p in precisions if not (p == "bfloat16" and bfloat16_aborts()))


def rows_batch_invariant(precision: str) -> bool:
    """Whether a row's numbers in generation (the decode step and the output
    layer) are bit for bit the same alone and in any batch on this CPU, in
    this precision: on oneDNN's AVX-512 kernels, and for bfloat16 only with
    native bfloat16 (AVX512_CORE_BF16 or AMX). Elsewhere (AVX2, AVX-512
    without BF16 in bfloat16, Eigen) the products' kernels change with the
    number of rows, and a row's numbers differ in their last bits
    (docs/serving.md says by how much)."""
    return isa_at_least("AVX512_CORE_BF16" if precision == "bfloat16" else "AVX512_CORE")


def nvidia_smi(*args: str) -> list[str] | None:
    """The output lines of `nvidia-smi ARGS`; None where there is no working
    nvidia-smi (no NVIDIA driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def driver_gpus() -> list[str]:
    """The GPUs the NVIDIA driver lists (`nvidia-smi -L`), whatever TensorFlow sees."""
    return [line for line in nvidia_smi("-L") or [] if line.startswith("GPU ")]


def cuda_libraries_installed() -> bool:
    """Whether the CUDA libraries of `tensorflow[and-cuda]` (pip's nvidia-*
    packages) are installed beside TensorFlow. A system-wide CUDA can serve
    as well, so this only explains a failure; it never causes one."""
    try:
        return importlib.util.find_spec("nvidia.cudnn") is not None
    except (ImportError, ValueError):
        return False


def why_no_gpus(asked: int | None = None, found: int = 0) -> str:
    """Why TensorFlow sees fewer GPUs than wanted, with the likely reason and
    its fix, on one line: for --gpus `asked` the whole error, which says what
    TensorFlow sees; for `asked` None the reason alone, why it sees no GPU (a
    clause for a warning or gpu-check's line)."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    listed = driver_gpus()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    sees = f"TensorFlow sees {found} GPU{'' if found == 1 else 's'}"
    if found:
        reason = f"use --gpus {found} or fewer"
        if len(listed) > found:
            reason += (
                f" (nvidia-smi lists {len(listed)}; CUDA_VISIBLE_DEVICES={hidden!r} hides the others)"
                if hidden is not None
                else f" (nvidia-smi lists {len(listed)})"
            )
        return f"--gpus {asked} asked for, but {sees}; {reason}"
    # (what joins the reason to "--gpus N asked for, but TensorFlow sees 0 GPUs", the reason, what follows it)
    after = ""
    if not tf.test.is_built_with_cuda():
        join, reason = (
            ": ",
            (
                "this TensorFlow build has no CUDA support; install the GPU build with `make venv GPU=1` "
                "(pip install 'tensorflow[and-cuda]')"
            ),
        )
    elif not listed:
        join, reason = " and ", "nvidia-smi lists none (no NVIDIA driver or GPU on this machine)"
        after = "; to train several replicas on the CPU use --cpu-replicas N"
    elif hidden is not None and hidden.strip() in ("", "-1"):
        which = "the GPU" if len(listed) == 1 else f"all {len(listed)} GPUs"
        join, reason = ": ", f"CUDA_VISIBLE_DEVICES={hidden!r} hides {which} that nvidia-smi lists; unset it"
    elif not cuda_libraries_installed():
        join, reason = (
            f" while nvidia-smi lists {len(listed)}: ",
            (
                "TensorFlow's CUDA libraries are not installed (the plain tensorflow wheel carries none); run "
                "`make venv GPU=1` (pip install 'tensorflow[and-cuda]')"
            ),
        )
    else:
        join, reason = (
            f" while nvidia-smi lists {len(listed)}: ",
            (
                "TensorFlow could not load its CUDA libraries or they do not match the driver; run with "
                "TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's reason, and reinstall with `make venv GPU=1`"
            ),
        )
    if asked is None:
        return reason
    return f"--gpus {asked} asked for, but {sees}{join}{reason}{after}"


def unused_gpus_warning() -> str | None:
    """For a run without --gpus: a warning when the driver lists GPUs that
    TensorFlow cannot use, so that the run does not fall back to the CPU
    unnoticed; None otherwise."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    listed = driver_gpus()
    if not listed or tf.config.list_physical_devices("GPU"):
        return None
    return (
        f"warning: nvidia-smi lists {len(listed)} GPU{'s' if len(listed) > 1 else ''} but TensorFlow sees none, "
        f"so this run trains on the CPU ({why_no_gpus()})"
    )


# --- choosing devices -------------------------------------------------------------


def use_gpus(count: int, local_index: int = 0) -> list[str]:
    """Makes GPUs local_index*count .. +count the only ones TensorFlow sees,
    with memory growth on; returns their logical names (/gpu:0 ...).

    Where the visible GPUs are exactly `count` (a scheduler such as SLURM
    already gave each process its own), the local index is not applied."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    found = tf.config.list_physical_devices("GPU")
    first = 0 if len(found) == count else local_index * count
    if len(found) < first + count:
        if first:
            raise UserError(
                f"--gpus {count} for the process of local index {local_index} needs GPUs "
                f"{first}..{first + count - 1}, but TensorFlow sees {len(found)}; give each process "
                "on a machine its own GPUs, or fewer --gpus"
            )
        raise UserError(why_no_gpus(count, len(found)))
    chosen = found[first : first + count]
    try:
        tf.config.set_visible_devices(chosen, "GPU")
        for gpu in chosen:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as e:
        raise UserError(f"cannot choose GPUs after TensorFlow has started ({e})") from None
    return [f"/gpu:{i}" for i in range(count)]


def use_logical_cpus(n: int) -> list[str]:
    """Splits the CPU into n logical devices; returns their names."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if not existing or len(existing) < n:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError as e:
            raise UserError(f"cannot split the CPU into {n} devices after TensorFlow has started ({e})") from None
    return [f"/cpu:{i}" for i in range(n)]


def hide_unused_gpus() -> None:
    """For a run on the CPU (--cpu-replicas) on a machine with GPUs: none is used."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    if tf.config.list_physical_devices("GPU"):
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            pass  # the runtime is already up; the strategy names its CPU devices anyway


def local_devices(gpus: int | None, cpu_replicas: int | None = None, local_index: int = 0) -> list[str] | None:
    """The devices of this process for --gpus / --cpu-replicas (each at least
    1, not both: the command line checks them); None for the default (one
    device)."""
    if gpus is not None:
        return use_gpus(gpus, local_index)
    if cpu_replicas is not None:
        hide_unused_gpus()
        return use_logical_cpus(cpu_replicas)
    return None


# --- what the run uses ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Devices:
    """What the replicas of this process run on, asked once (`of_strategy`)."""

    gpus: bool  # every replica on a GPU (else on the CPU)
    count: int  # devices of this process: its replicas
    gpu_details: tuple = ()  # `gpu_details()` of the visible GPUs, when gpus


def all_gpus(strategy) -> bool:
    """True when every replica of this process runs on a GPU."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return bool(tf.config.get_visible_devices("GPU"))
    return all("GPU" in d.upper() for d in strategy.extended.worker_devices)


def of_strategy(strategy) -> Devices:
    """The devices of this process's replicas under `strategy`."""
    try:
        count = len(strategy.extended.worker_devices)
    except (RuntimeError, AttributeError, NotImplementedError):
        count = 1
    gpus = all_gpus(strategy)
    return Devices(gpus=gpus, count=count, gpu_details=tuple(gpu_details()) if gpus else ())


def gpu_details() -> list[dict]:
    """For each GPU TensorFlow uses: name, compute capability (major, minor)
    and memory in bytes (from nvidia-smi, matched by name; None if unknown)."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    memory = {}
    for line in nvidia_smi("--query-gpu=name,memory.total", "--format=csv,noheader,nounits") or []:
        name, _, mib = line.rpartition(",")
        if mib.strip().isdigit():
            memory[name.strip()] = int(mib) << 20
    out = []
    for gpu in tf.config.get_visible_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        name = details.get("device_name", gpu.name)
        out.append(
            dict(
                name=name,
                compute_capability=tuple(details.get("compute_capability") or (0, 0)),
                memory=memory.get(name),
            )
        )
    return out


def describe(devices: Devices) -> str:
    """What the replicas of this process run on, in a few words, e.g.
    '2 x NVIDIA H100 80GB HBM3 (compute capability 9.0, 80 GiB)'."""
    if devices.gpus:
        gpus = devices.gpu_details[: devices.count] or [dict(name="GPU", compute_capability=(0, 0), memory=None)]
        parts = []
        for d in gpus:
            cc = ".".join(map(str, d["compute_capability"]))
            mem = f", {d['memory'] / 2**30:.0f} GiB" if d["memory"] else ""
            parts.append(f"{d['name']} (compute capability {cc}{mem})")
        if len(set(parts)) == 1:
            return f"{len(parts)} x {parts[0]}"
        return ", ".join(parts)
    name, _ = cpu_info()
    what = f"{name} ({os.cpu_count()} cores, {cpu_kernels()})"
    return f"{devices.count} logical devices on {what}" if devices.count > 1 else what


# --- precision ----------------------------------------------------------------------

# Where a precision other than float32 multiplies natively: on GPUs from a
# compute capability (tensor cores: bfloat16 from 8.0, A100 and H100; float16
# from 7.0, V100 and T4), on CPUs from a oneDNN level (AVX512_CORE_BF16: AMX or
# AVX512-BF16 in /proc/cpuinfo, not capped by ONEDNN_MAX_CPU_ISA); a precision
# absent from CPU_NATIVE is native on no CPU. float32 is native everywhere.
MIN_CAPABILITY = {"bfloat16": (8, 0), "float16": (7, 0)}
CPU_NATIVE = {"bfloat16": "AVX512_CORE_BF16"}


def native_on_gpus(precision: str, capabilities) -> bool:
    """Whether GPUs of these compute capabilities ((major, minor) each; none
    known counts as 0.0) all multiply in `precision` natively."""
    need = MIN_CAPABILITY.get(precision)
    return need is None or all(tuple(c) >= need for c in capabilities or [(0, 0)])


def native(precision: str, devices: Devices) -> bool:
    """Whether the devices multiply in `precision` natively (float32 always)."""
    if precision == "float32":
        return True
    if devices.gpus:
        return native_on_gpus(precision, [d["compute_capability"] for d in devices.gpu_details])
    return precision in CPU_NATIVE and isa_at_least(CPU_NATIVE[precision])


def fastest_precision(devices: Devices) -> str:
    """The compute precision that trains fastest on these devices: bfloat16
    where it is native, else float16 where it is native (GPUs of compute
    capability 7.x, with loss scaling), else float32 (on a CPU without native
    bfloat16 it would be emulated, slower, or abort: `bfloat16_aborts`).
    The measured speeds are in docs/performance.md.
    """
    return next((p for p in ("bfloat16", "float16") if native(p, devices)), "float32")


def auto_reason(precision: str, devices: Devices) -> str:
    """Why `--precision auto` chose `precision` (`fastest_precision`) on these
    devices, for the device line. On a CPU without native bfloat16 auto keeps
    float32: there bfloat16 is converted in software, and where it was
    measured (AVX2, docs/performance.md) it was not clearly faster than
    float32, nor checked to learn as well, or its products abort
    (`bfloat16_aborts`)."""
    if devices.gpus:
        return f"{precision}, the fastest precision these GPUs multiply in natively"
    if precision == "bfloat16":
        return f"bfloat16, native on this CPU ({CPU_NATIVE['bfloat16']})"
    if bfloat16_aborts():
        return "float32; bfloat16 would abort on these oneDNN kernels"
    return "float32; bfloat16 is not native on this CPU and measured no faster where it is converted"


def compute_dtype(precision: str):
    """The tf.DType of a precision name."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    return {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}[precision]


def resolve_precision(asked: str, devices: Devices) -> str:
    """The compute precision for --precision `asked` on these devices."""
    if asked == "auto":
        return fastest_precision(devices)
    if asked not in PRECISIONS:
        raise UserError(f"--precision must be auto or one of {', '.join(PRECISIONS)}, got {asked!r}")
    if asked == "bfloat16" and not devices.gpus:
        check_bfloat16_runs()
    return asked


def check_bfloat16_runs() -> None:
    """Raises UserError where bfloat16 products would abort the process on
    this CPU (`bfloat16_aborts`)."""
    if bfloat16_aborts():
        raise UserError(
            f"bfloat16 cannot run here: TensorFlow sends it to oneDNN, and ONEDNN_MAX_CPU_ISA="
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA')} leaves oneDNN no bfloat16 kernel; unset it, or use "
            "--precision float32"
        )
