"""`python -m vdm_tf.compression` as a user runs it: bad input, a full disk, Ctrl-C, start-up time,
the choice between bits-back and PNG/WebP, and the README's codec example.

The error matrix runs the real command (a subprocess per case, in parallel, as
tests/test_cli_errors.py does): each case must exit non-zero with at most three lines, no Python
traceback, the message it is about, and nothing left where it would have written.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent import futures

import numpy as np
import pytest
from compression_helpers import random_denoiser_model, run_command_line
from PIL import Image

from trainers import configs
from vdm_tf import compression
from vdm_tf.compression import BitsBackCodec, read_header

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "vdm_tf.compression"]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
NOT_UTF8 = os.fsdecode(b"caf\xe9.png")  # a POSIX file name that is not UTF-8


@contextlib.contextmanager
def read_only_directory():
    """A directory this process cannot write in: a read-only tmpfs for root, else mode 0555."""
    directory = tempfile.mkdtemp(prefix="vdm_tf-read-only-")
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            yield directory
        finally:
            os.chmod(directory, 0o755)
            os.rmdir(directory)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", directory], capture_output=True)
    if mounted.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], capture_output=True)
        os.rmdir(directory)


def _save_frames(path, frames, **options):
    pictures = [Image.fromarray(frame) for frame in frames]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], **options)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Input files of the error matrix; `w / "out"` is where every case may write (and must not)."""
    w = tmp_path_factory.mktemp("compression_cli")
    (w / "out").mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rgb = np.stack([grey, grey[::-1], grey.T], -1)
    Image.fromarray(grey).save(w / "grey.png")
    Image.fromarray(rgb).save(w / "rgb.png")
    (w / "notes.txt").write_text("some notes, not pixels\n")
    (w / "empty.png").write_bytes(b"")
    (w / "a_directory").mkdir()
    Image.fromarray((grey.astype(np.uint16) * 1000)).save(w / "deep.png")  # mode I;16
    Image.fromarray(rgb).convert("CMYK").save(w / "cmyk.jpg")
    Image.fromarray(grey).convert("LA").save(w / "grey_alpha.png")
    Image.fromarray(rgb).convert("RGBA").save(w / "rgba.png")
    Image.fromarray(grey).convert("P").save(w / "palette.png")
    _save_frames(w / "pages.tif", [grey, grey[::-1]])
    _save_frames(w / "animated.gif", [grey, grey[::-1]], duration=100, loop=0)
    _save_frames(w / "animated.png", [rgb, rgb[::-1]], duration=100)
    (w / NOT_UTF8).write_text("not pixels either\n")
    # .vdmz files of an 8x8 grey model (a PNG/WebP file: no network run) and a model of other weights.
    model = random_denoiser_model(seed=0)
    model.save(str(w / "model.keras"))
    random_denoiser_model(seed=1).save(str(w / "other.keras"))
    data = BitsBackCodec(model, num_steps=2).encode(grey[:1, :1, None][None], names=["dot.png"])
    assert read_header(data).mode == compression.CONVENTIONAL
    (w / "good.vdmz").write_bytes(data)
    (w / "truncated.vdmz").write_bytes(data[:-9])
    (w / "garbage.vdmz").write_bytes(os.urandom(300))
    (w / "empty.vdmz").write_bytes(b"")
    # Models the codec cannot code: a MuLAN run directory, and model.keras as a CDM would save it
    # (the command line reads the class from config.json before TensorFlow starts).
    configs.save_config(str(w / "mulan_run"), configs.PRESETS["digits_mulan"])
    with zipfile.ZipFile(w / "model.keras") as source, zipfile.ZipFile(w / "cdm.keras", "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "config.json":
                data = json.dumps({**json.loads(data), "class_name": "CDM"}).encode()
            target.writestr(item, data)
    return w


ENCODE = ["encode", "{w}/rgb.png", "-o", "{w}/out/out.vdmz"]
DECODE = ["decode", "--model={w}/model.keras", "{w}/good.vdmz", "-o", "{w}/out/decoded"]
# name: (arguments, a regular expression the output must contain); {w} is the workspace.
CASES = {
    "no sub-command": ([], r"error: the following arguments are required: command \(usage: python -m vdm_tf"),
    "unknown sub-command": (["compress", "{w}/rgb.png"], r"argument command: invalid choice: 'compress'"),
    "unknown option": (
        [*ENCODE, "--frobnicate=1"],
        r"unrecognized arguments: --frobnicate=1 \(usage: python -m vdm_tf.compression",
    ),
    "encode without -o": (ENCODE[:2], r"the following arguments are required: -o/--output"),
    "-o in a read-only directory": (ENCODE[:3] + ["{read_only}/out.vdmz"], r"no permission to write in .*read-only"),
    "-o an existing directory": (ENCODE[:3] + ["{w}/out"], r"out is a directory; expected the name of the file"),
    "-o under a file": (ENCODE[:3] + ["{w}/rgb.png/out.vdmz"], r"rgb.png is a file, not a directory"),
    "missing image": (["encode", "{w}/missing.png", *ENCODE[2:]], r"missing.png: no such file; expected an L or RGB"),
    "non-image": (["encode", "{w}/notes.txt", *ENCODE[2:]], r"notes.txt: not a readable image file"),
    "empty file": (["encode", "{w}/empty.png", *ENCODE[2:]], r"empty.png: the file is empty"),
    "directory as input": (["encode", "{w}/a_directory", *ENCODE[2:]], r"a_directory: is a directory"),
    "16-bit PNG": (["encode", "{w}/deep.png", *ENCODE[2:]], r"deep.png: got mode I;16; expected an L or RGB image"),
    "CMYK JPEG": (["encode", "{w}/cmyk.jpg", *ENCODE[2:]], r"cmyk.jpg: got mode CMYK"),
    "LA image": (["encode", "{w}/grey_alpha.png", *ENCODE[2:]], r"got mode LA"),
    "RGBA image": (["encode", "{w}/rgba.png", *ENCODE[2:]], r"got mode RGBA"),
    "palette image": (["encode", "{w}/palette.png", *ENCODE[2:]], r"got mode P;"),
    "multi-page TIFF": (["encode", "{w}/pages.tif", *ENCODE[2:]], r"pages.tif: holds 2 images \(TIFF frames or pages"),
    "animated GIF": (["encode", "{w}/animated.gif", *ENCODE[2:]], r"animated.gif: holds 2 images \(GIF"),
    "animated PNG": (["encode", "{w}/animated.png", *ENCODE[2:]], r"animated.png: holds 2 images \(PNG"),
    "non-UTF-8 file name": (["encode", "{w}/" + NOT_UTF8, *ENCODE[2:]], r"caf\\udce9.png: not a readable image file"),
    "mixed grey and RGB": (["encode", "{w}/grey.png", *ENCODE[1:]], r"mix grey \(L\) and RGB images"),
    "huge --batch_size": ([*ENCODE, "--batch_size=1000000000"], r"--batch_size: expected an integer in 1..1024"),
    "--steps=0": ([*ENCODE, "--steps=0"], r"argument --steps: expected an integer >= 1; got 0"),
    "--steps=abc": ([*ENCODE, "--steps=abc"], r"argument --steps: expected an integer >= 1; got 'abc'"),
    "missing --model file": (
        ["encode", "--model={w}/missing.keras", *ENCODE[1:]],
        r"--model must be a .keras file written by model.save or a trainer run directory",
    ),
    "--model not a .keras": (["encode", "--model={w}/rgb.png", *ENCODE[1:]], r"--model must be a .keras file"),
    "--model a MuLAN run": (
        ["encode", "--model={w}/mulan_run", *ENCODE[1:]],
        r"mulan_run is a MuLAN, which the bits-back codec cannot code: its noise schedule is per pixel",
    ),
    "--model a CDM": (["encode", "--model={w}/cdm.keras", *ENCODE[1:]], r"cdm.keras is a CDM, which the bits-back"),
    "--model of grey images, RGB image": (
        ["encode", "--model={w}/model.keras", *ENCODE[1:]],
        r"rgb.png: got mode RGB; expected an L image \(the model's channels\)",
    ),
    "decode of a truncated .vdmz": (
        DECODE[:2] + ["{w}/truncated.vdmz"] + DECODE[3:],
        r"truncated.vdmz: Truncated file",
    ),
    "decode of garbage": (DECODE[:2] + ["{w}/garbage.vdmz"] + DECODE[3:], r"Not a vdm_tf compressed file"),
    "decode of an empty .vdmz": (DECODE[:2] + ["{w}/empty.vdmz"] + DECODE[3:], r"empty.vdmz: the file is empty"),
    "decode of a missing .vdmz": (DECODE[:2] + ["{w}/missing.vdmz"] + DECODE[3:], r"missing.vdmz: No such file"),
    "decode to a file path": (DECODE[:4] + ["{w}/rgb.png"], r"rgb.png is a file; expected a directory"),
    "decode with the bundled model of another shape": (
        ["decode", "{w}/good.vdmz", *DECODE[3:]],
        r"coded with a model of 8x8x1 images; the bundled model codes 32x32x1 images: pass the encoder's --model",
    ),
    "decode with a model of other weights": (
        ["decode", "--model={w}/other.keras", *DECODE[2:]],
        r"good.vdmz: The data was encoded with a different model \(the weights' SHA-256 differs\)",
    ),
    "decode, missing --model file": (["decode", "--model={w}/missing.keras", *DECODE[2:]], r"--model must be a"),
    "decode, --model not a .keras": (["decode", "--model={w}/notes.txt", *DECODE[2:]], r"--model must be a .keras"),
}


def _leftovers(directory):
    """Everything in `directory` (the matrix's output directory must stay empty)."""
    return sorted(os.listdir(directory))


@pytest.fixture(scope="module")
def results(workspace):
    """Every case's completed process, run in parallel."""
    with read_only_directory() as read_only:

        def run(case):
            arguments = [a.format(w=workspace, read_only=read_only) for a in CASES[case][0]]
            return subprocess.run(
                [*COMMAND, *arguments], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV
            )

        with futures.ThreadPoolExecutor(4) as pool:
            completed = dict(zip(CASES, pool.map(run, CASES)))
        completed["-o in a read-only directory"].leftovers = _leftovers(read_only)
    return completed


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_short_message_and_leaves_nothing(case, results, workspace):
    completed = results[case]
    output = completed.stdout + completed.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert completed.returncode == 1, output
    assert "Traceback" not in output, output
    assert 1 <= len(lines) <= 3, output
    assert re.search(CASES[case][1], output), output
    assert _leftovers(workspace / "out") == [], "a failed command left files behind"
    assert getattr(completed, "leftovers", []) == []


# --------------------------------------------------------------------------------------------
# A full disk, Ctrl-C, start-up.


def _noise_png(path, size=80):
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (size, size, 3), np.uint8)).save(path)


