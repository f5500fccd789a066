"""The command line: `python -m trainers.main` trains, samples and evaluates; flags override the preset."""

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import vdm_tf
from trainers import configs, main, train
from vdm_tf import _startup, cli

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
    assert saved["format_version"] == 2 and saved["data"]["dataset"] == "digits"
    assert saved["trainer"]["train_steps"] == 4 and saved["network"]["n_embd"] == 32
    # The export of training, with saved_model_cli's description.
    assert "signature_def['likelihood']:" in out and "outputs['bpd'] tensor_info:" in out
    assert (tmp_path / "run" / "export" / "vdm" / "1" / "saved_model.pb").exists()
    # Then, in parallel: eval and sample with overrides of how (not what) they compute, and
    # another export; meanwhile this process computes what they and the training must print.
    commands = [
        ["--mode=eval", "--config.eval_time_samples=1"],
        ["--mode=sample", "--config.num_samples=3", "--config.sample_steps=2", "--config.seed=5"],
        ["--mode=export", "--export_name=digits"],
    ]
    with futures.ThreadPoolExecutor(len(commands)) as pool:
        runs = [pool.submit(run_cli, f"--model_dir={model_dir}", *c) for c in commands]
        model = vdm_tf.load(model_dir)
        expected_samples = model.sample(3, num_steps=2, seed=5).numpy()
        # The summary line of training, recomputed here from its definition: the mean over the 297
        # test images of each image's bound (K = 2 time samples, batches of 256 // K, seed
        # fold_in(0, b) for batch b), and the standard error of that mean.
        test = vdm_tf.datasets.digits_arrays("test")
        per_image = np.concatenate(
            [
                model.elbo(test[i : i + 128], seed=vdm_tf.seeding.fold_in(0, b), num_time_samples=2)["bpd"].numpy()
                for b, i in enumerate(range(0, len(test), 128))
            ]
        ).astype(np.float64)
        bpd, stderr = per_image.mean(), per_image.std(ddof=1) / math.sqrt(per_image.size)
        assert SUMMARY.search(out).group(0) == f"test bpd: {bpd:.3f} +- {stderr:.3f} (297 images, 2 time samples each)"
        # Evaluation of the saved run is deterministic: the same line again, in this process.
        main.evaluate(configs.saved_config(model_dir), model)
        assert SUMMARY.search(capsys.readouterr().out).group(0) == SUMMARY.search(out).group(0)
        evaluated, sampled, exported = [run.result() for run in runs]
    assert SUMMARY.search(evaluated).group(3, 4) == ("297", "1")
    assert "(3 samples, 2 steps)" in sampled
    samples = np.load(tmp_path / "run" / "samples.npz")["images"]
    assert samples.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(samples, expected_samples)
    assert f"exported {model_dir}/export/digits/1" in exported and "signature_def['sample']:" in exported


def test_config_flags_override_the_preset():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", "--config=digits", "--config.fourier_exponents=5,6", "--config.dropout=0.3", "--batch_size=8"])
    try:
        config = main.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert config.network.fourier_exponents == (5, 6) and config.network.dropout == 0.3
    assert config.data.batch_size == 8 and config.network.n_layers == configs.PRESETS["digits"].network.n_layers


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
            trainer = config.trainer
            assert (trainer.num_samples, trainer.sample_steps, trainer.eval_time_samples) == (3, 2, 1)
        else:
            with pytest.raises(cli.Failure, match=r"--mode=eval uses the trained run as it was saved: --"):
                main.inference_config(configs.PRESETS["digits"], "eval")
    finally:
        flags.FLAGS.unparse_flags()


def test_export_importance_samples_reach_the_exported_exact_likelihood(monkeypatch):
    """--export_importance_samples=K is the `importance_samples` of the export (a MuLAN's exact
    likelihood with K dequantizations per image; tests/test_mulan.py checks that signature)."""
    import export

    received = {}
    monkeypatch.setattr(export, "export_model", lambda *args, **kwargs: received.update(kwargs) or "PATH")
    monkeypatch.setattr(export, "signature_summary", lambda path: "")
    mulan = configs.PRESETS["digits_mulan"]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", "--config=digits_mulan", "--export", "--export_score_sde", "--export_importance_samples=3"])
    try:
        main.check_importance_samples(mulan, exporting=True)  # accepted for a MuLAN
        main.export_model(mulan, model=None, export_dir="unused")
    finally:
        flags.FLAGS.unparse_flags()
    assert received["importance_samples"] == 3 and received["score_sde"] is True


def test_unknown_schedule_is_a_clear_error():
    expected = "expected fixed_linear, learned_linear, learned_monotonic, idode_vp or idode_sp"
    with pytest.raises(ValueError, match=expected):
        configs.build_schedule(configs.Config().replace(schedule="cosine"))


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


