"""Configuration dataclasses.

`GPTConfig` describes the network; `TrainConfig` describes a run. The command
line fills both, and every run directory keeps them as `config.json`, so a
checkpoint or an export can always be rebuilt from what sits beside it.
"""

from __future__ import annotations

import dataclasses
import json
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

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.embed_dim


@dataclasses.dataclass
class TrainConfig:
    """A training run: data, optimisation, devices, logging."""

    data: str = "imdb"
    imdb_unsup: bool = False
    packing: str = "truncate"  # truncate | pack
    val_fraction: float = 0.02
    seed: int = 0
    batch_size: int = 128  # global, over all replicas
    epochs: int = 25
    max_steps: int | None = None
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    clip_norm: float | None = None
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    xla: str = "auto"  # auto | on | off
    precision: str = "float32"  # float32 | bfloat16
    loss_chunk: int = 0  # positions per output-layer chunk; 0 = automatic
    gpus: int | None = None
    collective_timeout: float = 300.0
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


def save_config(path: str | Path, model: GPTConfig, train: TrainConfig) -> None:
    doc = {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path) -> tuple[GPTConfig, TrainConfig]:
    doc = json.loads(Path(path).read_text())
    return _from_dict(GPTConfig, doc["model"]), _from_dict(TrainConfig, doc["train"])


def _from_dict(cls, values: dict):
    """Builds `cls` from a dict, ignoring keys a newer or older version wrote."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})