def test_a_full_disk_fails_in_one_line_and_leaves_what_was_there(small_disk, tmp_path):
    """An 80x80 noise image (about 19 KB coded) to a 16 KiB disk: exit 1, one line naming the
    output, no partial file; an existing out.vdmz is left as it was."""
    disk = small_disk(16)
    _noise_png(tmp_path / "noise.png")
    out = os.path.join(disk, "out.vdmz")
    for existing in (None, b"an older compressed file\n" * 40):
        if existing:
            with open(out, "wb") as f:
                f.write(existing)
        argv = ["encode", str(tmp_path / "noise.png"), "-o", out, "--steps=2", "--elbo_samples=0"]
        completed = subprocess.run([*COMMAND, *argv], capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
        errors = completed.stderr.strip().splitlines()
        assert completed.returncode == 1 and len(errors) == 1, completed.stderr
        assert f"writing {out} failed: No space left on device" in errors[0], errors
        assert os.listdir(disk) == ([] if existing is None else ["out.vdmz"])
        if existing:
            assert open(out, "rb").read() == existing


def test_ctrl_c_during_encode_ends_in_one_line_with_status_130_and_no_file(tmp_path):
    """SIGINT once the bits-back code runs (its progress bar is on stdout): exit 130, one line,
    neither the output nor a temporary file left."""
    _noise_png(tmp_path / "noise.png", 96)
    out = tmp_path / "out" / "noise.vdmz"
    argv = ["encode", str(tmp_path / "noise.png"), "-o", str(out), "--steps=1000", "--no-fallback"]
    process = subprocess.Popen([*COMMAND, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    try:
        seen = b""
        while b"/" not in seen:  # the progress bar: "  3/9009 ..."
            chunk = process.stdout.read1(1024)
            assert chunk, f"the encoder ended before coding: {process.wait()} {process.stderr.read()[-2000:]}"
            seen += chunk
        process.send_signal(signal.SIGINT)
        _, error = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    lines = error.decode().strip().splitlines()
    assert process.returncode == 130 and lines == ["python -m vdm_tf.compression: interrupted"], error.decode()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_errors_come_before_tensorflow_starts(workspace):
    """No sub-command, and a missing input, fail in about a second (TensorFlow's import takes
    10-40 s here); the checks of a valid encode and decode import neither TensorFlow nor Keras."""
    for argv in ([], ["encode", str(workspace / "missing.png"), "-o", str(workspace / "out" / "x.vdmz")]):
        start = time.perf_counter()
        completed = subprocess.run([*COMMAND, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
        seconds = time.perf_counter() - start
        assert completed.returncode == 1 and seconds < 5, (seconds, completed.stderr)
    code = (
        "import sys\n"
        "from vdm_tf.compression import cli\n"
        f"cli.parse_and_check(['encode', {str(workspace / 'rgb.png')!r}, '-o', {str(workspace / 'x.vdmz')!r}])\n"
        f"cli.parse_and_check(['decode', {str(workspace / 'good.vdmz')!r}, '--model', "
        f"{str(workspace / 'model.keras')!r}, '-o', {str(workspace / 'decoded')!r}])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# Bits-back or PNG/WebP: decided before paying for the code, and --no-fallback obeyed.


@pytest.fixture(scope="module")
def photos_model():
    return compression.load_model(compression.default_model_path(3))


def _count_batches(monkeypatch):
    """Counts the batches `encode` codes ("coded") and plans ("planned")."""
    counts = {"coded": 0, "planned": 0}
    encode_batch, encode_plan = BitsBackCodec._encode_batch, BitsBackCodec._encode_plan

    def counted_batch(self, *args):
        counts["coded"] += 1
        return encode_batch(self, *args)

    def counted_plan(self, *args):
        plan = encode_plan(self, *args)
        counts["planned"] += len(plan)
        return plan

    monkeypatch.setattr(BitsBackCodec, "_encode_batch", counted_batch)
    monkeypatch.setattr(BitsBackCodec, "_encode_plan", counted_plan)
    return counts


def test_images_bits_back_codes_badly_are_stored_conventionally_without_the_whole_code(
    photos_model, tmp_path, monkeypatch, capsys
):
    """Flat 64x64 images (PNG/WebP: a few bytes each) with the bundled RGB model: the first
    batches of the bits-back code already project a file far larger than PNG/WebP, so the code
    stops there (a fraction of its batches) and the summary says why; decoding gives the pixels back."""
    monkeypatch.setattr(compression.cli, "load_model", lambda path: photos_model)
    counts = _count_batches(monkeypatch)
    paths = []
    for i, colour in enumerate([(200, 30, 30), (10, 120, 250), (90, 90, 90)]):
        paths.append(str(tmp_path / f"flat{i}.png"))
        Image.new("RGB", (64, 64), colour).save(paths[-1])
    out = str(tmp_path / "flat.vdmz")
    assert run_command_line(["encode", *paths, "-o", out, "--elbo_samples=0"]) == 0
    summary = capsys.readouterr().out
    assert 0 < counts["coded"] <= counts["planned"] // 4, counts
    assert re.search(
        r"\(stored as [A-Za-z/-]+: bits-back estimated \d+\.\d+ bpd \(its first \d+ of \d+ crops\) > "
        r"[A-Za-z/-]+ \d+\.\d+ bpd; --no-fallback forces bits-back\)",
        summary,
    ), summary
    assert read_header(open(out, "rb").read()).mode == compression.CONVENTIONAL
    assert run_command_line(["decode", out, "-o", str(tmp_path / "decoded")]) == 0
    for i, path in enumerate(paths):
        decoded = np.asarray(Image.open(tmp_path / "decoded" / f"flat{i}.png"))
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(path)))


def test_no_fallback_bits_back_codes_even_an_image_that_is_all_seed(photos_model, tmp_path, monkeypatch, capsys):
    """One 12x20 image, smaller than a tile: with the fallback it is all seed (PNG/WebP, and the
    summary says so); with --no-fallback it is bits-back coded (its bottom half), as documented."""
    monkeypatch.setattr(compression.cli, "load_model", lambda path: photos_model)
    image = np.random.default_rng(4).integers(0, 256, (12, 20, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "small.png")
    argv = ["encode", str(tmp_path / "small.png"), "--steps=2", "--elbo_samples=0", "-o"]
    assert run_command_line([*argv, str(tmp_path / "fallback.vdmz")]) == 0
    assert "the image is all seed, no tile is left for bits-back" in capsys.readouterr().out
    counts = _count_batches(monkeypatch)
    assert run_command_line([*argv, str(tmp_path / "forced.vdmz"), "--no-fallback"]) == 0
    summary = capsys.readouterr().out
    header = read_header((tmp_path / "forced.vdmz").read_bytes())
    assert header.mode == compression.BITS_BACK and header.seed_rows == 6 and counts["coded"], header
    assert "bpd (bits-back --no-fallback)" in summary and "net" in summary, summary
    np.testing.assert_array_equal(BitsBackCodec(photos_model).decode((tmp_path / "forced.vdmz").read_bytes())[0], image)


def test_no_fallback_codes_a_one_pixel_image_bits_back():
    """The library: `fallback=False` bits-back codes a 1x1 image too (no seed: nothing to halve)."""
    model = random_denoiser_model(seed=0)
    image = np.full((1, 1, 1, 1), 77, np.uint8)
    data = BitsBackCodec(model, num_steps=2, fallback=False).encode(image)
    assert read_header(data).mode == compression.BITS_BACK and read_header(data).seed_rows == 0
    np.testing.assert_array_equal(BitsBackCodec(model).decode(data), image)


# --------------------------------------------------------------------------------------------
# The README.


def test_the_readme_codec_example_runs_as_written():
    """README.md, "### Lossless compression (bits-back)": its Python block, run as written."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("\n### Lossless compression (bits-back)\n")
    section = text[start : text.index("\n#", start + 1)]
    (block,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    completed = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