# TensorFlow's start-up banners (vdm_tf/_startup.py), which no command line may print.
BANNERS = _startup._BANNERS
# A C++ notice TensorFlow logs at ERROR level when the first int32 op runs on a CPU without
# AVX-512 (after start-up, so not among the banners `vdm_tf.cli.start` filters).
ONEDNN_INT32_NOTICE = re.compile(r"^E\d{4} .*oneDNN supports DT_INT32 only on platforms with AVX-512")


def test_ctrl_c_ends_training_in_one_line_and_the_same_command_resumes(tmp_path):
    """SIGINT during training: exit 130, the one line `interrupted`, no banner, nothing half-written;
    stdout (a pipe) has plain progress lines, no cursor movements. The same command again resumes
    from the last checkpoint and finishes."""
    model_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "trainers.main", f"--model_dir={model_dir}", "--train_steps=60", "--batch_size=8",
        "--config.n_layers=1", "--config.n_embd=16", "--config.checkpoint_every=4", "--config.log_every=2",
        "--config.eval_time_samples=1", "--config.sample_steps=2", "--config.num_samples=2",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = model_dir / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 300
    while not (state.exists() and "ckpt-8" in state.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip() and not ONEDNN_INT32_NOTICE.match(line)]
    assert process.returncode == 130, stderr[-3000:]
    assert lines == ["python -m trainers.main: interrupted"], stderr[-3000:]
    assert "\x1b[" not in stdout and "\b" not in stdout and "\r" not in stdout
    assert re.search(r"^step 2/60: bpd \d+\.\d{4}, diffusion .* images/s\)$", stdout, re.MULTILINE), stdout
    left = [path.name for path in model_dir.rglob("*") if "partial" in path.name or "_temp" in path.name]
    checkpoint = int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', state.read_text(), re.MULTILINE).group(1))

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {checkpoint} " in again.stdout and "test bpd:" in again.stdout
    for line in (again.stderr + stderr).splitlines():
        assert not any(banner.search(line) for banner in BANNERS), line
    assert not [path for path in model_dir.rglob("*") if "partial" in path.name or "_temp" in path.name], left
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 61, 2))


def test_samples_npz_is_written_whole(tmp_path, monkeypatch):
    """A failed write of samples.npz leaves the one that was there, and no temporary beside it."""

    class Model:
        def sample(self, num_samples, num_steps, seed):
            return tf.zeros([num_samples, 8, 8, 1], tf.uint8)

    config = configs.PRESETS["digits"].replace(num_samples=2, sample_steps=1)
    main.sample(config, Model(), str(tmp_path))
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert sorted(before) == ["samples.npz", "samples.png"]

    def full_disk(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"PK half an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(OSError, match=r"samples.npz failed: No space left on device; the file that was there"):
        main.sample(config, Model(), str(tmp_path))
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_checking_a_bad_flag_or_preset_imports_no_tensorflow():
    """The checks run before TensorFlow starts (a fresh process: this one has imported it)."""
    program = textwrap.dedent(
        """
        import sys
        from absl import flags
        from trainers import main
        from vdm_tf import cli
        for argv in (["main", "--config=nonexistent"], ["main", "--config.gamma_min=10", "--config.gamma_max=-10"]):
            flags.FLAGS.unparse_flags()
            flags.FLAGS(argv)
            try:
                main.check_input(["main"])
            except cli.Failure as failure:
                print(failure)
        print("tensorflow" in sys.modules)
        """
    )
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert completed.stdout.splitlines() == [
        f"unknown --config=nonexistent; presets: {', '.join(configs.PRESETS)}.",
        "schedule.gamma_min must be below gamma_max; got 10.0 and -10.0.",
        "False",
    ], completed.stderr[-3000:]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_checkpoints_before_it(small_disk):
    """A run on a 4 MB file system: checkpoint 2 (model 0.8 MB, data position 2.3 MB) fits, 4 does not."""
    model_dir = os.path.join(small_disk(4000), "run")
    command = [
        sys.executable, "-m", "trainers.main", f"--model_dir={model_dir}", "--train_steps=8", "--batch_size=8",
        "--config.n_layers=1", "--config.n_embd=16", "--config.checkpoint_every=2", "--config.log_every=2",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    lines = [line for line in completed.stderr.splitlines() if not ONEDNN_INT32_NOTICE.match(line)]
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert lines == [
        "python -m trainers.main: error: writing checkpoint 4 failed: No space left on device; "
        "checkpoints up to step 2 are intact, rerun to resume"
    ], completed.stderr[-3000:]
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")).endswith("ckpt-2")
    left = [name for _, directories, names in os.walk(model_dir) for name in directories + names]
    assert not [name for name in left if "_temp" in name or "partial" in name], left
