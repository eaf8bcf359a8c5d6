"""The tf.distribute strategy of a process, from its devices and its cluster.

  no cluster, no flag     the default strategy: one device (the first GPU, else the CPU)
  --gpus N                MirroredStrategy over N GPUs (NCCL all-reduce)
  --cpu-replicas N        MirroredStrategy over N logical CPU devices
  a cluster (cluster.py)  MultiWorkerMirroredStrategy, --gpus N GPUs per worker
                          (default 1), or one CPU replica per worker

`make_strategy` must run before TensorFlow initialises its runtime (before
any op): it chooses the visible devices, may split the CPU into logical
devices, and MultiWorkerMirroredStrategy must be created first.
"""

from __future__ import annotations

import logging

import tensorflow as tf

from tfgpt.errors import UserError
from tfgpt.runtime import cluster as clusters
from tfgpt.runtime.devices import local_devices, unused_gpus_warning

log = logging.getLogger(__name__)


def make_strategy(
    gpus: int | None = None,
    cpu_replicas: int | None = None,
    cluster: str = "auto",
    collective_timeout: float = 300.0,
    cluster_port: int = 8888,
):
    """Builds the strategy for this process (see the module docstring)."""

    found = clusters.detect(cluster, port_base=cluster_port)
    if found is not None:
        if cpu_replicas is not None:
            raise UserError(
                "--cpu-replicas is for one process; in a multi-worker run each worker "
                "without GPUs trains one CPU replica"
            )
        return clusters.multi_worker_strategy(found, gpus, collective_timeout)
    devices = local_devices(gpus, cpu_replicas)
    if devices is None:
        message = unused_gpus_warning()
        if message:
            log.warning(message)
        return tf.distribute.get_strategy()
    if devices[0].startswith("/cpu"):
        # Logical CPU devices: reduce through one device rather than with
        # collective ops, whose instance keys are process-global and collide
        # when a process builds more than one strategy (as tests do).
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    return tf.distribute.MirroredStrategy(devices)
