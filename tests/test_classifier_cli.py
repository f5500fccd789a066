"""`python -m trainers.classifier`: bad flags fail in one line before any work; a tiny run end to end.

The errors that `tests/test_cli_errors.py` covers (no classifier.keras, --label=-1) are not repeated
here. The error cases run the module in forked children of one process (`FORKED_RUNS`), the
end-to-end run in fresh processes, as a user runs it.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent import futures

import keras
import numpy as np
import pytest
from PIL import Image

import vdm_tf
from trainers import classifier, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `python -m trainers.classifier ARGUMENTS` for each list of arguments in the JSON of argv[1], each
# in a child forked from one process that has imported TensorFlow once (a start-up per case would cost
# seconds of CPU each), with the work an input check must come before made to fail loudly: loading
# the training data, the classifier or the diffusion run. A child ends as the interpreter would
# (SystemExit's message on stderr, exit status 1; a traceback for any other exception). Prints
# [exit status, stdout, stderr] per case as JSON.
FORKED_RUNS = textwrap.dedent(
    """
    import json, os, runpy, sys, tempfile, traceback
    import vdm_tf
    import keras

    def refuse(*args, **kwargs):
        raise SystemExit("error: work started before the inputs were checked")

    results = []
    for arguments in json.loads(sys.argv[1]):
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            vdm_tf.datasets.load = keras.saving.load_model = vdm_tf.runs.restore_for_inference = refuse
            sys.argv = ["trainers.classifier", *arguments]
            status = 0
            try:
                runpy.run_module("trainers.classifier", run_name="__main__", alter_sys=True)
            except SystemExit as exit:
                status = 1 if isinstance(exit.code, str) else exit.code or 0
                if isinstance(exit.code, str):
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        results.append([os.waitstatus_to_exitcode(wait_status), out.read().decode(), err.read().decode()])
    print(json.dumps(results))
    """
)

SAMPLE = ["--mode=sample", "--model_dir={w}/classifier", "--diffusion_dir={w}/run", "--label=3"]
# name: (arguments, a regular expression the output must match). {w} is the workspace; {new} a
# directory of the case's own that must not exist afterwards (a failed start creates nothing).
CASES = {
    "positional argument": (["--model_dir={new}", "extra"], r"unexpected arguments extra; flags take the form"),
    "model_dir is a file": (["--model_dir={w}/a_file"], r"--model_dir=.*a_file is a file; expected the classifier's"),
    "unknown preset": (["--config=foo", "--model_dir={new}"], r"--config=foo: value should be one of <digits|mnist"),
    "zero train steps": (["--train_steps=0", "--model_dir={new}"], r"train_steps must be >= 1; got 0\."),
    "gamma range upside down": (
        ["--gamma_min=3", "--gamma_max=1", "--model_dir={new}"],
        r"gamma_min must be below gamma_max; got 3.0 and 1.0\.",
    ),
    "sample without a label": (SAMPLE[:3], r"--mode=sample needs --diffusion_dir .* and --label"),
    "sample zero images": ([*SAMPLE, "--num_samples=0"], r"--num_samples must be >= 1; got 0\."),
    "sample zero steps": ([*SAMPLE, "--num_steps=0"], r"--num_steps must be >= 1; got 0\."),
    "sample a label beyond the classes": ([*SAMPLE[:3], "--label=10"], r"a class of the classifier, 0..9; got 10\."),
    "diffusion_dir of no run": (
        [*SAMPLE[:2], "--diffusion_dir={w}/a_file", "--label=3"],
        r"--diffusion_dir=.*a_file holds no diffusion run \(no config.json\)",
    ),
    "diffusion run without checkpoint": (
        [*SAMPLE[:2], "--diffusion_dir={w}/untrained", "--label=3"],
        r"--diffusion_dir=.*untrained holds no checkpoint; train it first",
    ),
}


def run_classifier(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "trainers.classifier", *arguments], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny diffusion run (config and weights, untrained), a run without checkpoint, a classifier
    run's files (never loaded by the error cases) and a plain file."""
    w = tmp_path_factory.mktemp("classifier_cli")
    config = configs.PRESETS["digits"].replace(n_layers=1, n_embd=16)
    vdm_tf.runs.save_run(str(w / "run"), config, vdm_tf.runs.compiled_model(config))
    configs.save_config(str(w / "untrained"), config)
    (w / "classifier").mkdir()
    (w / "classifier" / "config.json").write_text('{"dataset": "digits"}')
    (w / "classifier" / "classifier.keras").write_bytes(b"")
    (w / "a_file").write_text("not a directory")
    return w


