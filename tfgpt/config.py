"""Configuration dataclasses.

`GPTConfig` describes the network; `TrainConfig` describes a run. The command
line fills both, and every run directory keeps them as `config.json`, so a
checkpoint or an export can always be rebuilt from what sits beside it.

Each field is declared once, with `option`: its default and, for a flag, its
help text, its section of `train.py --help`, its choices, the check of its
value, whether `train.py --resume` may change it and whether it is one of the
run's TensorBoard hparams. train.py (tfgpt/cli.py) and `python -m
tfgpt.prepare` build their flags from these declarations (`add_flag`) and
check values with them (`refused`). The flag of field `foo_bar` is
`--foo-bar`; a bool field is a switch (`--no-foo-bar` when its default is True).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

# The precisions a run can compute in, and where a multi-worker cluster can come from.
PRECISIONS = ("float32", "bfloat16", "float16")
CLUSTER_MODES = ("auto", "tf_config", "slurm")

# The smallest subword vocabulary: id 0 and the 256 bytes (tfgpt/data/subword.py).
SUBWORD_MIN_VOCAB = 257


def subword_vocab_refused(tokenizer: str, vocab_size: int) -> str | None:
    """The one-line error for a vocabulary size the subword tokenizer cannot take; None if fine."""
    if tokenizer == "subword" and vocab_size < SUBWORD_MIN_VOCAB:
        return (
            f"--vocab-size {vocab_size} is too small for subwords: it needs at least {SUBWORD_MIN_VOCAB} "
            "(the 256 bytes and id 0)"
        )
    return None


# The sections of `train.py --help`, in order. Within a section, TrainConfig's
# flags come first, then GPTConfig's, each in declaration order.
FLAG_GROUPS = ("data", "model", "optimisation", "devices and speed", "run directory, logging, samples")

# --recipe: named sets of training settings. "example" is the Keras example's
# (the defaults); "tuned" is the best measured on the held-out protocol of
# docs/evaluation.md with the example's model unchanged (docs/performance.md
# has the runs). A flag given explicitly wins over the recipe's value.
RECIPES = {
    "example": {},
    "tuned": {"lr": 5e-3, "beta2": 0.95},
}


def option(
    default,
    help: str | None = None,
    *,
    group: str | None = None,
    choices=None,
    metavar: str | None = None,
    check: tuple | None = None,
    resumable: bool = False,
    hparam: bool = True,
):
    """A config field with its default and, given `help`, its flag:

    help: the flag's help text; "{default}" in it (a str.format field) is the default.
    group: its section of train.py --help (one of FLAG_GROUPS).
    choices, metavar: as argparse's.
    check: (ok, message): ok(value) is False for a bad value, whose one-line
        error is message with "{value}" replaced by the value.
    resumable: `train.py --resume` may give another value than the run's config.json.
    hparam: one of the run's TensorBoard hparams (False for what says where a
        run lives, not how it trains)."""
    meta = dict(
        help=help, group=group, choices=choices, metavar=metavar, check=check, resumable=resumable, hparam=hparam
    )
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class GPTConfig:
    """The model. Defaults are those of the Keras miniature-GPT example."""

    vocab_size: int = option(
        20000,
        "vocabulary entries, including padding and [UNK] (default: {default}); with --tokenizer subword, the size "
        "of the subword vocabulary learned from the corpus",
        group="data",
        check=(lambda v: v >= 3, "--vocab-size must be at least 3, got {value}"),
    )
    maxlen: int = option(
        80,
        "context length in tokens (default: {default})",
        group="data",
        check=(lambda v: v >= 2, "--maxlen must be at least 2, got {value}"),
    )
    embed_dim: int = option(
        256,
        "model width (default: {default})",
        group="model",
        check=(lambda v: v >= 1, "--embed-dim, --ff-dim, --num-heads and --num-layers must be positive"),
    )
    num_heads: int = option(
        2,
        "attention heads (default: {default})",
        group="model",
        check=(lambda v: v >= 1, "--embed-dim, --ff-dim, --num-heads and --num-layers must be positive"),
    )
    # Each head's key/query/value size. None means embed_dim, as in the
    # example's `MultiHeadAttention(num_heads, key_dim=embed_dim)`.
    head_dim: int | None = option(
        None,
        "key/query/value size of each head (default: embed-dim, as the example)",
        group="model",
        check=(lambda v: v is None or v >= 1, "--head-dim must be positive"),
    )
    ff_dim: int = option(
        256,
        "feed-forward width (default: {default})",
        group="model",
        check=(lambda v: v >= 1, "--embed-dim, --ff-dim, --num-heads and --num-layers must be positive"),
    )
    num_layers: int = option(
        1,
        "Transformer blocks (default: {default})",
        group="model",
        check=(lambda v: v >= 1, "--embed-dim, --ff-dim, --num-heads and --num-layers must be positive"),
    )
    # The output layer uses the token embedding's table (transposed) as its
    # weights instead of a matrix of its own.
    tie_embeddings: bool = option(
        False,
        "the output layer shares the token embedding's table (5.1M fewer parameters at the default size; not the "
        "example's model)",
        group="model",
    )
    dropout: float = option(
        0.1,
        "dropout rate in [0, 1) (default: {default})",
        group="model",
        check=(lambda v: 0.0 <= v < 1.0, "--dropout must be in [0, 1), got {value}"),
    )

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.embed_dim


@dataclasses.dataclass
class TrainConfig:
    """A training run: data, optimisation, devices, logging."""

    # --- data
    data: str = option(
        "imdb",
        "'imdb' (./aclImdb, else the cached or downloaded official archive), an IMDB archive or folder, a folder of "
        f".txt and .txt.gz files (recursive), a text or .txt.gz file, several of these separated by '{os.pathsep}', "
        "a quoted glob, or a token store (python -m tfgpt.prepare); every line is one example. The corpus is "
        "tokenized once into a token store, kept in --store-dir and reused while its files are unchanged "
        "(default: {default})",
        group="data",
        resumable=True,
    )
    # Where token stores are kept (tfgpt/data/prepare.py); None: $TFGPT_CACHE/stores or ~/.cache/tfgpt/stores.
    store_dir: str | None = option(
        None,
        "where token stores are kept (default: $TFGPT_CACHE/stores, else ~/.cache/tfgpt/stores)",
        group="data",
        resumable=True,
    )
    imdb_unsup: bool = option(False, "also read IMDB's train/unsup reviews", group="data")
    # How text becomes tokens: "word" (tfgpt/data/text.py, the Keras example's)
    # or "subword" (tfgpt/data/subword.py). A run keeps it: its tokenizer file
    # (vocab.txt or subword.json) gives the ids its checkpoints were trained on.
    tokenizer: str = option(
        "word",
        "word: the Keras example's vocabulary of lowercased words, punctuation split off (reproduces the example; "
        "words outside the vocabulary become [UNK]); subword: byte-level BPE learned from the corpus, for any text, "
        "code or language: case and whitespace are kept and every byte has a token, so nothing becomes [UNK]; a run "
        "keeps its tokenizer beside config.json, vocab.txt or subword.json (default: {default})",
        group="data",
        choices=["word", "subword"],
    )
    packing: str = option(
        "truncate",
        "truncate: each line gives one window of its first maxlen+1 tokens, as the example; pack: lines joined "
        "(id 0 after each) and cut into windows, so no text is lost (default: {default})",
        group="data",
        choices=["truncate", "pack"],
    )
    # truncate mode: whether the padding after a short line's end is a target
    # of the training loss (count, as the Keras example does) or not (ignore).
    padding_targets: str = option(
        "count",
        "truncate mode: train on the padding after a short line's end as targets (count: the model learns where "
        "lines end, as the Keras example does) or leave it out of the loss (ignore); validation counts real tokens "
        "only (default: {default})",
        group="data",
        choices=["count", "ignore"],
    )
    val_fraction: float = option(
        0.02,
        "fraction of files held out for validation; 0 for none (default: {default})",
        group="data",
        check=(lambda v: 0.0 <= v < 1.0, "--val-fraction must be in [0, 1), got {value}"),
    )

    # --- optimisation
    recipe: str = option(  # the named settings the run started from
        "example",
        "example: the Keras example's settings (the defaults below); tuned: the best measured at equal steps with "
        "the same model ("
        + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in RECIPES["tuned"].items())
        + "); flags given explicitly win (default: {default})",
        group="optimisation",
        choices=sorted(RECIPES),
    )
    batch_size: int = option(  # global, over all replicas
        128,
        "global batch, split over all replicas (default: {default})",
        group="optimisation",
        check=(lambda v: v >= 1, "--batch-size must be positive, got {value}"),
    )
    epochs: int = option(
        25,
        "passes over the training data (default: {default})",
        group="optimisation",
        check=(lambda v: v >= 1, "--epochs must be positive, got {value}"),
        resumable=True,
    )
    max_steps: int | None = option(
        None,
        "stop after this many steps in all (default: no limit)",
        group="optimisation",
        check=(lambda v: v is None or v >= 1, "--max-steps must be positive, got {value}"),
        resumable=True,
    )
    lr: float = option(
        1e-3,
        "Adam learning rate (default: {default})",
        group="optimisation",
        check=(lambda v: v > 0, "--lr must be positive, got {value}"),
        resumable=True,
    )
    beta1: float = option(0.9)
    beta2: float = option(
        0.999,
        "Adam's decay of the squared-gradient average, in (0, 1); lower adapts faster (default: {default})",
        group="optimisation",
        check=(lambda v: 0 < v < 1, "--beta2 must be between 0 and 1 (exclusive), got {value}"),
    )
    eps: float = option(1e-7)
    lr_schedule: str = option(
        "constant", "(default: {default})", group="optimisation", choices=["constant", "cosine"], resumable=True
    )
    warmup_steps: int = option(
        0,
        "linear warm-up steps (default: {default})",
        group="optimisation",
        check=(lambda v: v >= 0, "--warmup-steps must be 0 or positive"),
        resumable=True,
    )
    clip_norm: float | None = option(
        None,
        "clip gradients to this global norm (default: off)",
        group="optimisation",
        check=(lambda v: v is None or v > 0, "--clip-norm must be positive"),
        resumable=True,
    )
    label_smoothing: float = option(
        0.0,
        "train on (1 - e) one-hot + e / V targets (default: {default}); the loss reported is then the smoothed one",
        group="optimisation",
        check=(lambda v: 0.0 <= v < 1.0, "--label-smoothing must be in [0, 1), got {value}"),
    )
    # Adam for the token embedding: dense (textbook Adam on the summed
    # gradient) or per-token (each occurrence of a token one moment update,
    # as Keras' Adam treats the sparse gradient of a lookup); see optim.Adam.
    embedding_update: str = option(
        "per-token",
        "Adam for the token embedding: dense, or per-token: every occurrence of a token in the batch is one update "
        "of its row's Adam moments, as Keras' Adam treats an embedding's sparse gradient; frequent tokens' rows then "
        "move faster (default: {default})",
        group="optimisation",
        choices=["dense", "per-token"],
    )
    weight_decay: float = option(  # decoupled (AdamW), on matrices and embeddings
        0.0,
        "decoupled weight decay (AdamW) of matrices and embeddings (default: {default})",
        group="optimisation",
        check=(lambda v: v >= 0, "--weight-decay must be 0 or positive, got {value}"),
        resumable=True,
    )
    seed: int = option(
        0, "seeds the weights, the data order, the split and dropout (default: {default})", group="optimisation"
    )

    # --- devices and speed
    gpus: int | None = option(
        None,
        "data-parallel over N GPUs of this machine (an error if fewer are visible; only those N are used, with "
        "memory growth); in a multi-worker run, N GPUs per worker, chosen by the worker's local index (default: one "
        "device, the first GPU, else the CPU)",
        group="devices and speed",
        check=(lambda v: v is None or v >= 1, "--gpus must be at least 1, got {value}"),
        resumable=True,
    )
    cpu_replicas: int | None = option(
        None,
        "data-parallel over N logical CPU devices: the multi-replica code on a machine without GPUs (correct, not "
        "faster)",
        group="devices and speed",
        check=(lambda v: v is None or v >= 1, "--cpu-replicas must be at least 1, got {value}"),
        resumable=True,
    )
    cluster: str = option(
        "auto",
        "where a multi-worker run's cluster comes from: TF_CONFIG, a SLURM job step (srun), or auto = TF_CONFIG if "
        "set, else SLURM with several tasks, else none (default: {default})",
        group="devices and speed",
        choices=CLUSTER_MODES,
        resumable=True,
    )
    cluster_port: int = option(  # first port of the workers on each node of a SLURM cluster
        8888,
        "SLURM clusters: the port of the first worker on each node, the next ones counting up (default: {default})",
        group="devices and speed",
        check=(lambda v: 1 <= v <= 65535, "--cluster-port must be a port number, got {value}"),
        resumable=True,
    )
    xla: str = option(
        "auto",
        "jit-compile the per-replica step; auto = on when every replica is a GPU (default: {default}); on a CPU "
        "with AVX2 but no AVX-512, on is faster in float32 but takes several times the memory",
        group="devices and speed",
        choices=["auto", "on", "off"],
        resumable=True,
    )
    precision: str = option(
        "auto",
        "matrix products in bfloat16 or float16 with float32 weights, optimizer, norms, softmax and loss (float16 "
        "with dynamic loss scaling); auto: bfloat16 on GPUs of compute capability 8.0+ and on CPUs with "
        "AMX/AVX512-BF16, float16 on 7.x GPUs, else float32 (default: {default})",
        group="devices and speed",
        choices=("auto", *PRECISIONS),
        resumable=True,
    )
    # What `precision` resolved to on the devices of the run (None until then).
    compute_precision: str | None = option(None)
    steps_per_call: int = option(
        0,
        "training steps per compiled call; the host reads the step metrics once per call; 0 = automatic: "
        "--log-every on GPUs, 1 on CPUs (default: {default})",
        group="devices and speed",
        check=(lambda v: v >= 0, "--steps-per-call must be 0 (automatic) or positive, got {value}"),
        resumable=True,
    )
    deterministic: bool = option(
        False,
        "deterministic TensorFlow ops (tf.config.experimental.enable_op_determinism): the same run gives the same "
        "bits on a GPU too, somewhat slower",
        group="devices and speed",
        resumable=True,
    )
    loss_chunk: int = option(
        0,
        "positions per chunk of the output layer and loss; 0 = automatic (default: {default})",
        group="devices and speed",
        check=(lambda v: v >= 0, "--loss-chunk must be 0 or positive"),
        resumable=True,
    )
    peak_flops: float | None = option(  # FLOP/s of one device for the mfu scalar; None = measured
        None,
        "peak FLOP/s of one training device at the training precision (e.g. 989e12 for an H100 in bfloat16), the "
        "denominator of the mfu scalar (default: measured with large matmuls at start-up)",
        group="devices and speed",
        check=(lambda v: v is None or v > 0, "--peak-flops must be positive, got {value}"),
        resumable=True,
    )
    profile_steps: str | None = option(  # "A:B": profile global steps A to B (inclusive); see profile_range
        None,
        "record a profiler trace of global steps A to B into RUN/train for TensorBoard's Profile tab (pip install "
        "tfgpt[profile]); default: none",
        group="devices and speed",
        metavar="A:B",
        resumable=True,
    )
    collective_timeout: float = option(
        300.0,
        "multi-worker runs: seconds a worker waits for the others to start, and how long a worker may stop "
        "answering (the coordination service's heartbeats) before the others fail with an error "
        "(default: {default:.0f})",
        group="devices and speed",
        check=(lambda v: v > 0, "--collective-timeout must be positive"),
        resumable=True,
    )

    # --- run directory, logging, samples
    # logdir and run_name say where the run lives: given with --resume, they name it.
    logdir: str = option(
        "logs",
        "TensorBoard root (default: {default})",
        group="run directory, logging, samples",
        resumable=True,
        hparam=False,
    )
    run_name: str | None = option(
        None,
        "run directory name under LOGDIR (default: a timestamp)",
        group="run directory, logging, samples",
        resumable=True,
        hparam=False,
    )
    log_every: int = option(
        10,
        "write scalars every N steps (default: {default})",
        group="run directory, logging, samples",
        check=(lambda v: v >= 1, "--log-every must be positive, got {value}"),
        resumable=True,
    )
    checkpoint_every: int = option(  # steps; 0 = only at the end of each epoch
        0,
        "also checkpoint every N steps (default: each epoch only)",
        group="run directory, logging, samples",
        check=(lambda v: v >= 0, "--checkpoint-every must be 0 or positive"),
        resumable=True,
    )
    keep_checkpoints: int = option(
        3,
        "checkpoints kept (default: {default})",
        group="run directory, logging, samples",
        check=(lambda v: v >= 1, "--keep-checkpoints must be positive"),
        resumable=True,
    )
    prompt: str = option(
        "this movie is",
        "prompt of the per-epoch sample (default: {default!r})",
        group="run directory, logging, samples",
        check=(lambda v: bool(v.strip()), "--prompt must hold at least one word"),
        resumable=True,
    )
    gen_tokens: int = option(
        40,
        "tokens per sample (default: {default})",
        group="run directory, logging, samples",
        check=(lambda v: v >= 1, "--gen-tokens must be positive, got {value}"),
        resumable=True,
    )
    top_k: int = option(
        10,
        "sample among the k likeliest tokens (default: {default})",
        group="run directory, logging, samples",
        check=(lambda v: v >= 1, "--top-k must be positive, got {value}"),
        resumable=True,
    )
    temperature: float = option(
        1.0,
        "sampling temperature; <= 0 is greedy (default: {default})",
        group="run directory, logging, samples",
        resumable=True,
    )
    export: bool = option(
        True, "do not export a SavedModel at the end", group="run directory, logging, samples", resumable=True
    )
    quiet: bool = option(False, "print only the epoch lines", group="run directory, logging, samples", resumable=True)

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


# --- the declarations, read ---------------------------------------------------------


def config_fields() -> list[dataclasses.Field]:
    """Every field of TrainConfig, then of GPTConfig (the two share no name)."""
    return [*dataclasses.fields(TrainConfig), *dataclasses.fields(GPTConfig)]


def flag_fields() -> list[dataclasses.Field]:
    """The fields that have a flag, in the order of `train.py --help`."""
    fields = [f for f in config_fields() if f.metadata.get("help") is not None]
    return sorted(fields, key=lambda f: FLAG_GROUPS.index(f.metadata["group"]))  # stable: declaration order within


def field_of(name: str) -> dataclasses.Field:
    return next(f for f in config_fields() if f.name == name)


def resumable_fields() -> set[str]:
    """The fields `train.py --resume` may give another value than the saved config.json."""
    return {f.name for f in config_fields() if f.metadata.get("resumable")}


def not_hparams() -> tuple[str, ...]:
    """The fields left out of the run's TensorBoard hparams."""
    return tuple(f.name for f in config_fields() if not f.metadata.get("hparam", True))


