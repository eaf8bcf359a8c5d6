"""Clusters: several processes (workers) training one model together.

A multi-worker run uses MultiWorkerMirroredStrategy. Which processes form the
cluster, and which one this is, comes from (`--cluster`):

  tf_config   the TF_CONFIG environment variable (the same cluster list in
              every process, a different task in each)
  slurm       a SLURM job step (`srun`): SLURM_PROCID, SLURM_STEP_NUM_TASKS,
              SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE, SLURM_LOCALID
  auto        TF_CONFIG when it is set, else SLURM when this process is one
              of several tasks of a job step, else no cluster (the default)

The chief (the "chief" task, else worker 0; `chief_task`) writes the run
directory; every other worker writes only to its scratch folder
(tfgpt/train/checkpoint.py). On GPUs each worker
trains on --gpus N GPUs of its machine (default 1), chosen by its local index
among the workers of that machine; on CPUs a worker is one replica.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

from tfgpt.config import CLUSTER_MODES
from tfgpt.errors import UserError
from tfgpt.runtime.devices import use_gpus

log = logging.getLogger(__name__)

WORKER_JOBS = ("chief", "worker")


def chief_task(jobs, task_type: str, task_index: int) -> bool:
    """Whether task (task_type, task_index) of a cluster with these jobs
    ({name: members}) is its chief: the "chief" task, else worker 0. Every
    other test of "is this the chief?" comes down to this one."""
    return task_type == "chief" or ("chief" not in jobs and task_type == "worker" and task_index == 0)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The processes of a multi-worker run, as this process sees them."""

    source: str  # "tf_config" | "slurm"
    jobs: dict  # job name -> ["host:port", ...]
    task_type: str
    task_index: int
    local_index: int  # this process's rank among the workers on its machine

    @property
    def address(self) -> str:
        return self.jobs[self.task_type][self.task_index]

    @property
    def name(self) -> str:
        return f"{self.task_type} {self.task_index} ({self.address})"

    @property
    def chief(self) -> bool:
        return chief_task(self.jobs, self.task_type, self.task_index)

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.jobs.values())


