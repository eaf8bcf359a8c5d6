"""`python train.py`: the command line that fills the configs and runs training."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

from tfgpt.config import GPTConfig, TrainConfig, load_config
from tfgpt.errors import UserError
from tfgpt.runtime.cluster import MODES, is_chief_task
from tfgpt.runtime.devices import PRECISIONS

# Fields that may differ from the saved config.json when resuming a run.
RESUMABLE = {
    "epochs",
    "max_steps",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "clip_norm",
    "weight_decay",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "quiet",
    "prompt",
    "gen_tokens",
    "top_k",
    "temperature",
    "export",
    "xla",
    "gpus",
    "cpu_replicas",
    "cluster",
    "cluster_port",
    "collective_timeout",
    "data",
    "loss_chunk",
    "steps_per_call",
    "deterministic",
    "peak_flops",
    "profile_steps",
    "precision",
    "store_dir",
}


# --recipe: named sets of training settings. "example" is the Keras example's
# (the defaults); "tuned" is the best measured on the held-out protocol of
# docs/evaluation.md with the example's model unchanged (docs/performance.md
# has the runs). A flag given explicitly wins over the recipe's value.
RECIPES = {
    "example": {},
    "tuned": {"lr": 5e-3, "beta2": 0.95},
}


def build_parser() -> argparse.ArgumentParser:
    m, t = GPTConfig(), TrainConfig()
    p = argparse.ArgumentParser(
        prog="train.py",
        argument_default=argparse.SUPPRESS,
        description="Train the miniature GPT (by default the Keras example's model on IMDB) with a "
        "custom TensorFlow training loop. Everything a run writes goes to LOGDIR/RUN_NAME.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python train.py --data ../aclImdb_v1.tar.gz --max-steps 300\n"
        "  python train.py --gpus 2 --precision bfloat16\n"
        "  srun --ntasks 4 --gpus-per-task 2 python train.py --gpus 2   # 4 workers of a SLURM job\n"
        "  python train.py --run-name my-run --resume --epochs 30\n"
        "watch it: tensorboard --logdir logs",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        help="'imdb' (./aclImdb, else the cached or downloaded official archive), an IMDB "
        "archive or folder, a folder of .txt and .txt.gz files (recursive), a text or .txt.gz file, "
        f"several of these separated by '{os.pathsep}', a quoted glob, or a token store "
        "(python -m tfgpt.prepare); every line is one example. The corpus is tokenized once into a "
        "token store, kept in --store-dir and reused while its files are unchanged "
        f"(default: {t.data})",
    )
    d.add_argument(
        "--store-dir", help="where token stores are kept (default: $TFGPT_CACHE/stores, else ~/.cache/tfgpt/stores)"
    )
    d.add_argument("--imdb-unsup", action="store_true", help="also read IMDB's train/unsup reviews")
    d.add_argument(
        "--packing",
        choices=["truncate", "pack"],
        help="truncate: each line gives one window of its "
        "first maxlen+1 tokens, as the example; pack: lines joined (id 0 after each) and cut into "
        f"windows, so no text is lost (default: {t.packing})",
    )
    d.add_argument(
        "--padding-targets",
        choices=["count", "ignore"],
        help="truncate mode: train on the padding "
        "after a short line's end as targets (count: the model learns where lines end, as the Keras "
        "example does) or leave it out of the loss (ignore); validation counts real tokens only "
        f"(default: {t.padding_targets})",
    )
    d.add_argument(
        "--val-fraction",
        type=float,
        help=f"fraction of files held out for validation; 0 for none (default: {t.val_fraction})",
    )
    d.add_argument(
        "--vocab-size", type=int, help=f"vocabulary entries, including padding and [UNK] (default: {m.vocab_size})"
    )
    d.add_argument("--maxlen", type=int, help=f"context length in tokens (default: {m.maxlen})")
    g = p.add_argument_group("model")
    g.add_argument("--embed-dim", type=int, help=f"model width (default: {m.embed_dim})")
    g.add_argument("--num-heads", type=int, help=f"attention heads (default: {m.num_heads})")
    g.add_argument(
        "--head-dim", type=int, help="key/query/value size of each head (default: embed-dim, as the example)"
    )
    g.add_argument("--ff-dim", type=int, help=f"feed-forward width (default: {m.ff_dim})")
    g.add_argument("--num-layers", type=int, help=f"Transformer blocks (default: {m.num_layers})")
    g.add_argument(
        "--tie-embeddings",
        action="store_true",
        help="the output layer shares the token embedding's "
        "table (5.1M fewer parameters at the default size; not the example's model)",
    )
    g.add_argument("--dropout", type=float, help=f"dropout rate in [0, 1) (default: {m.dropout})")
    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="example: the Keras example's settings (the "
        "defaults below); tuned: the best measured at equal steps with the same model ("
        + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in RECIPES["tuned"].items())
        + "); flags given explicitly win (default: example)",
    )
    o.add_argument("--batch-size", type=int, help=f"global batch, split over all replicas (default: {t.batch_size})")
    o.add_argument("--epochs", type=int, help=f"passes over the training data (default: {t.epochs})")
    o.add_argument("--max-steps", type=int, help="stop after this many steps in all (default: no limit)")
    o.add_argument("--lr", type=float, help=f"Adam learning rate (default: {t.lr})")
    o.add_argument(
        "--beta2",
        type=float,
        help=f"Adam's decay of the squared-gradient average, in (0, 1); lower adapts faster (default: {t.beta2})",
    )
    o.add_argument("--lr-schedule", choices=["constant", "cosine"], help=f"(default: {t.lr_schedule})")
    o.add_argument("--warmup-steps", type=int, help=f"linear warm-up steps (default: {t.warmup_steps})")
    o.add_argument("--clip-norm", type=float, help="clip gradients to this global norm (default: off)")
    o.add_argument(
        "--label-smoothing",
        type=float,
        help="train on (1 - e) one-hot + e / V targets "
        f"(default: {t.label_smoothing}); the loss reported is then the smoothed one",
    )
    o.add_argument(
        "--embedding-update",
        choices=["dense", "per-token"],
        help="Adam for the token embedding: "
        "dense, or per-token: every occurrence of a token in the batch is one update of its row's Adam "
        "moments, as Keras' Adam treats an embedding's sparse gradient; frequent tokens' rows then move "
        f"faster (default: {t.embedding_update})",
    )
    o.add_argument(
        "--weight-decay",
        type=float,
        help=f"decoupled weight decay (AdamW) of matrices and embeddings (default: {t.weight_decay})",
    )
    o.add_argument(
        "--seed", type=int, help=f"seeds the weights, the data order, the split and dropout (default: {t.seed})"
    )
    h = p.add_argument_group("devices and speed")
    h.add_argument(
        "--gpus",
        type=int,
        help="data-parallel over N GPUs of this machine (an error if fewer are "
        "visible; only those N are used, with memory growth); in a multi-worker run, N GPUs per worker, "
        "chosen by the worker's local index (default: one device, the first GPU, else the CPU)",
    )
    h.add_argument(
        "--cpu-replicas",
        type=int,
        help="data-parallel over N logical CPU devices: the multi-replica "
        "code on a machine without GPUs (correct, not faster)",
    )
    h.add_argument(
        "--cluster",
        choices=MODES,
        help="where a multi-worker run's cluster comes from: TF_CONFIG, "
        "a SLURM job step (srun), or auto = TF_CONFIG if set, else SLURM with several tasks, else "
        f"none (default: {t.cluster})",
    )
    h.add_argument(
        "--cluster-port",
        type=int,
        help="SLURM clusters: the port of the first worker on each node, "
        f"the next ones counting up (default: {t.cluster_port})",
    )
    h.add_argument(
        "--xla",
        choices=["auto", "on", "off"],
        help=f"jit-compile the per-replica step; auto = on when every replica is a GPU (default: {t.xla})",
    )
    h.add_argument(
        "--precision",
        choices=["auto", *PRECISIONS],
        help="matrix products in bfloat16 or float16 "
        "with float32 weights, optimizer, norms, softmax and loss (float16 with dynamic loss scaling); "
        "auto: bfloat16 on GPUs of compute capability 8.0+ and on CPUs with AMX/AVX512-BF16, float16 on "
        f"7.x GPUs, else float32 (default: {t.precision})",
    )
    h.add_argument(
        "--steps-per-call",
        type=int,
        help="training steps per compiled call; the host reads the "
        "step metrics once per call; 0 = automatic: --log-every on GPUs, 1 on CPUs "
        f"(default: {t.steps_per_call})",
    )
    h.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic TensorFlow ops "
        "(tf.config.experimental.enable_op_determinism): the same run gives the same bits on a GPU "
        "too, somewhat slower",
    )
    h.add_argument(
        "--loss-chunk",
        type=int,
        help=f"positions per chunk of the output layer and loss; 0 = automatic (default: {t.loss_chunk})",
    )
    h.add_argument(
        "--peak-flops",
        type=float,
        help="peak FLOP/s of one training device at the training "
        "precision (e.g. 989e12 for an H100 in bfloat16), the denominator of the mfu scalar "
        "(default: measured with large matmuls at start-up)",
    )
    h.add_argument(
        "--profile-steps",
        metavar="A:B",
        help="record a profiler trace of global steps A to B into "
        "RUN/train for TensorBoard's Profile tab (pip install tfgpt[profile]); default: none",
    )
    h.add_argument(
        "--collective-timeout",
        type=float,
        help="multi-worker runs: seconds a worker waits for the others to start, and "
        "how long a worker may stop answering (the coordination service's heartbeats) before "
        f"the others fail with an error (default: {t.collective_timeout:.0f})",
    )
    r = p.add_argument_group("run directory, logging, samples")
    r.add_argument("--logdir", help=f"TensorBoard root (default: {t.logdir})")
    r.add_argument("--run-name", help="run directory name under LOGDIR (default: a timestamp)")
    r.add_argument("--resume", action="store_true", help="continue LOGDIR/RUN_NAME from its latest checkpoint")
    r.add_argument("--log-every", type=int, help=f"write scalars every N steps (default: {t.log_every})")
    r.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (default: each epoch only)")
    r.add_argument("--keep-checkpoints", type=int, help=f"checkpoints kept (default: {t.keep_checkpoints})")
    r.add_argument("--prompt", help=f"prompt of the per-epoch sample (default: {t.prompt!r})")
    r.add_argument("--gen-tokens", type=int, help=f"tokens per sample (default: {t.gen_tokens})")
    r.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens (default: {t.top_k})")
    r.add_argument("--temperature", type=float, help=f"sampling temperature; <= 0 is greedy (default: {t.temperature})")
    r.add_argument("--no-export", dest="export", action="store_false", help="do not export a SavedModel at the end")
    r.add_argument("--quiet", action="store_true", help="print only the epoch lines")
    return p


def configs_from_args(args: dict) -> tuple[GPTConfig, TrainConfig]:
    args = {**RECIPES[args.get("recipe", "example")], **args}
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model = GPTConfig(**{k: v for k, v in args.items() if k in model_fields})
    train = TrainConfig(**{k: v for k, v in args.items() if k in train_fields})
    return model, train


def validate(model: GPTConfig, train: TrainConfig) -> None:
    checks = [
        (model.vocab_size >= 3, f"--vocab-size must be at least 3, got {model.vocab_size}"),
        (model.maxlen >= 2, f"--maxlen must be at least 2, got {model.maxlen}"),
        (
            model.embed_dim >= 1 and model.ff_dim >= 1 and model.num_heads >= 1 and model.num_layers >= 1,
            "--embed-dim, --ff-dim, --num-heads and --num-layers must be positive",
        ),
        (model.head_dim is None or model.head_dim >= 1, "--head-dim must be positive"),
        (0.0 <= model.dropout < 1.0, f"--dropout must be in [0, 1), got {model.dropout}"),
        (train.batch_size >= 1, f"--batch-size must be positive, got {train.batch_size}"),
        (train.epochs >= 1, f"--epochs must be positive, got {train.epochs}"),
        (train.max_steps is None or train.max_steps >= 1, f"--max-steps must be positive, got {train.max_steps}"),
        (train.lr > 0, f"--lr must be positive, got {train.lr}"),
        (0 < train.beta2 < 1, f"--beta2 must be between 0 and 1 (exclusive), got {train.beta2}"),
        (train.gen_tokens >= 1, f"--gen-tokens must be positive, got {train.gen_tokens}"),
        (train.top_k >= 1, f"--top-k must be positive, got {train.top_k}"),
        (bool(train.prompt.strip()), "--prompt must hold at least one word"),
        (0.0 <= train.val_fraction < 1.0, f"--val-fraction must be in [0, 1), got {train.val_fraction}"),
        (train.log_every >= 1, f"--log-every must be positive, got {train.log_every}"),
        (train.checkpoint_every >= 0, "--checkpoint-every must be 0 or positive"),
        (train.keep_checkpoints >= 1, "--keep-checkpoints must be positive"),
        (train.warmup_steps >= 0, "--warmup-steps must be 0 or positive"),
        (train.loss_chunk >= 0, "--loss-chunk must be 0 or positive"),
        (train.clip_norm is None or train.clip_norm > 0, "--clip-norm must be positive"),
        (train.weight_decay >= 0, f"--weight-decay must be 0 or positive, got {train.weight_decay}"),
        (0.0 <= train.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {train.label_smoothing}"),
        (
            not (model.tie_embeddings and train.embedding_update == "per-token"),
            "--embedding-update per-token needs a token table of its own; it excludes --tie-embeddings",
        ),
        (train.gpus is None or train.gpus >= 1, f"--gpus must be at least 1, got {train.gpus}"),
        (
            train.cpu_replicas is None or train.cpu_replicas >= 1,
            f"--cpu-replicas must be at least 1, got {train.cpu_replicas}",
        ),
        (
            train.gpus is None or train.cpu_replicas is None,
            "--gpus and --cpu-replicas exclude each other: train on GPUs or on the CPU",
        ),
        (train.steps_per_call >= 0, f"--steps-per-call must be 0 (automatic) or positive, got {train.steps_per_call}"),
        (1 <= train.cluster_port <= 65535, f"--cluster-port must be a port number, got {train.cluster_port}"),
        (train.collective_timeout > 0, "--collective-timeout must be positive"),
        (train.peak_flops is None or train.peak_flops > 0, f"--peak-flops must be positive, got {train.peak_flops}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        train.profile_range()
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve_run(args: dict) -> tuple[GPTConfig, TrainConfig, Path, bool]:
    """Fills the configs, from the flags for a new run or from config.json
    (with the flags allowed to change) for --resume."""
    resume = args.pop("resume", False)
    model, train = configs_from_args(args)
    if resume:
        if not train.run_name:
            raise UserError("--resume needs --run-name, the run directory under --logdir to continue")
        run_dir = Path(train.logdir) / train.run_name
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume: {run_dir} holds no config.json; nothing to resume")
        saved_model, saved_train = load_config(run_dir / "config.json")
        for key, value in args.items():
            saved = getattr(saved_model, key, getattr(saved_train, key, None))
            if key not in RESUMABLE | {"logdir", "run_name"} and value != saved:
                raise UserError(
                    f"--resume: --{key.replace('_', '-')} {value} conflicts with the saved "
                    f"config.json ({key} = {saved}); leave it out or start a new run"
                )
        overrides = {k: v for k, v in args.items() if hasattr(saved_train, k)}
        # Devices: the flag given now replaces the other kind saved.
        if "gpus" in overrides and "cpu_replicas" not in overrides:
            overrides["cpu_replicas"] = None
        if "cpu_replicas" in overrides and "gpus" not in overrides:
            overrides["gpus"] = None
        train = dataclasses.replace(saved_train, **overrides)
        model = saved_model
    else:
        train = dataclasses.replace(train, run_name=train.run_name or time.strftime("%Y%m%d-%H%M%S"))
        run_dir = Path(train.logdir) / train.run_name
        if (run_dir / "config.json").exists() and is_chief_task(train.cluster):  # other workers write nothing there
            raise UserError(f"{run_dir} already exists; pass --resume to continue it or choose another --run-name")
    validate(model, train)
    return model, train, run_dir, resume


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    # TensorFlow's C++ log: on CPU-only machines only its errors (its start-up
    # chatter is noise); with --gpus or an NVIDIA driver its warnings too,
    # which say why a GPU library did not load. A value set by the user wins.
    gpu_machine = args.get("gpus") or shutil.which("nvidia-smi")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if gpu_machine else "2")
    try:
        model_cfg, train_cfg, run_dir, resume = resolve_run(args)
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    from tfgpt.train.run import train  # imports TensorFlow; after the cheap checks

    return train(model_cfg, train_cfg, run_dir, resume)


if __name__ == "__main__":
    sys.exit(main())
