"""The data benchmark: corpora of given sizes, prepared into token stores and
trained on for a few steps, each job in a fresh process.

    python -m benchmarks.bench_data --data-scale 0.5,5            # generated text, 0.5 and 5 GB
    python -m benchmarks.bench_data --data-scale 0.5 --data FILE  # FILE's text repeated to 0.5 GB

For each size (and tokenizer, --tokenizer) it prints: the preparation's
speed (MB of text per second, for the whole process and for the build
alone; with --repeats N the median of N preparations, the tokenizers in
alternation), its CPU seconds per GB (a figure that depends less on what
else the machine runs) and peak resident memory (and the peak
proportional set size of the process with its encoding processes, which
subword stores use, sampled twice a second);
the seconds a first training run (which finds the store built) and a second
one take from process start to their first step, and of that the data work
(finding and checking the store, opening the windows), as the runs print them
(`first step: S s after the process started`, `data: ready in S s`); and the
training run's peak resident memory. The corpora are prepared, and trained
on, without a validation split: the steps alone are timed. Corpora and stores
go to a scratch folder (--workdir, default under /tmp) that is deleted at the
end (--keep keeps it).

Generated text imitates reviews: one per line, about 230 words in 19
sentences drawn from a pool of 400,000 sentences of Zipf-distributed made-up
words (a 200,000-word vocabulary of lengths 1 to 12), with punctuation,
capitals, contractions and the odd "<br /><br />".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tfgpt import cli
from tfgpt.console import LOGGER, quiet, setup_logging
from tfgpt.data import sources
from tfgpt.data.prepare import ensure_store
from tfgpt.errors import UserError, run_main
from tfgpt.runtime.memory import peak_rss_mb

# A child of the "tfgpt" logger, which setup_logging prints and quiet("tfgpt") silences.
log = logging.getLogger(f"{LOGGER}.bench_data")

GB = 1e9


def _vocabulary(rng, size: int):
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    weights = np.array(
        [
            12.7,
            9.1,
            8.2,
            7.5,
            7.0,
            6.7,
            6.3,
            6.1,
            6.0,
            4.3,
            4.0,
            2.8,
            2.8,
            2.4,
            2.4,
            2.2,
            2.0,
            2.0,
            1.9,
            1.5,
            1.0,
            0.8,
            0.2,
            0.2,
            0.1,
            0.1,
        ]
    )
    lengths = np.clip(rng.poisson(4.2, size) + 1, 1, 12)
    out = []
    for n in lengths.tolist():
        out.append(bytes(rng.choice(letters, n, p=weights / weights.sum()).tolist()))
    return out


def _sentences(rng, words: list[bytes], count: int) -> list[bytes]:
    """count sentences of Zipf-distributed words (about 12 each), capitalised,
    with commas, contractions and closing punctuation."""

    n = len(words)
    table = np.array(words + [w[:1].upper() + w[1:] for w in words] + [w + b"'s" for w in words], dtype=object)
    punct = np.array([b"", b",", b".", b"!", b"?", b" -", b" (a)", b"..."], dtype=object)
    total = count * 12
    ranks = np.minimum(rng.zipf(1.15, total), n) - 1
    ends = np.zeros(total, bool)
    ends[np.sort(rng.choice(np.arange(1, total), count - 1, replace=False))] = True
    ends[-1] = True
    starts = np.roll(ends, 1)
    form = np.where(starts, n, np.where(rng.random(total) < 0.04, 2 * n, 0))
    marks = np.where(ends, rng.choice([2, 2, 2, 3, 4, 7], total), np.where(rng.random(total) < 0.06, 1, 0))
    tokens = (table[ranks + form] + punct[marks]).tolist()
    cuts = np.flatnonzero(ends) + 1
    return [b" ".join(tokens[a:b]) for a, b in zip(np.concatenate([[0], cuts[:-1]]), cuts)]


def generate(path: Path, size_bytes: int, seed: int = 0) -> int:
    """Writes about size_bytes of generated reviews to path; returns the bytes
    written. Lines are about 19 sentences drawn from a pool of 400,000."""

    rng = np.random.default_rng(seed)
    pool = np.array(_sentences(rng, _vocabulary(rng, 200_000), 400_000), dtype=object)
    block = 200_000  # sentences per write
    written, t0 = 0, time.monotonic()
    with open(path, "wb") as f:
        while written < size_bytes:
            chosen = pool[rng.integers(0, len(pool), block)]
            seps = np.full(block, b" ", dtype=object)
            seps[rng.random(block) < 0.02] = b"<br /><br />"
            seps[rng.random(block) < 1 / 19] = b"\n"
            seps[-1] = b"\n"
            text = b"".join((chosen + seps).tolist())
            f.write(text)
            written += len(text)
            if time.monotonic() - t0 > 30:
                log.info(f"  generated {written / GB:.2f} of {size_bytes / GB:.2f} GB")
                t0 = time.monotonic()
    return written


def replicate(source: str, path: Path, size_bytes: int) -> int:
    """Writes source's text (any --data form, its documents' lines) again and
    again to path until it holds about size_bytes."""

    docs = sources.list_documents(sources.expand(source), False, spool_dir=path.parent)
    written = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            for doc in docs:
                for piece, _ in sources.pieces(doc):
                    f.write(piece + b"\n")
                    written += len(piece) + 1
                if written >= size_bytes:
                    break
    for spool in path.parent.glob("spool-*"):
        spool.unlink()
    return written


def _vmhwm_mb() -> float:
    return peak_rss_mb()


def _tree_pss_mb() -> float:
    """The proportional set size (shared pages divided among their sharers)
    of this process and its child processes, summed: the memory the
    preparation takes with its encoding processes (their RSS would count
    the pages they share with this process, from the fork, once each)."""
    pids = {str(os.getpid())}
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update((task / "children").read_text().split())
        except OSError:
            pass
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            pass  # a process that has just ended
    return total / 1024


class _PeakTreeMemory:
    """Samples `_tree_pss_mb` every half second on a thread; .peak_mb."""

    def __init__(self):
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            self.peak_mb = max(self.peak_mb, _tree_pss_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child_prepare(corpus: str, store_dir: str, tokenizer: str = "word") -> dict:
    """In a fresh process: prepare the corpus into store_dir (no validation split)."""

    t0 = time.perf_counter()
    # the child's output is its result; the parent prints the figures
    with quiet("tfgpt"), _PeakTreeMemory() as tree:
        prepared = ensure_store(corpus, store_dir=store_dir, val_fraction=0.0, tokenizer=tokenizer)
    manifest = prepared.store.manifest
    return dict(
        seconds=time.perf_counter() - t0,
        text_bytes=manifest["text_bytes"],
        tokens=manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"],
        action=prepared.action,
        peak_rss_mb=_vmhwm_mb(),
        tree_peak_mb=tree.peak_mb,
    )


def child_train(corpus: str, store_dir: str, logdir: str, run: str, steps: int, tokenizer: str = "word") -> dict:
    """In a fresh process: train.py on the corpus for a few steps, as a user
    runs it (its lines go to this process's output, where `run_timings`
    reads them)."""

    status = cli.main(
        [
            *("--data", corpus, "--store-dir", store_dir, "--val-fraction", "0", "--tokenizer", tokenizer),
            *("--logdir", logdir, "--run-name", run, "--max-steps", str(steps), "--epochs", "1"),
            *("--no-export", "--quiet"),
        ]
    )
    return dict(status=status, peak_rss_mb=_vmhwm_mb())


def run_timings(out: str) -> dict:
    """The data work's and the first step's seconds, from what a training run printed."""
    data = re.search(r"^data: ready in ([\d.]+) s$", out, re.M)
    first = re.search(r"^first step: ([\d.]+) s after the process started$", out, re.M)
    if data is None or first is None:
        raise RuntimeError(f"no 'data: ready' or 'first step:' line in the training run's output:\n{out[-2000:]}")
    return dict(data_s=float(data[1]), first_step_s=float(first[1]))


def _child(kind: str, *args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_data", "--child", json.dumps([kind, *args])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} child failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    result = json.loads(lines[-1])
    if kind == "train":
        if result["status"] != 0:
            raise RuntimeError(f"the training run failed ({result['status']}):\n{out.stderr[-4000:]}")
        result.update(run_timings(out.stdout))
    result["wall_s"], result["cpu_s"] = wall, cpu
    return result


def run_scale(scale_gb: float, work: Path, data: str | None, steps: int, tokenizers=("word",), repeats=1) -> list:
    """One row per tokenizer: the corpus prepared `repeats` times per
    tokenizer, the tokenizers in alternation (a change in the machine's
    speed falls on each alike), figures of the median preparation by time;
    then two training runs on the last store."""
    folder = work / f"{scale_gb:g}GB"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    t0 = time.perf_counter()
    size = replicate(data, corpus, int(scale_gb * GB)) if data else generate(corpus, int(scale_gb * GB))
    log.info(f"{scale_gb:g} GB: corpus of {size / GB:.2f} GB written in {time.perf_counter() - t0:.0f}s")
    preps: dict = {t: [] for t in tokenizers}
    for _ in range(repeats):
        for tokenizer in tokenizers:
            stores = folder / f"stores-{tokenizer}"
            shutil.rmtree(stores, ignore_errors=True)
            prep = _child("prepare", str(corpus), str(stores), tokenizer)
            preps[tokenizer].append(prep)
            log.info(
                f"  {tokenizer}: prepared in {prep['wall_s']:.1f}s ({size / 1e6 / prep['wall_s']:.1f} MB/s; the build "
                f"alone {prep['seconds']:.1f}s), {prep['cpu_s']:.0f} CPU s, peak {prep['peak_rss_mb']:.0f} MB "
                f"(with its encoding processes: {prep['tree_peak_mb']:.0f} MB PSS)"
            )
    rows = []
    for tokenizer in tokenizers:
        stores = folder / f"stores-{tokenizer}"
        shutil.rmtree(folder / f"logs-{tokenizer}", ignore_errors=True)  # an earlier call's runs, in a reused --workdir
        runs = []
        for i in range(2):
            runs.append(
                _child(
                    "train", str(corpus), str(stores), str(folder / f"logs-{tokenizer}"), f"run{i}", steps, tokenizer
                )
            )
            r = runs[-1]
            log.info(
                f"  {tokenizer}: training run {i + 1}: first step after {r['first_step_s']:.1f}s, data work "
                f"{r['data_s']:.2f}s, peak {r['peak_rss_mb']:.0f} MB"
            )
        done = sorted(preps[tokenizer], key=lambda p: p["wall_s"])
        prep = done[len(done) // 2]  # the median (of an even count, the slower middle one)
        rows.append(
            dict(
                scale_gb=scale_gb,
                tokenizer=tokenizer,
                repeats=repeats,
                text_gb=size / GB,
                prepare_s=prep["wall_s"],
                prepare_inner_s=prep["seconds"],
                prepare_mb_s=size / 1e6 / prep["wall_s"],
                build_mb_s=size / 1e6 / prep["seconds"],
                all_prepare_mb_s=[size / 1e6 / p["wall_s"] for p in preps[tokenizer]],
                prepare_cpu_s_per_gb=prep["cpu_s"] / (size / GB),
                prepare_peak_mb=max(p["peak_rss_mb"] for p in done),
                tree_peak_mb=max(p["tree_peak_mb"] for p in done),
                tokens=prep["tokens"],
                first_step_s=[r["first_step_s"] for r in runs],
                data_s=[r["data_s"] for r in runs],
                train_peak_mb=max(r["peak_rss_mb"] for r in runs),
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| corpus | tokens | prepare (process) | MB/s (process / build) | MB/s of each preparation | CPU s per GB "
        "| prepare peak RSS (PSS with its processes) | first step, run 1 / run 2 | data work, run 1 / run 2 "
        "| training peak RSS |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['text_gb']:.2f} GB, {r['tokenizer']} | {r['tokens'] / 1e6:,.0f}M | {r['prepare_s']:.0f} s | "
            f"{r['prepare_mb_s']:.1f} / {r['build_mb_s']:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in r['all_prepare_mb_s'])} | {r['prepare_cpu_s_per_gb']:.0f} | "
            f"{r['prepare_peak_mb']:,.0f} MB ({r['tree_peak_mb']:,.0f} MB) | "
            f"{r['first_step_s'][0]:.1f} s / {r['first_step_s'][1]:.1f} s | "
            f"{r['data_s'][0]:.2f} s / {r['data_s'][1]:.2f} s | {r['train_peak_mb']:,.0f} MB |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """The benchmark; its exit status (a UserError: `bench_data: error: ...` and its code)."""
    return run_main("bench_data", lambda: _main(argv))


def _main(argv) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-scale", default="0.5,5", help="corpus sizes in GB, comma-separated (default: 0.5,5)")
    p.add_argument(
        "--data", help="real text to repeat up to each size (any train.py --data form; default: generated reviews)"
    )
    p.add_argument(
        "--tokenizer",
        choices=("word", "subword", "both"),
        default="word",
        help="the stores' tokenizer, as train.py's --tokenizer; both: each corpus prepared with each, in "
        "alternation (default: word)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="preparations per corpus and tokenizer; the table shows the median's figures (default: 1)",
    )
    p.add_argument("--steps", type=int, default=3, help="training steps per run (default: 3)")
    p.add_argument("--workdir", help="scratch folder (default: a new folder under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and stores")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        kind, *rest = json.loads(args.child)
        result = child_prepare(*rest) if kind == "prepare" else child_train(*rest)
        print(json.dumps(result))
        return 0
    try:
        scales = [float(s) for s in args.data_scale.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--data-scale takes sizes in GB such as 0.5,5, got {args.data_scale!r}") from None
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tfgpt-bench-data-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the scratch folder {work}: {e.strerror or e}") from None
    need = max(scales) * GB * 2.2
    free = shutil.disk_usage(work).free
    if free < need:
        raise UserError(
            f"{work} has {free / GB:.1f} GB free; the {max(scales):g} GB corpus needs about "
            f"{need / GB:.1f} GB (the text, the store and its temporary shards)"
        )
    rows = []
    try:
        for scale in scales:
            tokenizers = ("word", "subword") if args.tokenizer == "both" else (args.tokenizer,)
            rows.extend(run_scale(scale, work, args.data, args.steps, tokenizers, args.repeats))
            if not args.keep:
                shutil.rmtree(work / f"{scale:g}GB", ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print()
    print(table(rows))
    print(f"\nload average at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} ({os.cpu_count()} cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, load=load), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
