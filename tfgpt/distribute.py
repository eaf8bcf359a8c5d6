"""Devices and strategies.

`make_strategy` must run before TensorFlow initialises its runtime (before any
op), because it may split the CPU into logical devices and because
MultiWorkerMirroredStrategy must be created first.

  no --gpus            the default strategy: one device (the first GPU, else the CPU)
  --gpus N             MirroredStrategy over the first N GPUs; without any GPU,
                       over N logical CPU devices (same code path, for testing)
  TF_CONFIG, >1 worker MultiWorkerMirroredStrategy with --gpus N devices per worker
"""

from __future__ import annotations

import json
import os

import tensorflow as tf


class DeviceError(ValueError):
    """A problem with --gpus or TF_CONFIG: reported as one line."""


def cluster_spec_from_env() -> dict | None:
    """Parses TF_CONFIG. Returns it when it names more than one worker, else None."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DeviceError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict):
        raise DeviceError('TF_CONFIG must be a JSON object with a "cluster" entry')
    cluster = cfg["cluster"]
    task = cfg.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise DeviceError('TF_CONFIG names no task for this process (expected "task": {"type": ..., "index": ...})')
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not (0 <= int(task["index"]) < len(members)):
        raise DeviceError(f'TF_CONFIG task {task["type"]}:{task["index"]} is not in its cluster')
    workers = sum(len(v) for k, v in cluster.items() if k in ("chief", "worker") and isinstance(v, list))
    return cfg if workers > 1 else None


def _use_logical_cpus(n: int) -> list[str]:
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if not existing or len(existing) < n:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError as e:
            raise DeviceError(f"cannot split the CPU into {n} devices after TensorFlow has started ({e})") from None
    return [f"/cpu:{i}" for i in range(n)]


def local_devices(gpus: int | None, warn=print) -> list[str] | None:
    """The devices of this machine that --gpus asks for; None for the default."""
    if gpus is None:
        return None
    if gpus < 1:
        raise DeviceError(f"--gpus must be at least 1, got {gpus}")
    found = tf.config.list_physical_devices("GPU")
    if found:
        if len(found) < gpus:
            raise DeviceError(f"--gpus {gpus} asked for, but only {len(found)} GPU(s) are visible")
        return [f"/gpu:{i}" for i in range(gpus)]
    if gpus > 1:
        warn(f"warning: no GPU found; using {gpus} logical CPU devices (correct, not faster)")
    return _use_logical_cpus(gpus)


def make_strategy(gpus: int | None = None, collective_timeout: float = 300.0, warn=print):
    """Builds the strategy for this process (see the module docstring)."""
    cluster = cluster_spec_from_env()
    if cluster is not None:
        has_gpu = bool(tf.config.list_physical_devices("GPU"))
        if has_gpu and gpus:
            local_devices(gpus, warn)  # checks the count
            visible = tf.config.list_physical_devices("GPU")[:gpus]
            tf.config.set_visible_devices(visible, "GPU")
        impl = (tf.distribute.experimental.CommunicationImplementation.NCCL if has_gpu
                else tf.distribute.experimental.CommunicationImplementation.RING)
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=impl, timeout_seconds=collective_timeout)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    devices = local_devices(gpus, warn)
    if devices is None:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices)


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def all_gpus(strategy) -> bool:
    """True when every replica of this process runs on a GPU."""
    if strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        return bool(tf.config.list_physical_devices("GPU"))
    return all("GPU" in d.upper() for d in strategy.extended.worker_devices)
