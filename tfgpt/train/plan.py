"""How a run uses its devices, decided once: `make_plan` -> `Plan`.

The devices are asked once (`devices.of_strategy`); from that answer and the
configs come the compute precision, XLA, the steps per compiled call and the
loss chunk, and the lines the run prints about them. `tfgpt.train.run` prints
the plan's device line and hands the plan to the `Trainer`, which decides
none of these itself.

  precision       --precision, or for auto the fastest native one (`devices.fastest_precision`)
  XLA             --xla, or for auto on when every replica is a GPU (on CPUs it measured slower)
  steps per call  --steps-per-call, or for 0 --log-every (at most 100) on GPUs, 1 on CPUs
  loss chunk      --loss-chunk, or for 0 the largest divisor of a replica's loss rows whose
                  logits fit `CHUNK_BUDGET` of the device kind (`auto_chunk`)
"""

from __future__ import annotations

import dataclasses

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.errors import UserError
from tfgpt.model.loss import CHUNK_BUDGET, auto_chunk
from tfgpt.runtime import devices
from tfgpt.runtime.devices import Devices


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run trains on and how (see the module docstring)."""

    devices: Devices  # what this process's replicas run on
    description: str  # `devices.describe`: e.g. "1 x NVIDIA H100 80GB HBM3 (compute capability 9.0, 80 GiB)"
    workers: int | None  # processes of a multi-worker strategy's cluster; None without one
    replicas: int  # replicas in sync, over every worker
    precision: str  # the compute precision, resolved: float32, bfloat16 or float16
    native: bool  # whether the devices multiply in it natively
    xla: bool
    steps_per_call: int
    loss_rows: int  # a replica's loss positions per step: batch_size / replicas * maxlen
    loss_chunk: int  # positions per chunk of the output layer and loss; divides loss_rows
    deterministic: bool  # TensorFlow's op determinism on
    notes: tuple[str, ...] = ()  # lines for the user about the precision
    auto: str = ""  # --precision auto: what it chose and why (`devices.auto_reason`); "" otherwise

    def device_line(self) -> str:
        """The run's first line: devices, precision, XLA, replicas, steps per call."""
        workers = f" on each of {self.workers} workers" if self.workers is not None else ""
        return (
            f"devices: {self.description}{workers}; precision {self.precision}; "
            f"XLA {'on' if self.xla else 'off'}; {self.replicas} replica(s); "
            f"{self.steps_per_call} step(s) per call"
            + ("; deterministic ops" if self.deterministic else "")
            + (f"; precision auto: {self.auto}" if self.auto else "")
        )

    def for_model(self, model_cfg: GPTConfig, cfg: TrainConfig) -> Plan:
        """This plan for another model of the same run (e.g. the vocabulary
        size the token store gave): its loss rows and chunk again, the
        devices not asked again."""
        rows, chunk = loss_chunk(model_cfg, cfg, self.replicas, self.devices.gpus)
        return dataclasses.replace(self, loss_rows=rows, loss_chunk=chunk)


def loss_chunk(model_cfg: GPTConfig, cfg: TrainConfig, replicas: int, gpus: bool) -> tuple[int, int]:
    """(a replica's loss rows, the positions per chunk of its output layer and loss)."""
    rows = cfg.batch_size // replicas * model_cfg.maxlen
    return rows, cfg.loss_chunk or auto_chunk(rows, model_cfg.vocab_size, CHUNK_BUDGET["GPU" if gpus else "CPU"])


def make_plan(model_cfg: GPTConfig, cfg: TrainConfig, strategy, resume: bool = False) -> Plan:
    """The plan of a run of `model_cfg` with `cfg` on `strategy`'s devices.

    The precision is cfg.compute_precision where it is set (a run's resolved
    config) unless `resume`; otherwise --precision resolved for these
    devices. On --resume it is resolved again: `auto` may choose differently
    on other devices (the weights are float32 in every precision, so the run
    goes on, with a note); an explicit precision that the devices do not run
    natively is pointed out. Raises UserError for a precision that cannot
    run here or a batch that the replicas cannot share."""

    found = devices.of_strategy(strategy)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {replicas} replicas")
    chosen_here = not (cfg.compute_precision and not resume)
    precision = devices.resolve_precision(cfg.precision, found) if chosen_here else cfg.compute_precision
    native = devices.native(precision, found)
    notes = []
    if resume and cfg.compute_precision and precision != cfg.compute_precision:
        notes.append(
            f"precision: {precision} on these devices (--precision {cfg.precision}); the run trained in "
            f"{cfg.compute_precision} before"
        )
    if cfg.precision != "auto" and not native:
        notes.append(
            f"warning: --precision {precision} is not native on these devices: slower than float32, or emulated"
        )
    resolver = getattr(strategy, "cluster_resolver", None)
    workers = sum(len(v) for v in resolver.cluster_spec().as_dict().values()) if resolver is not None else None
    rows, chunk = loss_chunk(model_cfg, cfg, replicas, found.gpus)
    return Plan(
        devices=found,
        description=devices.describe(found),
        workers=workers,
        replicas=replicas,
        precision=precision,
        native=native,
        xla={"on": True, "off": False}.get(cfg.xla, found.gpus),
        steps_per_call=cfg.steps_per_call or (max(1, min(cfg.log_every, 100)) if found.gpus else 1),
        loss_rows=rows,
        loss_chunk=chunk,
        deterministic=cfg.deterministic,
        notes=tuple(notes),
        auto=devices.auto_reason(precision, found) if cfg.precision == "auto" and chosen_here else "",
    )
