"""`python train.py`: the command line that fills the configs and runs training."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

from tfgpt.config import (
    FLAG_GROUPS,
    RECIPES,
    GPTConfig,
    TrainConfig,
    add_flag,
    flag_fields,
    load_config,
    refused,
    resumable_fields,
    subword_vocab_refused,
)
from tfgpt.errors import UserError, run_main
from tfgpt.runtime.cluster import is_chief_task

# The flags of train.py that are no config field, each shown in --help after the field named.
OTHER_FLAGS = {
    "run_name": ("--resume", dict(action="store_true", help="continue LOGDIR/RUN_NAME from its latest checkpoint")),
}

# Fields that may differ from the saved config.json when resuming a run.
RESUMABLE = resumable_fields()


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser: a flag for each config field that declares one
    (tfgpt.config), in its section, and OTHER_FLAGS. Only the flags given are
    parsed (argument_default=SUPPRESS), so --resume can tell them from the saved config."""
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
    groups = {title: p.add_argument_group(title) for title in FLAG_GROUPS}
    for f in flag_fields():
        group = groups[f.metadata["group"]]
        add_flag(group, f.name)
        if f.name in OTHER_FLAGS:
            flag, keywords = OTHER_FLAGS[f.name]
            group.add_argument(flag, **keywords)
    return p


def configs_from_args(args: dict) -> tuple[GPTConfig, TrainConfig]:
    args = {**RECIPES[args.get("recipe", "example")], **args}
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model = GPTConfig(**{k: v for k, v in args.items() if k in model_fields})
    train = TrainConfig(**{k: v for k, v in args.items() if k in train_fields})
    return model, train


def validate(model: GPTConfig, train: TrainConfig) -> None:
    """Raises a UserError for the first value that its field's declaration
    (tfgpt.config) refuses, then for flags that exclude each other."""
    message = refused(dataclasses.asdict(model) | dataclasses.asdict(train))
    message = message or subword_vocab_refused(train.tokenizer, model.vocab_size)
    if message:
        raise UserError(message)
    if model.tie_embeddings and train.embedding_update == "per-token":
        raise UserError("--embedding-update per-token needs a token table of its own; it excludes --tie-embeddings")
    if train.gpus is not None and train.cpu_replicas is not None:
        raise UserError("--gpus and --cpu-replicas exclude each other: train on GPUs or on the CPU")
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
            if key not in RESUMABLE and value != saved:
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
    return run_main("train.py", lambda: _run(args))


def _run(args: dict) -> int:
    # --packing given, or a resumed run's (its config.json's): not replaced by the automatic choice.
    packing_given = "packing" in args or bool(args.get("resume"))
    model_cfg, train_cfg, run_dir, resume = resolve_run(args)
    # Imported here, not at the top: TensorFlow's start-up takes seconds, and
    # --help and the flag checks above need none of it.
    from tfgpt.train.run import train

    return train(model_cfg, train_cfg, run_dir, resume, packing_given=packing_given)


if __name__ == "__main__":
    sys.exit(main())
