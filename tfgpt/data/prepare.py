"""Preparing a corpus for training: find its token store, or build it.

    python -m tfgpt.prepare --data CORPUS [--out DIR]     # build (or check and reuse) a store
    python train.py --data CORPUS                         # the same, automatically, in the cache
    python train.py --data DIR                            # train on a store

A store is kept under a key of everything that decides its contents: every
input file (path, size, modification time), the standardization (its rules
and TensorFlow's version), the vocabulary size, the validation fraction, the
seed, whether IMDB's unlabelled reviews are read, the store format, the
tokenizer when it is not the word one (so word stores keep the keys they
always had), and, for a resumed run whose vocabulary the corpus no longer
gives (word) or whose subword vocabulary is given, that vocabulary.
`train.py --data CORPUS` looks the key up in the cache (`--store-dir`, by
default $TFGPT_CACHE/stores or ~/.cache/tfgpt/stores): a store is reused when
it is there and intact, and built otherwise. So an input file that changed
gives a new store (the stale one is deleted), never stale data.

Building happens under an exclusive lock (a second process waits, then
reuses), in a temporary folder beside the target that is renamed into place
when complete: a store is whole or absent. A store whose files fail the
check of sizes (and checksums, for files whose modification time changed)
is rebuilt with a warning. A full disk while building is one error line, and
the temporary folder is deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import tensorflow as tf

from tfgpt.config import GPTConfig, TrainConfig, add_flag, refused, subword_vocab_refused
from tfgpt.console import setup_logging
from tfgpt.data import sources, store_build, subword, text
from tfgpt.data.corpus import cache_dir, resolve_imdb
from tfgpt.data.store import VERSION, Store, StoreError, is_store, read_manifest
from tfgpt.errors import UserError, run_main

# Named after the module also when it runs as `python -m tfgpt.data.prepare` (__name__ is then
# "__main__", a logger outside "tfgpt").
log = logging.getLogger(__spec__.name if __spec__ else __name__)

# The digest of text.STANDARDIZE's steps -> the name a store's key gives them,
# where it is not the digest: the present steps keep the name that the stores
# already built are keyed by, so those stay valid.
STANDARDIZATION_NAMES = {
    "bd70ed0b0e6dbb2b6a933948320d30f43df0135c4d558b8a937e37a3c3f25600": f"1|{text.PUNCT_CLASS}|<br />|lower utf-8|nul",
}


@dataclasses.dataclass
class Prepared:
    store: object  # tfgpt.data.store.Store
    action: str  # "reused" | "built" | "rebuilt"
    seconds: float


def default_store_dir() -> Path:
    return cache_dir() / "stores"


def standardization_id() -> str:
    """The standardization in a store's key: text.STANDARDIZE's steps (what
    `standardize` applies), under this TensorFlow version. A change of any
    step changes it, so a store standardized otherwise is never reused."""
    steps = hashlib.sha256(repr(text.STANDARDIZE).encode()).hexdigest()
    rules = STANDARDIZATION_NAMES.get(steps, steps)
    return hashlib.sha256(f"{rules}|{tf.__version__}".encode()).hexdigest()[:16]


def vocab_digest(vocab: list[str]) -> str:
    return hashlib.sha256("\n".join(vocab).encode("utf-8")).hexdigest()


def subword_definition() -> str:
    """What decides a learned subword vocabulary besides the text and its
    size: the subword format, pre-tokenization rule and training sample size
    (tfgpt/data/subword.py)
    and the version of the `tokenizers` package that learns the merges."""
    rule = json.dumps(
        [subword.FORMAT, subword.VERSION, subword.PRETOKENIZE, subword.TRAIN_SAMPLE_BYTES], sort_keys=True
    )
    return hashlib.sha256(f"{rule}|{importlib.metadata.version('tokenizers')}".encode()).hexdigest()[:16]


def subword_digest(path) -> str:
    """The digest of a subword vocabulary file (`SubwordVocab.digest`)."""
    return subword.SubwordVocab.load(path).digest()


def store_params(
    paths,
    inputs,
    *,
    imdb_unsup: bool,
    vocab_size: int,
    val_fraction: float,
    seed: int,
    vocab: str | None = None,
    tokenizer: str = "word",
) -> dict:
    """The parameters a store's key hashes. vocab: the digest of a given
    vocabulary (a resumed run's). The tokenizer is there only when it is not
    "word", so a word store's key is the one it had before there was a choice."""
    params = dict(
        format=VERSION,
        data=[str(Path(p).resolve()) for p in paths],
        inputs=[[f.path, f.size, f.mtime_ns] for f in inputs],
        imdb_unsup=bool(imdb_unsup),
        vocab_size=int(vocab_size),
        val_fraction=float(val_fraction),
        seed=int(seed),
        standardization=standardization_id(),
        vocab=vocab,
    )
    if tokenizer != "word":
        params["tokenizer"] = tokenizer
        params["subword"] = subword_definition()
    return params


def tokenizer_of(params: dict) -> str:
    """The tokenizer of a store's parameters (stores from before the choice: word)."""
    return params.get("tokenizer", "word")


def key_of(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]


def family_of(params: dict) -> str:
    """The key without the input files and the given vocabulary: the stores of
    one corpus and settings. Those built from other versions of the input
    files than the current one are stale."""
    return key_of({k: v for k, v in params.items() if k not in ("inputs", "vocab")})


def describe_change(old: dict, new: dict) -> str:
    """What differs between the parameters a store was built with and now."""
    was = {f[0]: f[1:] for f in old.get("inputs", [])}
    now = {f[0]: f[1:] for f in new.get("inputs", [])}
    for path in sorted(set(was) | set(now)):
        if path not in now:
            return f"{path} is gone"
        if path not in was:
            return f"{path} is new"
        if was[path] != now[path]:
            return f"{path} changed (size {was[path][0]:,} -> {now[path][0]:,} bytes, or its modification time)"
    for k in sorted(set(old) | set(new)):
        if k != "inputs" and old.get(k) != new.get(k):
            return f"{k} {old.get(k)!r} -> {new.get(k)!r}"
    return "nothing"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive flock on `path` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"token store: another process is preparing {path.parent / path.name[1:-5]}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _clean_leftovers(target: Path) -> None:
    """Temporary and replaced folders of `target` left by a killed build
    (only called under target's lock, so no build of it is running)."""
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _disk_full(target: Path, written: int):
    """The one-line UserError for a full disk while building target."""

    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = 0
    return UserError(
        f"no space left on the device while preparing the token store {target} "
        f"({written / 1e6:,.0f} MB written, {free / 1e6:,.0f} MB free); nothing was kept: free "
        "some space or put the store elsewhere (--store-dir, TFGPT_CACHE, or prepare --out)"
    )


def _usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def _build(
    target: Path, paths, params: dict, key: str, alt: tuple | None, vocab, workers, shard_tokens, given_subword=None
):
    """Builds into a temporary folder beside target, then renames it to target
    (or, with a given vocabulary the corpus does not give, to alt's folder).
    Returns the published folder."""

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        manifest = store_build.build(
            tmp,
            paths,
            imdb_unsup=params["imdb_unsup"],
            vocab_size=params["vocab_size"],
            val_fraction=params["val_fraction"],
            seed=params["seed"],
            params=params,
            key=key,
            given_vocab=vocab,
            alt=alt,
            workers=workers,
            shard_tokens=shard_tokens,
            **_tokenizer_args(params, given_subword),
        )
        final = target if manifest["key"] == key else alt[2]
        _publish(tmp, final)
        return final
    except BaseException as e:
        written = _usage(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(target, written) from None
        raise


def _tokenizer_args(params: dict, given_subword) -> dict:
    """store_build.build's tokenizer arguments: none for a word store (the
    build it always was), else the tokenizer and a given subword file."""
    if tokenizer_of(params) == "word":
        return {}
    return dict(tokenizer=tokenizer_of(params), given_subword=Path(given_subword) if given_subword else None)


def _same_vocabulary(store, vocab, given_digest) -> bool:
    """Whether store holds the given vocabulary's ids (True when none is given)."""
    if vocab is not None and store.vocab() != list(vocab):
        return False
    return given_digest is None or subword_digest(store.tokenizer_path) == given_digest


def _publish(tmp: Path, target: Path) -> None:
    """Puts the complete folder tmp in target's place (a store there is
    replaced: renamed aside, then deleted; readers that have its files open
    keep reading them)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _open(folder: Path, checksums: str):
    """The store in folder, or None (with a warning if it is damaged)."""

    if not folder.exists():
        return None
    try:
        return Store(folder, checksums)
    except StoreError as e:
        log.warning(f"warning: the token store {folder} is damaged ({e}); rebuilding it")
        return None


def _remove_stale(root: Path, params: dict) -> None:
    """Deletes the cache's stores of the same corpus and settings whose input
    files have changed since (they can never be used again)."""

    family = family_of(params)
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            old = read_manifest(folder)["params"]
        except (StoreError, KeyError):
            continue
        if family_of(old) != family or old["inputs"] == params["inputs"]:
            continue
        fd = os.open(_lock_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # being checked or rebuilt right now
        try:
            shutil.rmtree(folder, ignore_errors=True)
            _lock_path(folder).unlink(missing_ok=True)
        finally:
            os.close(fd)
        log.info(
            f"token store: removed {folder}, built from an older version of the input ({describe_change(old, params)})"
        )


def ensure_store(
    data_spec,
    *,
    imdb_unsup: bool = False,
    vocab_size: int = GPTConfig.vocab_size,
    val_fraction: float = TrainConfig.val_fraction,
    seed: int = TrainConfig.seed,
    vocab: list[str] | None = None,
    out=None,
    store_dir=None,
    checksums: str = "changed",
    rebuild: bool = False,
    workers: int | None = None,
    shard_tokens: int | None = None,
    tokenizer: str = "word",
    given_subword=None,
) -> Prepared:
    """The token store for `data_spec` with these settings: reused when it
    exists and is intact, else built. data_spec may name a store itself.

    vocab: a resumed word run's vocabulary; the store's ids are then that
    vocabulary's. tokenizer: "word" or "subword"; given_subword: a resumed
    subword run's subword.json, whose ids the store then holds (else the
    build learns a subword vocabulary of vocab_size from the training text).
    out: the store's folder instead of the cache's."""

    t0 = time.perf_counter()
    shard_tokens = shard_tokens or store_build.SHARD_TOKENS
    given_digest = subword_digest(given_subword) if tokenizer == "subword" and given_subword else None
    if out is None and is_store(Path(str(data_spec)).expanduser()):
        return _named_store(
            Path(str(data_spec)).expanduser(), vocab, checksums, workers, shard_tokens, t0, tokenizer, given_subword
        )
    paths = sources.expand(str(data_spec))
    for p in paths:
        if p.is_dir() and is_store(p):
            raise UserError(f"--data {p}: a token store can only be given alone")
    inputs = sources.input_files(paths, imdb_unsup)
    settings = dict(
        imdb_unsup=imdb_unsup, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed, tokenizer=tokenizer
    )
    params = store_params(paths, inputs, **settings)
    key = key_of(params)
    root = Path(store_dir).expanduser() if store_dir else default_store_dir()
    target = Path(out).expanduser() if out else root / key
    alt = None
    if vocab is not None or given_digest is not None:
        alt_params = store_params(paths, inputs, **settings, vocab=given_digest or vocab_digest(vocab))
        alt = (alt_params, key_of(alt_params), target if out else root / key_of(alt_params))
    if out is not None and target.exists() and not is_store(target) and any(target.iterdir()):
        raise UserError(f"--out {target}: the folder exists and is not a token store; choose another")
    with _locked(_lock_path(target)):
        _clean_leftovers(target)
        if alt and alt[2] != target:
            _clean_leftovers(alt[2])
        action = "built"
        candidates = [(target, {key})]
        if alt and alt[2] != target:  # a given vocabulary's store, beside the ordinary one
            candidates.append((alt[2], {alt[1]}))
        elif alt:  # or in the same --out folder
            candidates[0][1].add(alt[1])
        for folder, want in candidates:
            found = _open(folder, checksums)
            if found is None:
                action = "rebuilt" if folder.exists() else action
                continue
            if found.key not in want:
                log.info(
                    f"token store {folder}: {describe_change(found.manifest['params'], params)} since it was "
                    "built; rebuilding it"
                )
                action = "rebuilt"
                continue
            if not _same_vocabulary(found, vocab, given_digest):
                continue
            if rebuild:
                action = "rebuilt"
                break
            return Prepared(found, "reused", time.perf_counter() - t0)
        folder = _build(target, paths, params, key, alt, vocab, workers, shard_tokens, given_subword)
    if out is None:
        _remove_stale(root, params)

    return Prepared(Store(folder), action, time.perf_counter() - t0)


def _named_store(path: Path, vocab, checksums, workers, shard_tokens, t0, tokenizer, given_subword) -> Prepared:
    """`--data STORE`: the store as it is, unless its inputs are still there
    and changed (or it is damaged): then it is rebuilt in place from them.
    Its tokenizer must be the run's."""

    try:
        manifest = read_manifest(path)
    except StoreError as e:
        raise UserError(f"--data {path}: {e}") from None
    params = manifest["params"]
    if tokenizer_of(params) != tokenizer:
        raise UserError(
            f"--data {path}: the token store was built with the {tokenizer_of(params)} tokenizer, not the "
            f"{tokenizer} one; pass --tokenizer {tokenizer_of(params)} or give the corpus itself"
        )
    paths = [Path(p) for p in params["data"]]
    present = all(p.exists() for p in paths)
    settings = dict(
        imdb_unsup=params["imdb_unsup"],
        vocab_size=params["vocab_size"],
        val_fraction=params["val_fraction"],
        seed=params["seed"],
        tokenizer=tokenizer,
    )
    given_digest = subword_digest(given_subword) if tokenizer == "subword" and given_subword else None
    reason = None
    if present:
        try:
            now = store_params(
                paths, sources.input_files(paths, params["imdb_unsup"]), **settings, vocab=params.get("vocab")
            )
            if key_of(now) != manifest["key"]:
                reason = f"{describe_change(params, now)} since it was built"
        except (UserError, OSError) as e:
            reason = f"its input cannot be read ({e})"
    try:
        found = Store(path, checksums)
    except StoreError as e:
        if not present:
            raise UserError(f"--data {path}: the token store is damaged ({e}) and its input is gone") from None
        reason = f"it is damaged ({e})"
    if reason is None:
        if not _same_vocabulary(found, vocab, given_digest):
            own = "vocab.txt" if tokenizer == "word" else subword.SUBWORD_FILE
            raise UserError(f"--data {path}: the store's vocabulary differs from the run's {own}")
        if not present:
            log.info(f"note: token store {path}: its input is not here; using it as it is")
        return Prepared(found, "reused", time.perf_counter() - t0)
    log.warning(f"warning: token store {path}: {reason}; rebuilding it")
    given = None
    if params.get("vocab"):
        given = vocab if tokenizer == "word" else given_subword  # built for a resumed run's vocabulary:
        if given is None:  # only that run can rebuild it
            raise UserError(
                f"--data {path}: {reason}, and it was built for a run's vocabulary; rebuild it by resuming that run"
            )
    prepared = ensure_store(
        os.pathsep.join(map(str, paths)),
        **settings,
        vocab=given if tokenizer == "word" else None,
        given_subword=given if tokenizer != "word" else None,
        out=path,
        checksums=checksums,
        rebuild=True,
        workers=workers,
        shard_tokens=shard_tokens,
    )
    return Prepared(prepared.store, "rebuilt", time.perf_counter() - t0)


def summary(prepared: Prepared) -> list[str]:
    st = prepared.store
    m = st.manifest
    train, val = st.split("train"), st.split("val")
    size = sum(f["bytes"] for f in m["files"].values())
    units = "lines" if tokenizer_of(m["params"]) == "word" else "documents"  # a subword store's units
    return [
        f"token store: {prepared.action} {st.root} in {prepared.seconds:.1f}s",
        f"  {m['documents']:,} documents, {m['text_bytes'] / 1e6:,.1f} MB of text; "
        f"training: {train['lines']:,} {units}, {train['tokens']:,} tokens; "
        f"validation: {val['lines']:,} {units}, {val['tokens']:,} tokens",
        f"  {tokenizer_of(m['params'])} vocabulary: {m['vocab_entries']:,} entries; ids: {m['dtype']} in "
        f"{len(train['shards']) + len(val['shards'])} shard(s); {size / 1e6:,.1f} MB on disk",
    ]


def build_parser() -> argparse.ArgumentParser:
    """The command's parser; the flags it shares with train.py are those of
    the config fields (tfgpt.config), with their defaults."""
    p = argparse.ArgumentParser(
        prog="prepare",
        description="Tokenize a corpus once into a token store that train.py reads: the vocabulary, then token "
        "ids in shards with the line boundaries, split into training and validation documents as "
        "train.py splits them. A store that exists and is intact is checked and reused.",
    )
    add_flag(
        p,
        "data",
        required=True,
        help="what train.py --data accepts: 'imdb', an IMDB archive or "
        "folder, a folder of .txt/.txt.gz files, a text or .txt.gz file, several of these separated "
        f"by '{os.pathsep}', or a glob (quoted)",
    )
    p.add_argument("--out", help="the store's folder (default: the cache that train.py --data looks in)")
    add_flag(p, "store_dir")
    add_flag(p, "tokenizer")
    add_flag(p, "vocab_size")
    add_flag(p, "val_fraction")
    add_flag(p, "seed", help="chooses the validation documents (default: {default})")
    add_flag(p, "imdb_unsup")
    p.add_argument("--workers", type=int, help="chunks analysed in parallel (default: one per core)")
    p.add_argument("--rebuild", action="store_true", help="build even if an intact store exists")
    return p


def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return run_main("prepare", lambda: _prepare(args))


def _prepare(args: argparse.Namespace) -> int:
    message = refused(dict(vocab_size=args.vocab_size, val_fraction=args.val_fraction))
    message = message or subword_vocab_refused(args.tokenizer, args.vocab_size)
    if message:
        raise UserError(message)
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be positive")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    source = resolve_imdb() if args.data == "imdb" else args.data
    prepared = ensure_store(
        source,
        imdb_unsup=args.imdb_unsup,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        out=args.out,
        store_dir=args.store_dir,
        checksums="all",
        rebuild=args.rebuild,
        workers=args.workers,
        tokenizer=args.tokenizer,
    )
    for line in summary(prepared):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
