"""The command line (tfgpt.cli): the training options' defaults, and every
kind of bad input as one line on stderr and exit status 2.

The parser built from the config declarations is checked against the command
line of tfgpt at commit 1fd68bd, where each flag was written out by hand:
tests/data/cli_reference.json holds its `train.py --help` (COLUMNS=80), its
argparse actions, its defaults, its RESUMABLE set, its NOT_HPARAMS and the
message of each bad value of "train_errors". Flags added since (ADDED) are
left out of the comparison and checked on their own; the help of the old
flags is the reference's, byte for byte, but for the words EXTENDED adds."""

import argparse
import dataclasses
import json
import re

import pytest
from helpers import ROOT, run_python, write_corpus

from tfgpt import cli
from tfgpt.cli import build_parser, configs_from_args, main, validate
from tfgpt.config import field_of
from tfgpt.errors import UserError
from tfgpt.runtime import cluster, devices
from tfgpt.train import summaries

REFERENCE = json.loads((ROOT / "tests" / "data" / "cli_reference.json").read_text())

# The flags added since the reference's commit: {dest: what its usage shows}.
ADDED = {"tokenizer": "[--tokenizer {word,subword}]"}
# Old flags whose help gained words at its end since: {flag: the words}.
EXTENDED = {
    "--vocab-size": "; with --tokenizer subword, the size of the subword vocabulary learned from the corpus",
    "--xla": "; on a CPU with AVX2 but no AVX-512, on is faster in float32 but takes several times the memory",
}


def help_blocks(text: str) -> list[str]:
    """A --help text cut into blocks: the usage, each flag's lines (from its
    "  -" line), and each other unindented paragraph line."""
    blocks: list[str] = []
    for line in text.split("\n"):
        starts = line.startswith("  -") or not line.startswith(" ") or not blocks
        if starts:
            blocks.append(line)
        else:
            blocks[-1] += "\n" + line
    return blocks


def unspaced(text: str) -> str:
    return "".join(text.split())  # argparse's wrapping may also cut at a hyphen


def assert_help_is_the_reference(help_text: str, reference: str) -> None:
    """help_text is the reference's --help with the ADDED flags and the
    EXTENDED words: every other block byte for byte."""
    got, want = help_blocks(help_text), help_blocks(reference)
    for usage in ADDED.values():  # the usage: its flags wrap anew
        assert unspaced(usage) in unspaced(got[0])
        got[0] = unspaced(got[0]).replace(unspaced(usage), "", 1)
    want[0] = unspaced(want[0])
    added = tuple("  --" + dest.replace("_", "-") + " " for dest in ADDED)
    got = [b for b in got if not b.startswith(added)]
    for flag, words in EXTENDED.items():
        mine = [i for i, b in enumerate(got) if b.startswith(f"  {flag} ")]
        theirs = [i for i, b in enumerate(want) if b.startswith(f"  {flag} ")]
        if not theirs:  # a parser without that flag
            continue
        (i,), (j,) = mine, theirs
        assert unspaced(got[i]) == unspaced(want[j]) + unspaced(words), got[i]
        got[i], want[j] = flag, flag
    assert got == want


def without_added(acts: list[dict]) -> list[dict]:
    return [a for a in acts if a["dest"] not in ADDED]


def actions(parser: argparse.ArgumentParser) -> list[dict]:
    """What argparse knows of each flag (but its help text), by section, as the reference records it."""
    out = []
    for group in parser._action_groups:
        for a in group._group_actions:
            if isinstance(a, argparse._HelpAction):
                continue
            out.append(
                dict(
                    group=group.title,
                    flags=a.option_strings,
                    dest=a.dest,
                    kind=type(a).__name__,
                    type=getattr(a.type, "__name__", None),
                    choices=list(a.choices) if a.choices else None,
                    metavar=a.metavar,
                    required=a.required,
                    default=None if a.default is argparse.SUPPRESS else a.default,
                )
            )
    return out