# The type of a field's annotation ("int | None" is int) -> argparse's type.
_FLAG_TYPES = {"int": int, "float": float, "str": None}


def add_flag(parser, name: str, **overrides) -> None:
    """Adds the flag of config field `name` to an argparse parser or group.
    `overrides` replace the declaration's argparse keywords (e.g. help=...,
    required=True); "{default}" in the help text is the field's default. The
    flag's default is the field's, unless the flag is required or the parser
    suppresses defaults (argument_default=argparse.SUPPRESS: only the flags
    given are parsed)."""
    f = field_of(name)
    meta = f.metadata
    flag = "--" + name.replace("_", "-")
    # Annotations are strings here (`from __future__ import annotations`), types where a module has them evaluated.
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = annotation.split(" | ")[0]
    if kind == "bool":  # a switch: --foo-bar, or --no-foo-bar when the default is True
        flag = flag.replace("--", "--no-", 1) if f.default else flag
        keywords = dict(action="store_false" if f.default else "store_true")
    else:
        keywords = {"type": _FLAG_TYPES[kind], "choices": meta["choices"], "metavar": meta["metavar"]}
        keywords = {k: v for k, v in keywords.items() if v is not None}
    if parser.argument_default is not argparse.SUPPRESS and not overrides.get("required"):
        keywords["default"] = f.default
    keywords |= dict(dest=name, help=meta["help"]) | overrides
    keywords["help"] = keywords["help"].format(default=f.default)
    parser.add_argument(flag, **keywords)


def refused(values: dict) -> str | None:
    """The one-line error for the first of `values` ({field name: value}, in
    their order) that its declaration's check refuses; None if all pass."""
    for name, value in values.items():
        check = field_of(name).metadata.get("check")
        if check is not None and not check[0](value):
            return check[1].format(value=value)
    return None


# --- config.json --------------------------------------------------------------------


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