def read_tf_config() -> dict | None:
    """TF_CONFIG, parsed and checked; None when it is unset or empty."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("cluster"), dict) or not cfg["cluster"]:
        raise UserError(
            'TF_CONFIG must be a JSON object with a non-empty "cluster" entry, e.g. '
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
        )
    cluster = cfg["cluster"]
    for job, members in cluster.items():
        if job not in WORKER_JOBS:
            raise UserError(f'TF_CONFIG: job "{job}" is not supported; name the processes "chief" and "worker"')
        if not isinstance(members, list) or not members or not all(isinstance(m, str) and ":" in m for m in members):
            raise UserError(f'TF_CONFIG: cluster "{job}" must be a non-empty list of "host:port" strings')
    if len(cluster.get("chief", [])) > 1:
        raise UserError('TF_CONFIG: a cluster has at most one "chief"')
    task = cfg.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise UserError('TF_CONFIG names no task for this process (expected "task": {"type": "worker", "index": N})')
    kind, index = task["type"], task["index"]
    if (
        kind not in cluster
        or isinstance(index, bool)
        or not isinstance(index, int)
        or not 0 <= index < len(cluster[kind])
    ):
        raise UserError(
            f"TF_CONFIG names task {kind}:{index} for this process, which is not in its cluster "
            f"({', '.join(f'{j}: {len(m)}' for j, m in cluster.items())})"
        )
    return cfg


def local_rank(jobs: dict, task_type: str, task_index: int) -> int:
    """How many workers listed before this one share its host: its local index."""
    order = [(j, i, a.rsplit(":", 1)[0]) for j in WORKER_JOBS for i, a in enumerate(jobs.get(j, []))]
    host = jobs[task_type][task_index].rsplit(":", 1)[0]
    rank = 0
    for j, i, h in order:
        if (j, i) == (task_type, task_index):
            return rank
        rank += h == host
    return rank


def from_tf_config() -> Cluster | None:
    """The cluster TF_CONFIG names, when it names more than one process."""
    cfg = read_tf_config()
    if cfg is None or sum(len(m) for m in cfg["cluster"].values()) < 2:
        return None
    jobs = {j: list(m) for j, m in cfg["cluster"].items()}
    kind, index = cfg["task"]["type"], cfg["task"]["index"]
    return Cluster("tf_config", jobs, kind, index, local_rank(jobs, kind, index))


def detect(mode: str = "auto", port_base: int = 8888) -> Cluster | None:
    """The cluster this process belongs to (see the module docstring); None
    for a single-process run. Raises UserError on a malformed environment."""
    if mode not in CLUSTER_MODES:
        raise UserError(f"--cluster must be one of {', '.join(CLUSTER_MODES)}, got {mode!r}")
    if mode == "tf_config":
        if not os.environ.get("TF_CONFIG", "").strip():
            raise UserError("--cluster tf_config: TF_CONFIG is not set")
        return from_tf_config()
    if mode == "slurm":
        return from_slurm(required=True, port_base=port_base)
    if os.environ.get("TF_CONFIG", "").strip():
        return from_tf_config()
    return from_slurm(required=False, port_base=port_base)


def from_slurm(required: bool, port_base: int = 8888) -> Cluster | None:
    """The cluster of this SLURM job step, when it has more than one task.

    Worker i of a node listens on port_base + i there. Raises UserError
    when `required` and this process is not a task of a job step."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        if required:
            raise UserError(
                "--cluster slurm: SLURM_PROCID and SLURM_STEP_NUM_TASKS are not set; "
                "start every worker with srun inside the allocation"
            )
        return None
    try:
        tasks = int(env["SLURM_STEP_NUM_TASKS"])
        rank = int(env["SLURM_PROCID"])
    except ValueError:
        raise UserError(
            f"SLURM_STEP_NUM_TASKS={env['SLURM_STEP_NUM_TASKS']!r} and SLURM_PROCID="
            f"{env['SLURM_PROCID']!r} must be whole numbers"
        ) from None
    if tasks < 2:
        return None
    if not 0 <= rank < tasks:
        raise UserError(f"SLURM_PROCID {rank} is not a task of the {tasks} in this job step")
    # lazy: cli.py imports this module for its checks
    from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as slurm

    try:
        per_node = slurm.expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
        # GPUs are chosen by tfgpt (devices.use_gpus, by local index), not by
        # the resolver: it is told of one "GPU" per task so that it lays out
        # every task, and it leaves CUDA_VISIBLE_DEVICES alone.
        resolver = slurm.SlurmClusterResolver(
            port_base=port_base, gpus_per_node=max(per_node), gpus_per_task=1, auto_set_gpu=False
        )
        jobs = {job: list(addresses) for job, addresses in resolver.cluster_spec().as_dict().items()}
        task_type, task_index = resolver.get_task_info()
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the SLURM job step from the environment ({e})") from None
    local = env.get("SLURM_LOCALID", "")
    local = int(local) if local.isdigit() else local_rank(jobs, task_type, task_index)
    return Cluster("slurm", jobs, task_type, task_index, local)


def is_chief_task(mode: str = "auto") -> bool:
    """Whether this process is the chief, from the environment alone (no
    TensorFlow); True for a single process (or a broken environment, which
    make_strategy reports)."""
    if mode == "slurm" or (mode == "auto" and not os.environ.get("TF_CONFIG", "").strip()):
        # A SLURM job step's tasks are workers numbered by SLURM_PROCID (no chief task).
        rank = os.environ.get("SLURM_PROCID", "0").strip()
        return rank == "" or chief_task({"worker": []}, "worker", int(rank) if rank.isdigit() else -1)
    try:
        cluster = detect(mode)
    except UserError:
        return True
    return cluster is None or cluster.chief


