"""The command line: `python -m trainers.main` trains, samples and evaluates; flags override the preset."""

import json
import math
import os
import re
import subprocess
import sys
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import vdm_tf
from trainers import configs, main, train

SUMMARY = re.compile(r"test bpd: (\d+\.\d+) \+- (\d+\.\d+) \((\d+) images, (\d+) time samples each\)")
QUICK = [
    "--train_steps=4",
    "--config.checkpoint_every=2",
    "--config.n_layers=1",
    "--config.n_embd=32",
    "--config.eval_time_samples=2",
    "--config.sample_steps=3",
    "--config.num_samples=4",
]


# Python INFO lines of TensorFlow that saving a checkpoint or a SavedModel logs (hidden by the CLI).
INFO_NOISE = re.compile(r"Sharding callback duration|with unsupported characters|Assets written to|Writing fingerprint")


def run_cli(*args):
    completed = subprocess.run(
        [sys.executable, "-m", "trainers.main", *args], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not INFO_NOISE.search(completed.stdout + completed.stderr), completed.stderr[-3000:]
    return completed.stdout


def test_train_then_eval_sample_and_export_from_the_run_directory(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    out = run_cli(f"--model_dir={model_dir}", "--export", *QUICK)
    assert SUMMARY.fullmatch(out.strip().splitlines()[-1]), "the summary line comes last"
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    assert "(4 samples, 3 steps)" in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train_steps"] == 4 and saved["n_embd"] == 32 and saved["dataset"] == "digits"
    # The export of training, with saved_model_cli's description.
    assert "signature_def['likelihood']:" in out and "outputs['bpd'] tensor_info:" in out
    assert (tmp_path / "run" / "export" / "vdm" / "1" / "saved_model.pb").exists()
    # Then, in parallel: eval and sample with overrides of how (not what) they compute, and
    # another export.
    commands = [
        ["--mode=eval", "--config.eval_time_samples=1"],
        ["--mode=sample", "--config.num_samples=3", "--config.sample_steps=2", "--config.seed=5"],
        ["--mode=export", "--export_name=digits"],
    ]
    with futures.ThreadPoolExecutor(len(commands)) as pool:
        evaluated, sampled, exported = pool.map(lambda c: run_cli(f"--model_dir={model_dir}", *c), commands)
    assert SUMMARY.search(evaluated).group(3, 4) == ("297", "1")
    assert "(3 samples, 2 steps)" in sampled
    samples = np.load(tmp_path / "run" / "samples.npz")["images"]
    assert samples.shape == (3, 8, 8, 1)
    model = vdm_tf.load(model_dir)
    np.testing.assert_array_equal(samples, model.sample(3, num_steps=2, seed=5).numpy())
    assert f"exported {model_dir}/export/digits/1" in exported and "signature_def['sample']:" in exported

    # The summary line of training, recomputed here from its definition: the mean over the 297
    # test images of each image's bound (K = 2 time samples, batches of 256 // K, seed
    # fold_in(0, b) for batch b), and the standard error of that mean.
    test = vdm_tf.datasets.digits_arrays("test")
    per_image = np.concatenate([
        model.elbo(test[i : i + 128], seed=vdm_tf.seeding.fold_in(0, b), num_time_samples=2)["bpd"].numpy()
        for b, i in enumerate(range(0, len(test), 128))
    ]).astype(np.float64)
    bpd, stderr = per_image.mean(), per_image.std(ddof=1) / math.sqrt(per_image.size)
    assert SUMMARY.search(out).group(0) == f"test bpd: {bpd:.3f} +- {stderr:.3f} (297 images, 2 time samples each)"
    # Evaluation of the saved run is deterministic: the same line again, in this process.
    main.evaluate(configs.saved_config(model_dir), model)
    assert SUMMARY.search(capsys.readouterr().out).group(0) == SUMMARY.search(out).group(0)


def test_config_flags_override_the_preset():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", "--config=digits", "--config.fourier_exponents=5,6", "--config.dropout=0.3", "--batch_size=8"])
    try:
        config = main.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert config.fourier_exponents == (5, 6) and config.dropout == 0.3 and config.batch_size == 8
    assert config.n_layers == configs.PRESETS["digits"].n_layers


@pytest.mark.parametrize(
    "argv, applied",
    [
        (["--config.num_samples=3", "--config.sample_steps=2", "--config.eval_time_samples=1"], True),
        (["--config.n_layers=3"], False),
        (["--batch_size=16"], False),
        (["--config=cifar10"], False),
    ],
)
def test_eval_and_sample_apply_inference_overrides_and_refuse_the_others(tmp_path, argv, applied):
    configs.save_config(str(tmp_path), configs.PRESETS["digits"])
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", "--mode=eval", f"--model_dir={tmp_path}", *argv])
    try:
        if applied:
            config = main.inference_config(configs.PRESETS["digits"], "eval")
            assert (config.num_samples, config.sample_steps, config.eval_time_samples) == (3, 2, 1)
        else:
            with pytest.raises(SystemExit, match=r"--mode=eval uses the trained run as it was saved: --"):
                main.inference_config(configs.PRESETS["digits"], "eval")
    finally:
        flags.FLAGS.unparse_flags()


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="expected fixed_linear, learned_linear or learned_monotonic"):
        configs.build_schedule(configs.Config(schedule="cosine"))


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_start_removes_only_a_run_directory_it_created(tmp_path, monkeypatch, existed):
    model_dir = tmp_path / "run"
    if existed:  # a run being resumed: never removed
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")

    def failing_start(self, config, model_dir, *args, **kwargs):
        os.makedirs(os.path.join(model_dir, "tensorboard"), exist_ok=True)  # what a trainer writes first
        raise RuntimeError("the start failed")

    monkeypatch.setattr(train.Trainer, "__init__", failing_start)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main"])
    try:
        with pytest.raises(RuntimeError, match="the start failed"):
            main.run_training(str(model_dir), tf.distribute.get_strategy(), configs.PRESETS["digits"])
    finally:
        flags.FLAGS.unparse_flags()
    assert model_dir.exists() == existed
