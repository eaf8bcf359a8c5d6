"""Devices and strategies.

`make_strategy` must run before TensorFlow initialises its runtime (before any
op), because it may split the CPU into logical devices and because
MultiWorkerMirroredStrategy must be created first.

  no --gpus            the default strategy: one device (the first GPU, else the CPU)
  --gpus N             MirroredStrategy over the first N GPUs; without any GPU,
                       over N logical CPU devices (same code path, for testing)
  TF_CONFIG, >1 worker MultiWorkerMirroredStrategy with --gpus N GPUs per worker
                       (default 1); without GPUs, one CPU replica per worker

TensorFlow is imported inside the functions, so that the command line can
ask whether this process is the chief (from TF_CONFIG alone) before paying
for the import.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

WORKER_JOBS = ("chief", "worker")


class DeviceError(ValueError):
    """A problem with --gpus or TF_CONFIG: reported as one line."""


class ClusterError(RuntimeError):
    """The workers named in TF_CONFIG did not all come up, or stopped
    answering, within --collective-timeout: reported as one line."""


# --- TF_CONFIG ----------------------------------------------------------------

def read_tf_config() -> dict | None:
    """TF_CONFIG, parsed and checked; None when it is unset or empty."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DeviceError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict) or not cfg["cluster"]:
        raise DeviceError('TF_CONFIG must be a JSON object with a non-empty "cluster" entry, e.g. '
                          '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}')
    cluster = cfg["cluster"]
    for job, members in cluster.items():
        if job not in WORKER_JOBS:
            raise DeviceError(f'TF_CONFIG: job "{job}" is not supported; name the processes "chief" and "worker"')
        if not isinstance(members, list) or not members or not all(isinstance(m, str) and ":" in m for m in members):
            raise DeviceError(f'TF_CONFIG: cluster "{job}" must be a non-empty list of "host:port" strings')
    if len(cluster.get("chief", [])) > 1:
        raise DeviceError('TF_CONFIG: a cluster has at most one "chief"')
    task = cfg.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise DeviceError('TF_CONFIG names no task for this process (expected "task": {"type": "worker", "index": N})')
    kind, index = task["type"], task["index"]
    if kind not in cluster or isinstance(index, bool) or not isinstance(index, int) \
            or not 0 <= index < len(cluster[kind]):
        raise DeviceError(f"TF_CONFIG names task {kind}:{index} for this process, which is not in its cluster "
                          f"({', '.join(f'{j}: {len(m)}' for j, m in cluster.items())})")
    return cfg


def cluster_spec_from_env() -> dict | None:
    """TF_CONFIG when it names more than one process (a multi-worker run), else None."""
    cfg = read_tf_config()
    if cfg is None or sum(len(m) for m in cfg["cluster"].values()) < 2:
        return None
    return cfg


def is_chief_task() -> bool:
    """Whether this process is the chief, from TF_CONFIG alone (no TensorFlow):
    the "chief" task, else worker 0; True without a multi-worker TF_CONFIG
    (or with a broken one, which make_strategy reports)."""
    try:
        cfg = cluster_spec_from_env()
    except DeviceError:
        return True
    if cfg is None:
        return True
    kind, index = cfg["task"]["type"], cfg["task"]["index"]
    return kind == "chief" or ("chief" not in cfg["cluster"] and index == 0)


def task_name(cfg: dict) -> str:
    kind, index = cfg["task"]["type"], cfg["task"]["index"]
    return f"{kind} {index} ({cfg['cluster'][kind][index]})"


# --- devices ------------------------------------------------------------------

def _use_logical_cpus(n: int) -> list[str]:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if not existing or len(existing) < n:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError as e:
            raise DeviceError(f"cannot split the CPU into {n} devices after TensorFlow has started ({e})") from None
    return [f"/cpu:{i}" for i in range(n)]


def gpu_count_error(asked: int, found: int) -> str | None:
    """The one-line complaint when --gpus asks for more GPUs than are visible."""
    if found and found < asked:
        return (f"--gpus {asked} asked for, but only {found} GPU{'s are' if found > 1 else ' is'} visible "
                f"on this machine; use --gpus {found} or fewer")
    return None


def local_devices(gpus: int | None, warn=print) -> list[str] | None:
    """The devices of this machine that --gpus asks for; None for the default."""
    import tensorflow as tf

    if gpus is None:
        return None
    if gpus < 1:
        raise DeviceError(f"--gpus must be at least 1, got {gpus}")
    found = tf.config.list_physical_devices("GPU")
    if found:
        message = gpu_count_error(gpus, len(found))
        if message:
            raise DeviceError(message)
        return [f"/gpu:{i}" for i in range(gpus)]
    if gpus > 1:
        warn(f"warning: no GPU found; using {gpus} logical CPU devices (the same multi-replica code, "
             "correct but not faster)")
    return _use_logical_cpus(gpus)


# --- strategies ---------------------------------------------------------------

def make_strategy(gpus: int | None = None, collective_timeout: float = 300.0, warn=print):
    """Builds the strategy for this process (see the module docstring)."""
    import tensorflow as tf

    cluster = cluster_spec_from_env()
    if cluster is not None:
        return _multi_worker_strategy(cluster, gpus, collective_timeout, warn)
    devices = local_devices(gpus, warn)
    if devices is None:
        return tf.distribute.get_strategy()
    if devices[0].startswith("/cpu"):
        # Logical CPU devices: reduce through one device rather than with
        # collective ops, whose instance keys are process-global and collide
        # when a process builds more than one strategy (as tests do).
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    return tf.distribute.MirroredStrategy(devices)


