"""Bad input on every command line: a short message naming what was expected, no traceback.

Each case runs the real command (a subprocess), all of them in parallel; each must exit with a
non-zero code, print at most three lines, no Python traceback, and the message it is about.
A failed start of the trainer must not leave a run directory behind, nor any file in the
workspace. The trainers' cases that need neither data nor a TPU end before TensorFlow is
imported (`BEFORE_TENSORFLOW`). Cases with {ro} use a read-only file system (a tmpfs remounted
read-only: root only; skipped elsewhere).
"""

import contextlib
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

# A module run with every socket connection refused (a machine without network) that writes,
# at its exit, whether TensorFlow was imported into the file named by $TENSORFLOW_IMPORTED.
NO_NETWORK = textwrap.dedent(
    """
    import atexit, os, runpy, socket, sys
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (no network in this test)")
    socket.socket.connect = socket.getaddrinfo = refuse
    def record():
        with open(os.environ["TENSORFLOW_IMPORTED"], "w") as f:
            f.write(str("tensorflow" in sys.modules))
    atexit.register(record)
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
        r"Unknown network.mixed_precision 'float16'; expected float32 or bfloat16",
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
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_version=1"],
        r"export/vdm/1 exists: choose another",
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
    # What a demanding user tries next (issue 24): types, empty values, bounds, bad run directories.
    "wrong type: n_layers=abc": (
        MAIN,
        ["--config.n_layers=abc", "--model_dir={new}"],
        r"error: flag --config.n_layers=abc: invalid literal",
    ),
    "wrong type: batch_size=1.5": (MAIN, ["--batch_size=1.5", "--model_dir={new}"], r"flag --batch_size=1.5: invalid"),
    "wrong type: a list of words": (
        MAIN,
        ["--config.fourier_exponents=a,b", "--model_dir={new}"],
        r"--config.fourier_exponents takes comma-separated numbers; got 'a'",
    ),
    "not a number: learning rate nan": (
        MAIN,
        ["--config.learning_rate=nan", "--model_dir={new}"],
        r"learning_rate must be finite; got nan",
    ),
    "empty model_dir": (MAIN, ["--model_dir="], r"--model_dir is empty; expected a run directory"),
    "empty export_dir": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_dir="],
        r"--export_dir is empty; expected the dir",
    ),
    "export name with a slash": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_name=a/b"],
        r"--export_name='a/b': expected a model",
    ),
    "negative export version": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_version=-1"],
        r"--export_version must be >= 0",
    ),
    "importance samples zero": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_score_sde", "--export_importance_samples=0"],
        r"--export_importance_samples must be >= 1 \(dequantizations per image\); got 0",
    ),
    "importance samples of a VDM": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_score_sde", "--export_importance_samples=4"],
        r"--export_importance_samples is for a MuLAN .*this run's model.kind is vdm",
    ),
    "importance samples without the exact likelihood": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_importance_samples=4"],
        r"sets the exact_likelihood signature: add --export_score_sde",
    ),
    "importance samples without an export": (
        MAIN,
        ["--config=digits_mulan", "--export_importance_samples=4", "--model_dir={new}"],
        r"sets the export's exact likelihood: add --export \(or --mode=export\)",
    ),
    "gamma_min above gamma_max": (
        MAIN,
        ["--config.gamma_min=10", "--config.gamma_max=-10", "--model_dir={new}"],
        r"gamma_min must be below gamma_max; got 10.0 and -10.0",
    ),
    "gamma_min equal to gamma_max": (
        MAIN,
        ["--config.gamma_min=1", "--config.gamma_max=1", "--model_dir={new}"],
        r"gamma_min must be below gamma",
    ),
    "negative train_steps": (MAIN, ["--train_steps=-5", "--model_dir={new}"], r"train_steps must be >= 0; got -5"),
    "huge n_layers": (
        MAIN,
        ["--config.n_layers=100000", "--model_dir={new}"],
        r"n_layers must be <= 1024 \(beyond any published",
    ),
    "a sectioned flag out of range": (
        MAIN,
        ["--config.network.n_layers=0", "--model_dir={new}"],
        r"network.n_layers must be >= 1; got 0",
    ),
    "both names of one field": (
        MAIN,
        ["--config.n_layers=2", "--config.network.n_layers=3", "--model_dir={new}"],
        r"--config.n_layers and --config.network.n_layers set the same field, network.n_layers",
    ),
    "unknown mode": (MAIN, ["--mode=bogus", "--model_dir={new}"], r"flag --mode=bogus: value should be one of <train"),
    "positional argument": (MAIN, ["--model_dir={new}", "extra"], r"unexpected arguments extra; flags take the form"),
    "config.json in Latin-1": (MAIN, ["--model_dir={w}/latin1_run"], r"latin1_run/config.json: not a UTF-8 text file"),
    "config.json not JSON": (MAIN, ["--mode=eval", "--model_dir={w}/broken_run"], r"broken_run/config.json: not valid"),
    "config.json a JSON list": (MAIN, ["--model_dir={w}/list_run"], r"list_run/config.json: expected a JSON object"),
    "config.json wrongly typed": (
        MAIN,
        ["--mode=sample", "--model_dir={w}/typed_run"],
        r"typed_run/config.json: network.n_layers must be an integer",
    ),
    "config.json unknown field": (
        MAIN,
        ["--model_dir={w}/unknown_run"],
        r"unknown_run/config.json: unknown fields n_leyers \(written by a newer",
    ),
    "unreachable TPU": (
        MAIN,
        ["--tpu=foo", "--model_dir={new}", "--train_steps=2"],
        r"--tpu=foo: cannot connect to the TPU \(URLError",
    ),
    "train into a read-only run directory": (
        MAIN,
        ["--model_dir={ro}/run", "--train_steps=2"],
        r"--model_dir=.*/run: cannot write in .*Read-only file",
    ),
    "train a new run on a read-only disk": (
        MAIN,
        ["--model_dir={ro}/new_run"],
        r"--model_dir=.*new_run: cannot write in .*Read-only file system",
    ),
    "sample into a read-only run directory": (
        MAIN,
        ["--mode=sample", "--model_dir={ro}/run"],
        r"--model_dir=.*: cannot write in .*Read-only file system",
    ),
    "export to a read-only directory": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_dir={ro}/exports"],
        r"--export_dir=.*/exports: cannot write in .*Read-only file system",
    ),
    "export_dir is a file": (
        MAIN,
        ["--mode=export", "--model_dir={w}/run", "--export_dir={w}/a_file/x"],
        r"a_file is a file; expected a",
    ),
    "classifier: wrong type": (CLASSIFIER, ["--batch_size=1.5", "--model_dir={new}"], r"flag --batch_size=1.5: inv"),
    "classifier: unknown mode": (CLASSIFIER, ["--mode=bogus", "--model_dir={new}"], r"flag --mode=bogus: value sh"),
    "classifier: negative train_steps": (
        CLASSIFIER,
        ["--train_steps=-3", "--model_dir={new}"],
        r"train_steps must be >= 1; got -3",
    ),
    "classifier: gamma_min >= gamma_max": (
        CLASSIFIER,
        ["--gamma_min=10", "--gamma_max=-10", "--model_dir={new}"],
        r"gamma_min must be below gamma_max",
    ),
    "classifier: learning rate nan": (
        CLASSIFIER,
        ["--learning_rate=nan", "--model_dir={new}"],
        r"learning_rate must be a finite number > 0; got nan",
    ),
    "classifier: empty model_dir": (CLASSIFIER, ["--model_dir="], r"--model_dir is empty; expected the classifier's"),
    "classifier: positional argument": (CLASSIFIER, ["--model_dir={new}", "x"], r"unexpected arguments x; flags"),
    "classifier: config.json in Latin-1": (
        CLASSIFIER,
        ["--mode=sample", "--model_dir={w}/latin1_classifier", "--diffusion_dir={w}/run", "--label=3"],
        r"latin1_classifier/config.json: not UTF-8 text; expected the JSON object a classifier run writes",
    ),
    "classifier: config.json not JSON": (
        CLASSIFIER,
        ["--mode=sample", "--model_dir={w}/broken_classifier", "--diffusion_dir={w}/run", "--label=3"],
        r"broken_classifier/config.json: Expecting value",
    ),
    "classifier: diffusion run's config.json wrongly typed": (
        CLASSIFIER,
        ["--mode=sample", "--model_dir={w}/classifier", "--diffusion_dir={w}/typed_run", "--label=3"],
        r"typed_run/config.json: network.n_layers must be an integer",
    ),
    "classifier: train into a read-only directory": (
        CLASSIFIER,
        ["--model_dir={ro}/classifier"],
        r"--model_dir=.*classifier: cannot write in .*Read-only file",
    ),
    "classifier: sample into a read-only directory": (
        CLASSIFIER,
        ["--mode=sample", "--model_dir={ro}/classifier", "--diffusion_dir={w}/run", "--label=3"],
        r"--model_dir=.*classifier: cannot write in .*Read-only file system",
    ),
    "classifier: unknown sampler": (
        CLASSIFIER,
        [*["--mode=sample", "--model_dir={w}/classifier"], "--sampler=euler"],
        r"--sampler=euler: value",
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


# The cases that need TensorFlow before they can fail: the data set's files, the TPU, the client.
NEED_TENSORFLOW = ("data set not prepared, no network", "unreachable TPU")


def make_run(directory):
    """A run directory as the checks see it: config.json and a checkpoint (no model needed)."""
    configs.save_config(str(directory), configs.PRESETS["digits"])
    tf.train.Checkpoint(step=tf.Variable(1)).save(str(directory / "checkpoints" / "ckpt"))


def make_classifier_run(directory, config_json=b'{"dataset": "digits"}'):
    directory.mkdir()
    (directory / "config.json").write_bytes(config_json)
    (directory / "classifier.keras").write_bytes(b"")


@pytest.fixture(scope="module")
def read_only():
    """A directory on a read-only file system holding a run and a classifier run; None where mounting is refused."""
    from full_disk import mounted_tmpfs

    with contextlib.ExitStack() as stack:
        try:
            directory = stack.enter_context(mounted_tmpfs(1024))
        except pytest.skip.Exception:
            yield None
            return
        make_run(__import__("pathlib").Path(directory) / "run")
        make_classifier_run(__import__("pathlib").Path(directory) / "classifier")
        subprocess.run(["mount", "-o", "remount,ro", directory], check=True)
        yield directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Files for the cases: a run (config and a checkpoint, no model needed), a classifier run, images."""
    w = tmp_path_factory.mktemp("cli_errors")
    (w / "a_file").write_text("not a directory")
    (w / "empty_tfds").mkdir()
    make_run(w / "run")
    (w / "run" / "export" / "vdm" / "1").mkdir(parents=True)
    make_classifier_run(w / "classifier")
    make_classifier_run(w / "latin1_classifier", '{"dataset": "d\xedgits"}'.encode("latin-1"))
    make_classifier_run(w / "broken_classifier", b"dataset: digits")
    for name, text in [
        ("latin1_run", '{"dataset": "d\xedgits"}'.encode("latin-1")),
        ("broken_run", b"{not json"),
        ("list_run", b"[1, 2]"),
        ("typed_run", b'{"n_layers": "abc"}'),
        ("unknown_run", b'{"n_leyers": 3}'),
    ]:
        (w / name).mkdir()
        (w / name / "config.json").write_bytes(text)
        tf.train.Checkpoint(step=tf.Variable(1)).save(str(w / name / "checkpoints" / "ckpt"))
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


def listing(directory):
    """Every path under `directory` (relative), with the size of each file."""
    return {
        (os.path.relpath(os.path.join(root, name), directory), os.path.getsize(os.path.join(root, name)))
        for root, directories, names in os.walk(directory)
        for name in names + directories
        if not os.path.islink(os.path.join(root, name))
    }


@pytest.fixture(scope="module")
def results(workspace, read_only, tmp_path_factory):
    """Every case's (completed process, its arguments, whether it imported TensorFlow), run in parallel.

    Also the workspace's listing before and after all of them: no case may leave a file behind.
    """
    markers = tmp_path_factory.mktemp("tensorflow_imported")
    before = listing(workspace)
    cases = [case for case in CASES if read_only is not None or "{ro}" not in str(CASES[case][1])]

    def run(case):
        module, arguments, _ = CASES[case]
        arguments = [a.format(w=workspace, new=new_directory(workspace, case), ro=read_only) for a in arguments]
        marker = markers / new_directory(workspace, case).name
        completed = subprocess.run(
            [sys.executable, "-c", NO_NETWORK, module, *arguments],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "TENSORFLOW_IMPORTED": str(marker)},
        )
        return completed, arguments, marker.read_text() == "True"

    with futures.ThreadPoolExecutor(4) as pool:
        return dict(zip(cases, pool.map(run, cases))), before, listing(workspace)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_short_message_without_traceback(case, results, workspace):
    if case not in results[0]:
        pytest.skip("needs a read-only file system (mounting a tmpfs was refused)")
    completed, _, tensorflow_imported = results[0][case]
    output = completed.stdout + completed.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert completed.returncode != 0, output
    assert "Traceback" not in output, output
    assert 1 <= len(lines) <= 3, output
    assert re.search(CASES[case][2], output), output
    assert not new_directory(workspace, case).exists(), "a failed start left a run directory behind"
    if CASES[case][0] in (MAIN, CLASSIFIER) and case not in NEED_TENSORFLOW:
        assert not tensorflow_imported, "the check came after TensorFlow was imported"


def test_no_case_leaves_a_file_behind(results):
    """Not even in the TensorFlow Datasets data directory of the case without network (a failed
    download removes what it made there)."""
    _, before, after = results
    assert after == before
