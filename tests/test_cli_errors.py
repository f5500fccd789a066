"""Bad input on every command line: a short message naming what was expected, no traceback.

Each case runs the real command (a subprocess), all of them in parallel; each must exit with a
non-zero code, print at most three lines, no Python traceback, and the message it is about.
A failed start of the trainer must not leave a run directory behind.
"""

import os
import re
import subprocess
import sys
import textwrap
from concurrent import futures

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainers import configs

MAIN, CLASSIFIER, CLIENT = "trainers.main", "trainers.classifier", "export.client"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module run with every socket connection refused: a machine without network.
NO_NETWORK = textwrap.dedent(
    """
    import runpy, socket, sys
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (no network in this test)")
    socket.socket.connect = refuse
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)
CLIENT_FLAGS = ["--server=localhost:1", "--retries=0", "--timeout=1"]

# name: (module, arguments, a regular expression the output must contain). In the arguments,
# {w} is the workspace; {new} is a directory of the case's own that must not exist afterwards.
CASES = {
    "negative batch size": (MAIN, ["--batch_size=-4", "--model_dir={new}"], r"batch_size must be >= 1; got -4"),
    "zero batch size": (MAIN, ["--batch_size=0", "--model_dir={new}"], r"batch_size must be >= 1; got 0"),
    "model_dir is a file": (MAIN, ["--model_dir={w}/a_file"], r"--model_dir=.*a_file is a file; expected a run dir"),
    "unknown data set": (MAIN, ["--dataset=foo", "--model_dir={new}"], r"Unknown data set 'foo'; known data sets"),
    "unknown preset": (MAIN, ["--config=nonexistent", "--model_dir={new}"], r"unknown --config=nonexistent; presets"),
    "data set not prepared, no network": (
        MAIN,
        ["--dataset=mnist", "--data_dir={w}/empty_tfds", "--model_dir={new}"],
        r"mnist data set is not prepared in .*empty_tfds(.|\n)*tfds build mnist --data_dir=DIR",
    ),
    "unknown mixed precision": (
        MAIN,
        ["--config.mixed_precision=float16", "--model_dir={new}"],
        r"Unknown mixed_precision 'float16'; expected float32 or bfloat16",
    ),
    "fields that exclude each other": (
        MAIN,
        ["--config=digits_multiscale", "--config.timesteps=10", "--model_dir={new}"],
        r"Multi-scale diffusion is a continuous-time VDM: set timesteps=0",
    ),
    "eval of no run": (MAIN, ["--mode=eval", "--model_dir={new}"], r"holds no run \(no config.json\)"),
    "eval with an architecture override": (
        MAIN,
        ["--mode=eval", "--model_dir={w}/run", "--config.n_layers=3"],
        r"--mode=eval uses the trained run as it was saved: --config.n_layers cannot change it",
    ),
    "re-export to an existing version": (
        MAIN, ["--mode=export", "--model_dir={w}/run", "--export_version=1"], r"export/vdm/1 exists: choose another"
    ),
    "classifier: no classifier.keras": (
        CLASSIFIER,
        ["--mode=sample", "--model_dir={new}", "--diffusion_dir={w}/run", "--label=3"],
        r"holds no trained classifier \(classifier.keras\)",
    ),
    "classifier: label -1": (
        CLASSIFIER,
        ["--mode=sample", "--model_dir={w}/classifier", "--diffusion_dir={w}/run", "--label=-1"],
        r"--label must be a class of the classifier, 0..9; got -1",
    ),
    "client: missing file": (CLIENT, [*CLIENT_FLAGS, "likelihood", "{w}/missing.png"], r"missing.png: no such file"),
    "client: empty file": (CLIENT, [*CLIENT_FLAGS, "likelihood", "{w}/empty.png"], r"empty.png: the file is empty"),
    "client: not an image": (CLIENT, [*CLIENT_FLAGS, "likelihood", "{w}/notes.txt"], r"notes.txt: not a readable"),
    "client: palette image": (CLIENT, [*CLIENT_FLAGS, "likelihood", "{w}/palette.png"], r"got mode P"),
    "client: grey and alpha": (CLIENT, [*CLIENT_FLAGS, "likelihood", "{w}/grey_alpha.png"], r"got mode LA"),
    "client: mask of the wrong size": (
        CLIENT,
        [*CLIENT_FLAGS, "--mask={w}/mask_4x4.png", "--out={w}/filled.png", "inpaint", "{w}/grey.png"],
        r"expected a mask of the images' size 8x8",
    ),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Files for the cases: a run (config and a checkpoint, no model needed), a classifier run, images."""
    w = tmp_path_factory.mktemp("cli_errors")
    (w / "a_file").write_text("not a directory")
    (w / "empty_tfds").mkdir()
    configs.save_config(str(w / "run"), configs.PRESETS["digits"])
    tf.train.Checkpoint(step=tf.Variable(1)).save(str(w / "run" / "checkpoints" / "ckpt"))
    (w / "run" / "export" / "vdm" / "1").mkdir(parents=True)
    (w / "classifier").mkdir()
    (w / "classifier" / "config.json").write_text('{"dataset": "digits"}')
    (w / "classifier" / "classifier.keras").write_bytes(b"")
    (w / "empty.png").write_bytes(b"")
    (w / "notes.txt").write_text("some notes, not pixels\n")
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(w / "grey.png")
    Image.fromarray(grey).convert("P").save(w / "palette.png")
    Image.fromarray(grey).convert("LA").save(w / "grey_alpha.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(w / "mask_4x4.png")
    return w


def new_directory(workspace, case):
    return workspace / ("new_" + "".join(c if c.isalnum() else "_" for c in case))


@pytest.fixture(scope="module")
def results(workspace):
    """Every case's (completed process, its arguments), run in parallel."""

    def run(case):
        module, arguments, _ = CASES[case]
        arguments = [a.format(w=workspace, new=new_directory(workspace, case)) for a in arguments]
        prefix = ["-c", NO_NETWORK, module] if case == "data set not prepared, no network" else ["-m", module]
        completed = subprocess.run(
            [sys.executable, *prefix, *arguments], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        return completed, arguments

    with futures.ThreadPoolExecutor(4) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_short_message_without_traceback(case, results, workspace):
    completed, _ = results[case]
    output = completed.stdout + completed.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert completed.returncode != 0, output
    assert "Traceback" not in output, output
    assert 1 <= len(lines) <= 3, output
    assert re.search(CASES[case][2], output), output
    assert not new_directory(workspace, case).exists(), "a failed start left a run directory behind"