def multi_worker_strategy(cluster: Cluster, gpus: int | None, timeout: float):
    """MultiWorkerMirroredStrategy for `cluster`; this process trains on
    --gpus N of its machine's GPUs (default 1; chosen by its local index),
    or on its CPU where the machine has no GPU.

    The strategy takes its local devices from the resolver's
    `num_accelerators()` (for every resolver but TFConfigClusterResolver),
    so the resolver is told how many GPUs this worker uses: without it each
    worker would train on its CPU alone. Lost workers are detected by the
    coordination service's heartbeats (`_bound_cluster_startup`), not by a
    per-collective timeout, which TensorFlow implements as one sleeping
    thread per collective for the whole timeout."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    if gpus is not None or tf.config.list_physical_devices("GPU"):
        accelerators = {"GPU": len(use_gpus(gpus or 1, cluster.local_index))}
        impl = tf.distribute.experimental.CommunicationImplementation.NCCL
    else:
        accelerators = None  # one CPU replica
        impl = tf.distribute.experimental.CommunicationImplementation.RING
    _bound_cluster_startup(cluster, timeout)
    options = tf.distribute.experimental.CommunicationOptions(implementation=impl)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster.jobs),
        task_type=cluster.task_type,
        task_id=cluster.task_index,
        num_accelerators=accelerators,
        rpc_layer="grpc",
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    except tf.errors.OpError as e:
        raise UserError(
            code=1,
            message=f"{cluster.name} could not reach the other workers within {timeout:g} s "
            f"({type(e).__name__}: {_first_line(e)}); start every worker with the same "
            "cluster and check that each can reach the others' addresses, "
            "or raise --collective-timeout",
        ) from None


def _bound_cluster_startup(cluster: Cluster, timeout: float) -> None:
    """Makes the start-up wait for the other workers, and the silence of a
    lost one, end after `timeout`.

    MultiWorkerMirroredStrategy starts TensorFlow's coordination service with
    no registration deadline, so a worker whose peers never come up waits
    forever. Configuring the service first, as the strategy would, but with a
    registration barrier and deadline, turns that wait into a
    DeadlineExceededError; its heartbeat timeout is how long a worker may
    stop answering during training before every other worker's collectives
    fail. The strategy keeps a service configured before it (and then leaves
    peer health to its heartbeats)."""
    try:  # lazy, and inside the try: private modules that a TensorFlow release may move
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context

        ctx = context.context()
        if ctx.coordination_service is not None:
            return
        leader = "chief" if "chief" in cluster.jobs else "worker"
        jobs = [
            coordination_config_pb2.CoordinatedJob(name=j, num_tasks=len(cluster.jobs[j]))
            for j in WORKER_JOBS
            if j in cluster.jobs
        ]
        ctx.configure_coordination_service(
            service_type="standalone",
            service_leader=f"/job:{leader}/replica:0/task:0",
            coordinated_jobs=jobs,
            cluster_register_timeout_in_ms=max(1, int(timeout * 1000)),
            heartbeat_timeout_in_ms=max(1, int(timeout * 1000)),
        )
        ctx.coordination_service.cluster_register_with_barrier = True
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        log.warning(
            f"warning: cannot bound the wait for the other workers at start-up ({e}); "
            "a worker whose peers never start may wait indefinitely"
        )


def cluster_failure(strategy, error: BaseException, timeout: float) -> str | None:
    """The one-line message for an error that means the workers lost each
    other during training (a collective timed out or was aborted); None for
    any other error, or when the run has a single worker."""
    import tensorflow as tf  # lazy: cli.py imports this module for its checks

    if not is_multi_worker(strategy):
        return None
    lost = (
        tf.errors.DeadlineExceededError,
        tf.errors.UnavailableError,
        tf.errors.AbortedError,
        tf.errors.CancelledError,
        tf.errors.InternalError,
        tf.errors.FailedPreconditionError,
    )
    if not isinstance(error, lost):
        return None
    resolver = strategy.cluster_resolver
    try:
        address = resolver.cluster_spec().task_address(resolver.task_type, resolver.task_id)
        who = f"{resolver.task_type} {resolver.task_id} ({address})"
    except (ValueError, KeyError, TypeError):
        who = "this worker"
    return (
        f"{who} lost contact with the other workers (a collective failed or waited longer than "
        f"--collective-timeout {timeout:g} s: {type(error).__name__}: {_first_line(error)}); "
        "resume every worker with --resume from the last checkpoint"
    )


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
    """Whether this process is the chief of the strategy's cluster; True without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    jobs = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return not jobs or chief_task(jobs, resolver.task_type, resolver.task_id)