def new_directory(workspace, case):
    return workspace / ("new_" + "".join(c if c.isalnum() else "_" for c in case))


@pytest.fixture(scope="module")
def results(workspace):
    """Every case's (exit status, stdout, stderr)."""
    cases = [[a.format(w=workspace, new=new_directory(workspace, case)) for a in CASES[case][0]] for case in CASES]
    completed = subprocess.run(
        [sys.executable, "-c", FORKED_RUNS, json.dumps(cases)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return dict(zip(CASES, json.loads(completed.stdout.splitlines()[-1])))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_flags_are_one_line_errors_before_any_work(case, results, workspace):
    """Non-zero exit, one or two lines, no traceback, the
    message, and neither the data, a classifier nor the diffusion run loaded."""
    status, stdout, stderr = results[case]
    output = stdout + stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert status != 0, output
    assert "Traceback" not in output and 1 <= len(lines) <= 2, output
    assert re.search(CASES[case][1], output), output
    assert not new_directory(workspace, case).exists(), "a failed start left a run directory behind"


ACCURACY = re.compile(r"test accuracy by gamma: ((?:[+-]\d+: \d\.\d{3}(?:, )?){6})$")


def test_train_two_steps_then_sample_guided_images(workspace, tmp_path):
    """Train 2 steps on batches of 2, then sample 2 images of class 3 with 2 ancestral steps.

    The run directory holds the configuration of the flags, a classifier that made exactly 2
    optimizer steps, its metrics, and the printed accuracies are the saved classifier's;
    `guided_3.png` is the grid of the images this process samples with the same settings (the
    sampling process runs while this one checks the training run and samples)."""
    model_dir = str(tmp_path / "classifier")
    trained = run_classifier(f"--model_dir={model_dir}", "--train_steps=2", "--batch_size=2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    flags = ["--label=3", "--num_samples=2", "--num_steps=2", "--sampler=ancestral", "--guidance_scale=30", "--seed=4"]
    pool = futures.ThreadPoolExecutor(1)
    sampling = pool.submit(
        run_classifier, "--mode=sample", f"--model_dir={model_dir}", f"--diffusion_dir={workspace}/run", *flags
    )
    pool.shutdown(wait=False)
    assert "Traceback" not in trained.stderr and "UserWarning" not in trained.stderr, trained.stderr[-3000:]
    config = dataclasses.replace(classifier.PRESETS["digits"], train_steps=2, batch_size=2)
    assert json.loads((tmp_path / "classifier" / "config.json").read_text()) == dataclasses.asdict(config)
    noisy = keras.saving.load_model(os.path.join(model_dir, "classifier.keras"))
    assert isinstance(noisy, vdm_tf.conditional.NoisyClassifier) and int(noisy.optimizer.iterations) == 2
    rows = (tmp_path / "classifier" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,accuracy,loss") and len(rows) == 2 and rows[1].startswith("0,"), rows
    assert np.isfinite(float(rows[1].split(",")[2]))
    printed = ACCURACY.search(trained.stdout.strip().splitlines()[-1])
    assert printed, trained.stdout
    accuracy = classifier.accuracy_by_noise_level(noisy, config)
    expected = ", ".join(f"{gamma:+.0f}: {value:.3f}" for gamma, value in accuracy.items())
    assert printed.group(1) == expected

    samples = classifier.guided_samples(model_dir, str(workspace / "run"), 3, 30.0, 2, "ancestral", 2, seed=4)
    vdm_tf.images.save_grid(samples, str(tmp_path / "expected.png"))
    other = classifier.guided_samples(model_dir, str(workspace / "run"), 5, 30.0, 2, "ancestral", 2, seed=4)
    assert not np.array_equal(other, samples), "the label must change the samples for this check to mean something"
    sampled = sampling.result()
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    path = os.path.join(model_dir, "guided_3.png")
    assert f"wrote {path} (2 samples of class 3, guidance scale 30.0)" in sampled.stdout, sampled.stdout
    with Image.open(path) as written, Image.open(tmp_path / "expected.png") as expected_grid:
        assert written.size == expected_grid.size and written.mode == "L"
        np.testing.assert_array_equal(np.asarray(written), np.asarray(expected_grid))


def test_the_sampler_flag_names_the_library_samplers():
    """The flag's choices are written out (the library's list imports TensorFlow): they must stay equal."""
    assert classifier.SAMPLERS == vdm_tf.samplers.SAMPLERS
