"""Exports a training run's checkpoint as a SavedModel for TensorFlow Serving.

    python -m tfgpt.export logs/<run> [--step N] [--version V] [--precision P]

Rebuilds the model from <run>/config.json, restores the latest checkpoint in
<run>/ckpt (or ckpt-N with --step N), and writes <run>/export/<version>/ with
the vocabulary <run>/vocab.txt as an asset. Without --version the next
integer version is used, so a server watching <run>/export picks it up.
The exported model computes its matrix products in the precision the run
trained with (as the export at the end of training does), unless --precision
says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tfgpt.devices import PRECISIONS, compute_dtype


class ExportError(Exception):
    """A problem with the run directory: reported as one line, no traceback."""


def find_checkpoint(run_dir: Path, step: int | None) -> str:
    """The checkpoint prefix to restore: <run>/ckpt/ckpt-<step>, or the latest."""
    import tensorflow as tf

    ckpt_dir = run_dir / "ckpt"
    if step is not None:
        prefix = ckpt_dir / f"ckpt-{step}"
        if not Path(str(prefix) + ".index").exists():
            available = sorted(int(p.name[len("ckpt-"):-len(".index")]) for p in ckpt_dir.glob("ckpt-*.index")
                               if p.name[len("ckpt-"):-len(".index")].isdigit()) if ckpt_dir.is_dir() else []
            raise ExportError(f"no checkpoint for step {step} in {ckpt_dir} (available steps: "
                              f"{', '.join(map(str, available)) or 'none'})")
        return str(prefix)
    latest = tf.train.latest_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if latest is None:
        raise ExportError(f"no checkpoint in {ckpt_dir}")
    return latest


def export_run(run_dir, step: int | None = None, version: int | None = None, precision: str | None = None,
               log=print) -> Path:
    """Restores a run's checkpoint into a fresh model and exports it.

    precision: "float32", "bfloat16" or "float16" matrix products in the exported model;
    None takes the run's training precision. Returns the version directory
    written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    config_path, vocab_path = run_dir / "config.json", run_dir / "vocab.txt"
    for path in (config_path, vocab_path):
        if not path.is_file():
            raise ExportError(f"{path} is missing: is {run_dir} a training run directory?")

    import tensorflow as tf

    from tfgpt.config import load_config
    from tfgpt.model import GPT
    from tfgpt.sampler import export_model

    try:
        model_config, train_config = load_config(config_path)
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"cannot read {config_path}: {e}") from None
    checkpoint = find_checkpoint(run_dir, step)
    # config.json records the precision the run resolved "auto" to.
    precision = precision or train_config.compute_precision or \
        (train_config.precision if train_config.precision != "auto" else "float32")
    model = GPT(model_config, compute_dtype=compute_dtype(precision))
    try:
        status = tf.train.Checkpoint(model=model).read(checkpoint).expect_partial()
        status.assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot restore the model from {checkpoint}: {first}") from None
    log(f"restored {checkpoint}; {model.compute_dtype.name} matrix products")
    try:
        return export_model(model, vocab_path, run_dir / "export", version)
    except FileExistsError as e:
        raise ExportError(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfgpt.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a training run directory, e.g. logs/<run>")
    parser.add_argument("--step", type=int, help="export the checkpoint of this global step (default: the latest)")
    parser.add_argument("--version", type=int,
                        help="the version directory to write (default: one more than the largest present)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="matrix products of the exported model (default: the run's training precision)")
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 1:
        parser.error("--version must be a positive integer")
    try:
        path = export_run(args.run_dir, args.step, args.version, args.precision)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported SavedModel: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