def _multi_worker_strategy(cfg: dict, gpus: int | None, timeout: float, warn):
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    if found:
        per_worker = gpus or 1
        message = gpu_count_error(per_worker, len(found))
        if message:
            raise DeviceError(message)
        tf.config.set_visible_devices(found[:per_worker], "GPU")
        impl = tf.distribute.experimental.CommunicationImplementation.NCCL
    else:
        if gpus and gpus > 1:
            warn(f"warning: no GPU found; each worker trains one replica on its CPU (--gpus {gpus} ignored)")
        impl = tf.distribute.experimental.CommunicationImplementation.RING
    _bound_cluster_startup(cfg, timeout, warn)
    options = tf.distribute.experimental.CommunicationOptions(implementation=impl, timeout_seconds=timeout)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.OpError as e:
        raise ClusterError(f"{task_name(cfg)} could not reach the other workers within {timeout:g} s "
                           f"({type(e).__name__}: {_first_line(e)}); start every worker with the same "
                           "TF_CONFIG cluster and check that each can reach the others' addresses, "
                           "or raise --collective-timeout") from None


def _bound_cluster_startup(cfg: dict, timeout: float, warn) -> None:
    """Makes the start-up wait for the other workers end after `timeout`.

    MultiWorkerMirroredStrategy starts TensorFlow's coordination service with
    no registration deadline, so a worker whose peers never come up waits
    forever (the collective timeout only covers collectives). Configuring the
    service first, as the strategy would, but with a registration barrier and
    deadline, turns that wait into a DeadlineExceededError. The strategy keeps
    a service configured before it."""
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context

        ctx = context.context()
        if ctx.coordination_service is not None:
            return
        cluster = cfg["cluster"]
        leader = "chief" if "chief" in cluster else "worker"
        jobs = [coordination_config_pb2.CoordinatedJob(name=j, num_tasks=len(cluster[j]))
                for j in WORKER_JOBS if j in cluster]
        ctx.configure_coordination_service(
            service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
            coordinated_jobs=jobs, cluster_register_timeout_in_ms=max(1, int(timeout * 1000)))
        ctx.coordination_service.cluster_register_with_barrier = True
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        warn(f"warning: cannot bound the wait for the other workers at start-up ({e}); "
             "a worker whose peers never start may wait indefinitely")


def cluster_failure(strategy, error: BaseException, timeout: float) -> str | None:
    """The one-line message for an error that means the workers lost each
    other during training (a collective timed out or was aborted); None for
    any other error, or when the run has a single worker."""
    import tensorflow as tf

    if not is_multi_worker(strategy):
        return None
    lost = (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.CancelledError, tf.errors.InternalError, tf.errors.FailedPreconditionError)
    if not isinstance(error, lost):
        return None
    cfg = read_tf_config()
    who = task_name(cfg) if cfg else "this worker"
    return (f"{who} lost contact with the other workers (a collective failed or waited longer than "
            f"--collective-timeout {timeout:g} s: {type(error).__name__}: {_first_line(error)}); "
            "resume every worker with --resume from the last checkpoint")


def _first_line(error: BaseException) -> str:
    """The gist of a TensorFlow error in a few words: which task stopped
    answering, else the first sentence of the first informative line."""
    text = getattr(error, "message", None) or str(error)
    dead = re.search(r"stopped sending heartbeats\)?:?\s*(/job:\S+)", text)
    if dead:
        return f"{dead.group(1)} stopped sending heartbeats"
    boring = re.compile(r"(Graph execution error|Detected at node|File \"|Traceback)")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not boring.match(line.strip())]
    return lines[0].split(". ")[0][:200] if lines else type(error).__name__


def is_multi_worker(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return False
    spec = resolver.cluster_spec().as_dict()
    return sum(len(v) if isinstance(v, (list, dict)) else 1 for v in spec.values()) > 1


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def fastest_precision(strategy) -> str:
    """The compute precision that trains fastest on this strategy's devices:
    bfloat16 where every replica multiplies it natively, else float32.

    GPUs: compute capability 8.0 or newer (A100, H100). CPUs: AMX or
    AVX512-BF16 in /proc/cpuinfo. A 2-core training step (`python -m
    tfgpt.bench`) measured 1.39 s in bfloat16 against 2.07 s in float32 with
    AVX512-BF16 (AMD EPYC), 1.00 against 1.66 s with AMX (Intel Xeon); without
    those instructions bfloat16 products are emulated and slower.
    """
    import tensorflow as tf

    if all_gpus(strategy):
        for gpu in tf.config.list_physical_devices("GPU"):
            major = (tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))[0]
            if major < 8:
                return "float32"
        return "bfloat16"
    return "bfloat16" if cpu_info()[1] & {"amx_bf16", "avx512_bf16"} else "float32"


def cpu_info() -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of this machine's CPU, from
    /proc/cpuinfo; ("unknown CPU", empty set) where there is none."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        lines = []

    def field(key):
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)

    return field("model name") or "unknown CPU", set((field("flags") or "").split())


def all_gpus(strategy) -> bool:
    """True when every replica of this process runs on a GPU."""
    import tensorflow as tf

    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return bool(tf.config.list_physical_devices("GPU"))
    return all("GPU" in d.upper() for d in strategy.extended.worker_devices)


# --- the other workers' files -------------------------------------------------

def worker_scratch(run_dir: str | Path, resume: bool) -> Path:
    """For a worker other than the chief: a private temporary folder (removed
    at exit) for the files it needs but must not write into the run directory,
    e.g. its copy of the vocabulary. On --resume it starts with the chief's
    vocabulary when the run directory is visible (a shared filesystem)."""
    scratch = Path(tempfile.mkdtemp(prefix="tfgpt-worker-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    vocab = Path(run_dir) / "vocab.txt"
    if resume and vocab.exists():
        shutil.copyfile(vocab, scratch / "vocab.txt")
    return scratch
