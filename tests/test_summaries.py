"""tfgpt/train/summaries.py: TensorBoard events read back from the files with
tf.compat.v1.train.summary_iterator, equal to what was written. The Reporter
that writes them at the steps it should is tests/test_report.py."""

import numpy as np
import tensorflow as tf
from helpers import read_events

from tfgpt.config import GPTConfig, TrainConfig
from tfgpt.train.summaries import Summaries, run_hparams, sample_markdown, write_hparams


def test_scalars_and_text_read_back(tmp_path):
    summaries = Summaries(tmp_path)
    summaries.train_scalars(3, {"loss": 2.5, "learning_rate": 1e-3})
    summaries.train_scalars(6, {"loss": 2.25, "learning_rate": 5e-4})
    summaries.validation_scalars(6, {"loss": 2.75, "perplexity": 15.625})
    summaries.samples(6, "**this movie** is good")
    # Flushed at each write: readable before close.
    assert [s for s, _ in read_events(tmp_path / "train")["loss"]] == [3, 6]
    summaries.close()

    train, val = read_events(tmp_path / "train"), read_events(tmp_path / "validation")
    assert [(s, float(v)) for s, v in train["loss"]] == [(3, 2.5), (6, 2.25)]
    assert [(s, float(v)) for s, v in train["learning_rate"]] == [(3, np.float32(1e-3)), (6, np.float32(5e-4))]
    assert [(s, float(v)) for s, v in val["loss"]] == [(6, 2.75)]
    assert [(s, float(v)) for s, v in val["perplexity"]] == [(6, 15.625)]
    [(step, text)] = train["samples"]
    assert step == 6 and text.item().decode() == "**this movie** is good"
    assert set(val) == {"loss", "perplexity"}


def test_hparams_read_back(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    model_cfg, cfg = GPTConfig(vocab_size=50, head_dim=None), TrainConfig(run_name="r", logdir="x", lr=0.01)
    hparams = run_hparams(model_cfg, cfg, num_params=np.int64(1234))
    assert hparams["head_dim"] == model_cfg.embed_dim and hparams["num_params"] == 1234
    assert hparams["lr"] == 0.01 and hparams["vocab_size"] == 50
    assert "run_name" not in hparams and "logdir" not in hparams
    assert "max_steps" not in hparams  # None fields are left out
    run_dir = tmp_path / "r"
    write_hparams(run_dir, hparams)
    infos = []
    for path in run_dir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        infos.append(data.session_start_info)
    [info] = infos
    assert info.group_name == "r"
    got = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    assert got["lr"] == 0.01 and got["vocab_size"] == 50 and got["num_params"] == 1234
    assert got["data"] == "imdb" and got["tie_embeddings"] is False


def test_sample_markdown():
    md = sample_markdown("this movie is", ["this movie is *great* (really)", "this movie"], "8 tokens, step 3")
    assert md == "**this movie is** \\*great\\* \\(really\\)\n\n**this movie**\n\n*8 tokens, step 3*"
