"""The configs (tfgpt.config): config.json round trips, keys of other
versions are ignored, the key size defaults to the embedding size, and
--profile-steps parses A:B."""

import dataclasses
import json

import pytest

from tfgpt.config import GPTConfig, TrainConfig, load_config, save_config, write_text_atomic


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
