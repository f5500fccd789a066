"""The training loop: resume position, NaN guard, kill-and-resume, every preset's pipeline."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from tfds_mocks import mock_any

import vdm_tf
from trainers import configs, main, train

TINY = dict(n_layers=1, n_embd=32, batch_size=8, jit_compile=False, learning_rate=1e-3, warmup_steps=1)


def tiny_config(**overrides):
    return configs.Config(**{**TINY, "checkpoint_every": 2, "log_every": 2, "sample_every": 4, **overrides})


def test_resume_continues_from_the_saved_data_position(tmp_path):
    config = tiny_config(train_steps=4)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    trainer.train()
    next_batch = next(trainer.data).numpy()
    resumed = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    assert resumed.restore() == 4
    np.testing.assert_array_equal(next(resumed.data).numpy(), next_batch)
    for a, b in zip(resumed.model.trainable_variables, trainer.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A fresh pipeline would start elsewhere: the test can tell the difference.
    fresh = train.Trainer(config, str(tmp_path / "fresh"), tf.distribute.get_strategy(), verbose=False)
    assert not np.array_equal(next(fresh.data).numpy(), next_batch)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = vdm_tf.VDM._loss_terms

    def poisoned(self, x, seed, training, *args):
        terms, gammas = original(self, x, seed, training, *args)
        broken = tf.logical_and(training, self.optimizer.iterations >= 5)  # the sixth step
        return {k: tf.where(broken, float("nan"), v) for k, v in terms.items()}, gammas

    monkeypatch.setattr(vdm_tf.VDM, "_loss_terms", poisoned)
    config = tiny_config(train_steps=10, checkpoint_every=4)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    with pytest.raises(train.NonFiniteLossError, match="Training stopped at step 6: the loss is not finite"):
        trainer.train()
    checkpoints = tmp_path / "checkpoints"
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-4")
    assert not list(checkpoints.glob("ckpt-6*")) and not list(checkpoints.glob("ckpt-8*"))
    # The good checkpoint restores to finite weights.
    model = train.restore_for_inference(str(tmp_path), trainer.config)
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def test_killed_run_resumes_with_step_and_metrics_continuing(tmp_path):
    model_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "trainers.main", f"--model_dir={model_dir}", "--train_steps=120",
        "--config.n_layers=1", "--config.n_embd=32", "--batch_size=8", "--config.checkpoint_every=10",
        "--config.log_every=10", "--config.sample_every=1000", "--config.eval_time_samples=1",
        "--config.sample_steps=2", "--config.num_samples=2",
    ]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (model_dir / "checkpoints" / "checkpoint").exists():
        assert first.poll() is None and time.time() < deadline, "no checkpoint before the first run ended"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = int(re.search(r"ckpt-(\d+)", (model_dir / "checkpoints" / "checkpoint").read_text()).group(1))
    assert killed_at < 120
    # The rerun names no flag but the run directory: it resumes with the saved config.
    second = subprocess.run(command[:4], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed_at = int(re.search(r"resumed from step (\d+)", second.stdout).group(1))
    assert resumed_at >= killed_at
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    after = [line for line in lines if line["step"] > resumed_at]
    before = [line for line in lines if line["step"] <= resumed_at]
    assert [line["step"] for line in after[-3:]] == [100, 110, 120]
    assert after[0]["step"] == resumed_at + 10
    assert after[0]["bpd"] < before[0]["bpd"]  # training went on from where it was, not from scratch
    assert "test bpd:" in second.stdout


@pytest.mark.parametrize("preset", ["mnist", "cifar10", "imagenet32", "imagenet64"])
def test_every_preset_trains_samples_and_evaluates_on_mocked_data(preset, tmp_path, capsys):
    argv = [
        "main", f"--config={preset}", f"--model_dir={tmp_path}", "--train_steps=2", "--batch_size=4",
        "--config.n_layers=1", "--config.n_embd=32", "--config.jit_compile=false", "--config.checkpoint_every=2",
        "--config.log_every=1", "--config.sample_every=2", "--config.eval_time_samples=1",
        "--config.sample_steps=2", "--config.num_samples=2",
    ]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        with mock_any(configs.PRESETS[preset].dataset):
            main.main(["main"])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert re.search(r"test bpd: \d+\.\d+ \+- \d+\.\d+ \(10 images, 1 time samples each\)", out), out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dataset"] == configs.PRESETS[preset].dataset and saved["batch_size"] == 4
    assert os.path.exists(tmp_path / "samples" / "step_00000002.png")
    assert len((tmp_path / "tensorboard").iterdir().__next__().name) > 0
