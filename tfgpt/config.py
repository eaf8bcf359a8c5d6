"""Configuration dataclasses.

`GPTConfig` describes the network; `TrainConfig` describes a run. The command
line fills both, and every run directory keeps them as `config.json`, so a
checkpoint or an export can always be rebuilt from what sits beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


@dataclasses.dataclass
class GPTConfig:
    """The model. Defaults are those of the Keras miniature-GPT example."""

    vocab_size: int = 20000
    maxlen: int = 80
    embed_dim: int = 256
    num_heads: int = 2
    ff_dim: int = 256
    num_layers: int = 1
    dropout: float = 0.1
    # Each head's key/query/value size. None means embed_dim, as in the
    # example's `MultiHeadAttention(num_heads, key_dim=embed_dim)`.
    head_dim: int | None = None
    # The output layer uses the token embedding's table (transposed) as its
    # weights instead of a matrix of its own.
    tie_embeddings: bool = False

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.embed_dim


@dataclasses.dataclass
class TrainConfig:
    """A training run: data, optimisation, devices, logging."""

    data: str = "imdb"
    imdb_unsup: bool = False
    packing: str = "truncate"  # truncate | pack
    # truncate mode: whether the padding after a short line's end is a target
    # of the training loss (count, as the Keras example does) or not (ignore).
    padding_targets: str = "count"
    val_fraction: float = 0.02
    # Where token stores are kept (tfgpt/prepare.py); None: $TFGPT_CACHE/stores or ~/.cache/tfgpt/stores.
    store_dir: str | None = None
    seed: int = 0
    recipe: str = "example"  # the named settings the run started from (cli.RECIPES)
    batch_size: int = 128  # global, over all replicas
    epochs: int = 25
    max_steps: int | None = None
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    clip_norm: float | None = None
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices and embeddings
    label_smoothing: float = 0.0
    # Adam for the token embedding: dense (textbook Adam on the summed
    # gradient) or per-token (each occurrence of a token one moment update,
    # as Keras' Adam treats the sparse gradient of a lookup); see optim.Adam.
    embedding_update: str = "per-token"
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    xla: str = "auto"  # auto | on | off
    precision: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: the fastest the devices run natively)
    # What `precision` resolved to on the devices of the run (None until then).
    compute_precision: str | None = None
    loss_chunk: int = 0  # positions per output-layer chunk; 0 = automatic
    steps_per_call: int = 0  # training steps per compiled call; 0 = automatic
    deterministic: bool = False
    gpus: int | None = None
    cpu_replicas: int | None = None
    cluster: str = "auto"  # auto | tf_config | slurm
    cluster_port: int = 8888  # first port of the workers on each node of a SLURM cluster
    collective_timeout: float = 300.0
    peak_flops: float | None = None  # FLOP/s of one device for the mfu scalar; None = measured
    profile_steps: str | None = None  # "A:B": profile global steps A to B (inclusive)
    logdir: str = "logs"
    run_name: str | None = None
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = only at the end of each epoch
    keep_checkpoints: int = 3
    prompt: str = "this movie is"
    gen_tokens: int = 40
    top_k: int = 10
    temperature: float = 1.0
    quiet: bool = False
    export: bool = True

    def profile_range(self) -> tuple[int, int] | None:
        """profile_steps "A:B" as (A, B), 1 <= A <= B; None when unset.
        Raises ValueError on any other text."""
        if not self.profile_steps:
            return None
        try:
            first, last = (int(part) for part in str(self.profile_steps).split(":"))
        except ValueError:
            raise ValueError(f"--profile-steps takes A:B (two step numbers), got {self.profile_steps!r}") from None
        if not 1 <= first <= last:
            raise ValueError(f"--profile-steps A:B needs 1 <= A <= B, got {self.profile_steps!r}")
        return first, last


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes a file so that it is either absent, old, or complete: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_config(path: str | Path, model: GPTConfig, train: TrainConfig) -> None:
    doc = {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path) -> tuple[GPTConfig, TrainConfig]:
    doc = json.loads(Path(path).read_text())
    return _from_dict(GPTConfig, doc["model"]), _from_dict(TrainConfig, doc["train"])


def _from_dict(cls, values: dict):
    """Builds `cls` from a dict, ignoring keys a newer or older version wrote."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
