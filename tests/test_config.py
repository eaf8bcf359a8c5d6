"""The configs (tfgpt.config): config.json round trips, keys of other
versions are ignored, the key size defaults to the embedding size,
--profile-steps parses A:B, and a field declared with `option` is a flag of
train.py, checked, resumable and an hparam as its declaration says."""

import dataclasses
import json

import pytest
from helpers import ROOT, run_python

from tfgpt.config import GPTConfig, TrainConfig, load_config, refused, save_config, write_text_atomic


def test_config_json_round_trips(tmp_path):
    model = GPTConfig(vocab_size=77, maxlen=9, embed_dim=12, head_dim=4, tie_embeddings=True)
    train = TrainConfig(batch_size=6, lr=3e-4, clip_norm=0.5, precision="bfloat16", run_name="r", export=False)
    save_config(tmp_path / "config.json", model, train)
    assert load_config(tmp_path / "config.json") == (model, train)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc == {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left


def test_unknown_keys_are_ignored_and_missing_ones_take_defaults(tmp_path):
    doc = {"model": {"embed_dim": 8, "from_a_newer_version": 1}, "train": {"lr": 0.5, "retired_flag": True}}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    model, train = load_config(tmp_path / "config.json")
    assert model == GPTConfig(embed_dim=8) and train == TrainConfig(lr=0.5)


def test_key_dim_defaults_to_the_embedding_size():
    assert GPTConfig(embed_dim=24).key_dim == 24
    assert GPTConfig(embed_dim=24, head_dim=6).key_dim == 6


@pytest.mark.parametrize("text, parsed", [(None, None), ("", None), ("3:4", (3, 4)), ("1:1", (1, 1))])
def test_profile_range(text, parsed):
    assert TrainConfig(profile_steps=text).profile_range() == parsed


@pytest.mark.parametrize(
    "text, words",
    [("5", "takes A:B"), ("a:b", "takes A:B"), ("1:2:3", "takes A:B"), ("4:2", "1 <= A <= B"), ("0:2", "1 <= A <= B")],
)
def test_bad_profile_steps(text, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(profile_steps=text).profile_range()


def test_write_text_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old and longer")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_refused_gives_the_first_refused_value_s_message():
    assert refused({"vocab_size": 3, "maxlen": 2, "dropout": 0.0}) is None
    assert refused({"vocab_size": 3, "maxlen": 1, "dropout": 1.0}) == "--maxlen must be at least 2, got 1"
    assert refused({"dropout": 1.0, "maxlen": 1}) == "--dropout must be in [0, 1), got 1.0"
    assert refused({"prompt": " ", "seed": -5}) == "--prompt must hold at least one word"  # seed has no check


# Two fields added to TrainConfig, each by its declaration alone: a resumable
# hparam with a check, and a note that is neither. The script then asks the
# command line, the resume rules and the hparams about them.
ADDED_FIELDS = """
import dataclasses, json, sys
import tfgpt.config as config

@dataclasses.dataclass
class TrainConfig(config.TrainConfig):
    warmup_share: float = config.option(
        0.0,
        "share of the steps warmed up (default: {default})",
        group="optimisation",
        check=(lambda v: 0 <= v < 1, "--warmup-share must be in [0, 1), got {value}"),
        resumable=True,
    )
    note: str = config.option(
        "", "a note (default: {default!r})", group="run directory, logging, samples", hparam=False
    )

config.TrainConfig = TrainConfig  # before anything reads the declarations

from tfgpt import cli
from tfgpt.train import summaries

logdir = sys.argv[1]
found = dict(help=cli.build_parser().format_help(), resumable=sorted(cli.RESUMABLE))
found["parsed"] = dataclasses.asdict(cli.configs_from_args(vars(cli.build_parser().parse_args(
    ["--warmup-share", "0.5", "--note", "hi"])))[1])
found["bad"] = cli.main(["--warmup-share", "1.5", "--logdir", logdir])
model, train = cli.configs_from_args({"warmup_share": 0.25, "note": "n", "run_name": "r", "logdir": logdir})
(config.Path(logdir) / "r").mkdir(parents=True)
config.save_config(config.Path(logdir) / "r" / "config.json", model, train)
resumed = cli.resolve_run({"logdir": logdir, "run_name": "r", "resume": True, "warmup_share": 0.75})[1]
found["resumed"] = resumed.warmup_share
found["resumed_note"] = cli.main(["--logdir", logdir, "--run-name", "r", "--resume", "--note", "other"])
found["hparams"] = sorted(summaries.run_hparams(model, train))
print(json.dumps(found))
"""


def test_a_field_is_one_declaration(tmp_path):
    done = run_python(["-c", ADDED_FIELDS, str(tmp_path / "logs")], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    errors = [line for line in done.stderr.splitlines() if line.startswith("train.py:")]
    help_text = " ".join(found["help"].split())

    # The flags, each in its section, with its help text and default.
    optimisation = help_text[help_text.index("optimisation:") : help_text.index("devices and speed:")]
    assert "--warmup-share WARMUP_SHARE share of the steps warmed up (default: 0.0)" in optimisation
    assert "--quiet print only the epoch lines --note NOTE a note (default: '') examples:" in help_text
    assert (found["parsed"]["warmup_share"], found["parsed"]["note"]) == (0.5, "hi")
    # The check, as train.py's one-line error.
    assert found["bad"] == 2 and errors[0] == "train.py: error: --warmup-share must be in [0, 1), got 1.5"
    # --resume may change the resumable field, and not the other.
    assert "warmup_share" in found["resumable"] and "note" not in found["resumable"]
    assert found["resumed"] == 0.75
    assert found["resumed_note"] == 2 and errors[1].startswith("train.py: error: --resume: --note other conflicts")
    # The hparams: the one declared so, not the other.
    assert "warmup_share" in found["hparams"] and "note" not in found["hparams"] and "lr" in found["hparams"]