def test_help_is_the_reference(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    assert_help_is_the_reference(build_parser().format_help(), REFERENCE["train_help"])


def test_flags_and_defaults_are_the_reference():
    assert without_added(actions(build_parser())) == REFERENCE["train_actions"]
    assert vars(build_parser().parse_args([])) == REFERENCE["train_parsed_defaults"]  # only the flags given
    model, train = configs_from_args({})
    assert dataclasses.asdict(model) == REFERENCE["model_defaults"]
    train = dataclasses.asdict(train)
    assert {k: v for k, v in train.items() if k not in ADDED} == REFERENCE["train_defaults"]


def test_the_tokenizer_flag():
    """--tokenizer, added since the reference: word (the example's) by default,
    in the data section, fixed for a run (not resumable) but one of its hparams."""
    (tokenizer,) = [a for a in actions(build_parser()) if a["dest"] == "tokenizer"]
    assert tokenizer == dict(
        group="data",
        flags=["--tokenizer"],
        dest="tokenizer",
        kind="_StoreAction",
        type=None,
        choices=["word", "subword"],
        metavar=None,
        required=False,
        default=None,
    )
    assert configs_from_args({})[1].tokenizer == "word"
    assert parse("--tokenizer", "subword")[1].tokenizer == "subword"
    assert "tokenizer" not in cli.RESUMABLE and "tokenizer" not in summaries.NOT_HPARAMS
    with pytest.raises(SystemExit):
        parse("--tokenizer", "chars")


def test_resumable_and_hparams_are_the_reference():
    # logdir and run_name, which name the run, were accepted beside RESUMABLE.
    assert cli.RESUMABLE == set(REFERENCE["resumable"]) | {"logdir", "run_name"}
    assert sorted(summaries.NOT_HPARAMS) == REFERENCE["not_hparams"]


@pytest.mark.parametrize("argv, message", REFERENCE["train_errors"])
def test_bad_values_give_the_reference_message(argv, message):
    model, train = parse(*argv)
    with pytest.raises(UserError) as raised:
        validate(model, train)
    assert str(raised.value) == message and raised.value.code == 2


def test_choices_are_those_the_runtime_takes(monkeypatch):
    """Every value the parser lets through, the runtime takes: it may find
    the machine or the environment wanting, but never the value unknown."""
    for name in ("TF_CONFIG", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for mode in field_of("cluster").metadata["choices"]:
        try:
            cluster.detect(mode)
        except UserError as e:
            assert "must be one of" not in str(e), mode
    on_cpu = devices.Devices(gpus=False, count=1)
    for precision in field_of("precision").metadata["choices"]:
        try:
            chosen = devices.resolve_precision(precision, on_cpu)
        except UserError as e:  # bfloat16 where its products would abort
            assert "must be auto or one of" not in str(e), precision
            continue
        assert devices.compute_dtype(chosen).name == chosen


def test_parsing_and_flag_checks_do_not_start_tensorflow():
    code = (
        "import sys, contextlib, io\n"
        "from tfgpt.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert main(['--vocab-size', '2']) == 2\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))\n"
    )
    done = run_python(["-c", code], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert done.stderr.strip().splitlines()[-1] == "train.py: error: --vocab-size must be at least 3, got 2"


def parse(*argv):
    return configs_from_args(vars(build_parser().parse_args(list(argv))))


def test_the_defaults_are_the_examples_recipe():
    model, train = parse()
    assert train.lr == 1e-3 and train.lr_schedule == "constant" and train.warmup_steps == 0
    assert train.padding_targets == "count" and train.embedding_update == "per-token"
    assert (train.weight_decay, train.label_smoothing, model.tie_embeddings) == (0.0, 0.0, False)
    assert (train.beta1, train.beta2) == (0.9, 0.999)
    assert parse("--beta2", "0.95")[1].beta2 == 0.95


def test_tied_embeddings_with_dense_embedding_updates_are_fine():
    model, train = parse("--tie-embeddings", "--embedding-update", "dense")
    validate(model, train)
    assert model.tie_embeddings and train.embedding_update == "dense"


def test_a_recipe_fills_what_the_flags_leave_out():
    from tfgpt.cli import RECIPES

    assert parse("--recipe", "example") == parse()  # the example's recipe is the defaults
    _, example = parse()
    _, tuned = parse("--recipe", "tuned")
    assert tuned.recipe == "tuned" and RECIPES["tuned"]
    for key, value in RECIPES["tuned"].items():
        assert getattr(tuned, key) == value != getattr(example, key)
    _, mine = parse("--recipe", "tuned", "--lr", "5e-4")
    assert mine.lr == 5e-4  # an explicit flag wins


def test_resume_refuses_another_recipe(tmp_path, capsys):
    import dataclasses

    from tfgpt.config import save_config

    model, train = parse("--recipe", "tuned")
    run = tmp_path / "logs" / "r"
    run.mkdir(parents=True)
    save_config(run / "config.json", model, dataclasses.replace(train, run_name="r", logdir=str(tmp_path / "logs")))
    assert main(["--logdir", str(tmp_path / "logs"), "--run-name", "r", "--resume", "--recipe", "example"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--recipe example conflicts" in err, err


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--packing", "--gpus", "--xla", "--resume", "--max-steps", "--prompt"):
        assert flag in out
    flat = " ".join(out.split())
    assert re.search(r"--vocab-size VOCAB_SIZE [^-]*\(default: 20000\)", flat)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """{corpus}: 120 lines; {short}: 3 lines; {empty}: a folder without .txt files;
    {missing}: nothing there."""
    root = tmp_path_factory.mktemp("data")
    (root / "empty").mkdir()
    return {
        "corpus": str(write_corpus(root / "reviews.txt", 120)),
        "short": str(write_corpus(root / "short.txt", 3)),
        "empty": str(root / "empty"),
        "missing": str(root / "missing"),
    }


# (flags, words in the message, |-separated); --data is {corpus} unless the flags name another.
BAD_INPUT = [
    (["--data", "{missing}"], "no such file"),
    (["--data", "{empty}"], "no .txt files"),
    (["--data", "{short}", "--batch-size", "64"], "fewer than one global batch"),
    (["--vocab-size", "2"], "--vocab-size"),
    (["--maxlen", "1"], "--maxlen"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--gen-tokens", "0"], "--gen-tokens"),
    (["--dropout", "1.0"], "--dropout"),
    (["--dropout", "1.5"], "--dropout"),
    (["--resume"], "--run-name"),
    (["--cpu-replicas", "2", "--batch-size", "15"], "not divisible"),
    (["--cpu-replicas", "2", "--batch-size", "7", "--max-steps", "1"], "--batch-size 7|2 replicas"),
    (["--profile-steps", "5"], "--profile-steps"),
    (["--profile-steps", "4:2"], "A <= B"),
    (["--profile-steps", "0:2"], "1 <= A"),
    (["--peak-flops", "0"], "--peak-flops"),
    # The messages of tfgpt.cli.validate, whole.
    (["--label-smoothing", "1.0"], "train.py: error: --label-smoothing must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "train.py: error: --weight-decay must be 0 or positive"),
    (["--beta2", "1"], "train.py: error: --beta2 must be between 0 and 1"),
    (["--tie-embeddings"], "train.py: error: --embedding-update per-token needs a token table of its own"),
    (["--steps-per-call", "-1"], "train.py: error: --steps-per-call must be 0 (automatic) or positive"),
    (["--cpu-replicas", "0"], "train.py: error: --cpu-replicas must be at least 1"),
]


@pytest.mark.parametrize("flags, words", BAD_INPUT)
def test_bad_input_is_one_line_and_status_2(data, tmp_path, capsys, flags, words):
    flags = [f.format(**data) for f in flags]
    argv = ([] if "--data" in flags else ["--data", data["corpus"]]) + flags
    assert main(argv + ["--logdir", str(tmp_path / "logs"), "--quiet", "--no-export"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error: "), (flags, err)
    assert all(w in err for w in words.split("|")), (flags, err)
    assert not list((tmp_path / "logs").rglob("config.json"))  # stopped before the run began
