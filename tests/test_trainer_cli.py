"""The command line: `python -m trainers.main` trains, samples and evaluates; flags override the preset."""

import json
import re
import subprocess
import sys

import pytest
from absl import flags

from trainers import configs, main

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


def run_cli(*args):
    completed = subprocess.run(
        [sys.executable, "-m", "trainers.main", *args], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_train_then_eval_sample_and_export_from_the_run_directory(tmp_path):
    model_dir = str(tmp_path / "run")
    out = run_cli(f"--model_dir={model_dir}", "--export", *QUICK)
    assert SUMMARY.fullmatch(out.strip().splitlines()[-1]), "the summary line comes last"
    bpd, stderr, num_images, num_time_samples = SUMMARY.search(out).groups()
    assert (int(num_images), int(num_time_samples)) == (297, 2)
    assert 0 < float(stderr) < float(bpd)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train_steps"] == 4 and saved["n_embd"] == 32 and saved["dataset"] == "digits"
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    # Evaluation of the saved run is deterministic: the same line again.
    assert SUMMARY.search(run_cli(f"--model_dir={model_dir}", "--mode=eval")).group(0) == SUMMARY.search(out).group(0)
    assert "wrote" in run_cli(f"--model_dir={model_dir}", "--mode=sample")
    # The export of training, then another version; each with saved_model_cli's description.
    assert "signature_def['likelihood']:" in out and "outputs['bpd'] tensor_info:" in out
    assert (tmp_path / "run" / "export" / "vdm" / "1" / "saved_model.pb").exists()
    exported = run_cli(f"--model_dir={model_dir}", "--mode=export", "--export_name=digits")
    assert f"exported {model_dir}/export/digits/1" in exported and "signature_def['sample']:" in exported


def test_config_flags_override_the_preset():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", "--config=digits", "--config.fourier_exponents=5,6", "--config.dropout=0.3", "--batch_size=8"])
    try:
        config = main.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert config.fourier_exponents == (5, 6) and config.dropout == 0.3 and config.batch_size == 8
    assert config.n_layers == configs.PRESETS["digits"].n_layers


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="expected fixed_linear, learned_linear or learned_monotonic"):
        configs.build_schedule(configs.Config(schedule="cosine"))
