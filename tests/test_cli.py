"""The command line's configs: the training options and their
one-line errors (no TensorFlow needed for any of it)."""

import pytest

from tfgpt.cli import UsageError, build_parser, configs_from_args, validate


def parse(*argv):
    return configs_from_args(vars(build_parser().parse_args(list(argv))))


def test_the_defaults_are_the_examples_recipe():
    model, train = parse()
    assert train.lr == 1e-3 and train.lr_schedule == "constant" and train.warmup_steps == 0
    assert train.padding_targets == "count" and train.embedding_update == "per-token"
    assert (train.weight_decay, train.label_smoothing, model.tie_embeddings) == (0.0, 0.0, False)


@pytest.mark.parametrize("argv, message", [
    (["--label-smoothing", "1.0"], "--label-smoothing must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be 0 or positive"),
    (["--tie-embeddings"], "--embedding-update per-token needs a token table of its own"),
    (["--steps-per-call", "-1"], "--steps-per-call must be 0 (automatic) or positive"),
    (["--cpu-replicas", "0"], "--cpu-replicas must be at least 1"),
])
def test_bad_values_are_one_line_usage_errors(argv, message):
    with pytest.raises(UsageError, match=r"^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(*parse(*argv))


def test_tied_embeddings_with_dense_embedding_updates_are_fine():
    model, train = parse("--tie-embeddings", "--embedding-update", "dense")
    validate(model, train)
    assert model.tie_embeddings and train.embedding_update == "dense"
