"""Bits-back ANS compression: lossless round trips, codelength = discrete-time -ELBO, clear failures."""

import math
import os
import re
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
import tensorflow as tf
from compression_helpers import (
    FixedBatchesCodec,
    discrete_elbo_per_image,
    edge_and_digit_images,
    gaussian_model_and_data,
    random_denoiser_model,
    run_command_line,
)
from PIL import Image

from vdm_tf import compression, image_files
from vdm_tf.compression import BitsBackCodec, CompressionError, ModelMismatchError, decoded_file_names, read_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = tuple(f"image_{i}.png" for i in range(15))


@pytest.fixture(scope="module")
def model():
    return random_denoiser_model(seed=0)


@pytest.fixture(scope="module")
def images():
    return edge_and_digit_images()


@pytest.fixture(scope="module")
def encoded(model, images):
    """15 images named image_0.png .. image_14.png, bits-back (no fallback) in batches of up to 6, T = 4."""
    return BitsBackCodec(model, num_steps=4, batch_size=6, fallback=False).encode(images, names=NAMES)


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "model.keras")
    model.save(path)
    return path


def test_round_trip_is_bit_exact_for_random_edge_and_digit_images(model, images, encoded):
    decoded = BitsBackCodec(model).decode(encoded)  # T, batch size and grid come from the header
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    np.testing.assert_array_equal(decoded, images)
    header = read_header(encoded)
    assert (header.count, header.num_steps, header.batch_size, header.image_shape) == (15, 4, 6, (8, 8, 1))
    assert header.names == NAMES and header.mode == compression.BITS_BACK
    # The first image is the seed (PNG or WebP bytes at the bottom of the stack), recovered last.
    assert header.seed_rows == 8 and header.seed_bytes > 0
    # The whole encoder is deterministic (network outputs included): same images, same bytes.
    assert BitsBackCodec(model, num_steps=4, batch_size=6, fallback=False).encode(images, names=NAMES) == encoded
    # One image alone (a batch of one) and an untrained model that misses: still lossless.
    single = BitsBackCodec(model, num_steps=2).encode(images[:1])
    np.testing.assert_array_equal(BitsBackCodec(model).decode(single), images[:1])


def test_net_codelength_is_the_discrete_time_negative_elbo():
    """On Gaussian data with its analytic denoiser the discrete-time -ELBO is known in closed form.

    The net codelength is compared with the closed-form -ELBO of the same 1024 images (their
    expectation over the noise, `discrete_elbo_per_image`), which removes the images' sampling
    spread; the latents' Monte-Carlo spread remains. Its standard error, the sample std of
    (net - closed form) over data seeds 1..6 (this test's code with `data.sample(1024, seed)`),
    is 0.0125 bpd (0.16%; residuals -0.015, -0.000, +0.016, -0.011, +0.013, +0.003). The bound is
    4 SE, 0.05 bpd (0.64%): a 1% bias (0.078 bpd) fails it, and so does coding with twice the
    steps (-0.46 bpd). One step more or less (0.02 bpd, under 2 SE) is below this noise at T = 50;
    `test_discrete_elbo_helper_is_the_closed_form_at_its_step_count` resolves it at T = 10.
    """
    model, data = gaussian_model_and_data()
    num_steps, batch_size = 50, 256
    x = data.sample(1024, seed=1)
    # Full batches from the first: the initial bits below are those of one full batch.
    codec = FixedBatchesCodec(model, num_steps=num_steps, batch_size=batch_size, seed=False, fallback=False)
    encoded = codec.encode(x)
    header = read_header(encoded)
    assert header.num_steps == num_steps
    expected = discrete_elbo_per_image(model, data, x, num_steps).mean()
    net = header.net_bits / x.size
    assert abs(net - expected) < 4 * 0.0125, (net, expected)
    # The file: net codelength + initial bits + header (fixed size without names) + size table + CRC.
    overhead = compression._HEADER.size + header.sizes_bytes + 4
    assert 8 * len(encoded) == header.net_bits + header.initial_bits + 8 * overhead
    # The initial bits are those of the first batch's first pops, z_0 ~ q(z_0 | x) and z_1 ~ q(z_1 | z_0),
    # each about log2(std / delta * sqrt(2 pi e)) bits per dimension (std / delta = latent_bins for z_1,
    # latent_bins / sqrt(c_1) for z_0 on its finer grid): paid once, not once per batch (four batches here).
    gammas = model.schedule(tf.range(num_steps + 1, dtype=tf.float32) / num_steps).numpy().astype(np.float64)
    c_1 = -math.expm1(gammas[0] - gammas[1])
    pops = math.log2(codec.latent_bins**2 / math.sqrt(c_1) * 2 * math.pi * math.e)
    assert 0.5 * batch_size * 64 * pops < header.initial_bits < batch_size * 64 * pops


def test_discrete_elbo_helper_is_the_closed_form_at_its_step_count():
    """`compression.discrete_elbo_bpd` (the -ELBO the command line and the benchmark print) against
    the closed form of the same 256 images at T = 10 (14.3 bpd). With K = T time samples per image
    the antithetic times put exactly one in each step, so the time sampling adds no variance and
    the noise eps is all that is left: the residual's standard error, computed here from its
    spread, is about 0.065 bpd (0.45%), while T - 1 and T + 1 steps move the -ELBO by +1.49 and
    -1.08 bpd and 2T by -4.7 bpd (over 15 SE each; with them the time noise comes back too)."""
    model, data = gaussian_model_and_data()
    num_steps, x = 10, data.sample(256, seed=1)
    closed_form = discrete_elbo_per_image(model, data, x, num_steps)
    elbo = compression.discrete_elbo_bpd(model, x, num_steps, num_time_samples=num_steps, batch_size=256)
    residual = elbo["per_image"] - closed_form
    stderr = residual.std(ddof=1) / math.sqrt(residual.size)
    assert stderr < 0.08 and elbo["stderr"] < 0.08, (stderr, elbo["stderr"])  # K = T removes the time noise
    assert abs(residual.mean()) < 4 * stderr, (elbo["bpd"], closed_form.mean(), stderr)
    assert abs(elbo["bpd"] - residual.mean() - closed_form.mean()) < 1e-9


def _recrc(data):
    body = data[:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_corrupted_truncated_and_wrong_model_inputs_fail_clearly(model, images, encoded):
    codec = BitsBackCodec(model)
    with pytest.raises(CompressionError, match="Not a vdm_tf compressed file"):
        codec.decode(b"\x89PNG\r\n\x1a\n" + encoded[8:])
    with pytest.raises(CompressionError, match="Truncated file"):
        codec.decode(encoded[:-7])
    with pytest.raises(CompressionError, match="Truncated file"):
        codec.decode(encoded[:40])
    flipped = bytearray(encoded)
    flipped[len(encoded) // 2] ^= 0x10
    with pytest.raises(CompressionError, match="CRC-32"):
        codec.decode(bytes(flipped))
    # Corruptions that keep a valid checksum still fail instead of returning garbage: in the middle of
    # the stack decoding meets impossible symbols, at its bottom it does not end on the initial stack.
    with pytest.raises(CompressionError, match="impossible symbol"):
        codec.decode(_recrc(bytes(flipped)))
    # At the bottom: the seed's PNG/WebP bytes (their own checks fail), or without seed the initial words.
    no_seed = BitsBackCodec(model, num_steps=2, batch_size=4, seed=False, fallback=False).encode(images[:5])
    for data, message in [(encoded, "conventionally coded image does not decode"), (no_seed, "did not end on")]:
        bottom = bytearray(data)
        bottom[compression._HEADER.size + read_header(data).sizes_bytes + read_header(data).names_bytes] ^= 0x01
        with pytest.raises(CompressionError, match=message):
            codec.decode(_recrc(bytes(bottom)))
    with pytest.raises(ModelMismatchError, match="different model"):
        BitsBackCodec(random_denoiser_model(seed=1)).decode(encoded)
    version = bytearray(encoded)
    version[4] = 9
    with pytest.raises(CompressionError, match="Format version 9"):
        codec.decode(_recrc(bytes(version)))
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="names must be 15 strings, one per image; got 1"):
        codec.encode(images, names=["a.png"])


# --------------------------------------------------------------------------------------------
# File names.


def _as_version(data, version, block):
    """A version-3 file without seed coded in fixed batches as a file of format `version` (1 or 2)
    with the names block `block` (the CRC-32 recomputed)."""
    fields = list(compression._HEADER.unpack_from(data))
    header = read_header(data)
    assert header.seed_rows == 0 and header.mode == compression.BITS_BACK
    start = compression._HEADER.size + header.sizes_bytes + header.names_bytes
    payload = data[start:-4]
    old = fields[:13] + [len(block), len(payload) // 4] + fields[-2:]
    old[1] = version
    return _recrc(compression._HEADER_V2.pack(*old) + block + payload + bytes(4))


@pytest.fixture(scope="module")
def fixed_batches(model, images):
    """The 15 images coded as format versions 1 and 2 did: no seed, batches of 6 from the first."""
    return FixedBatchesCodec(model, num_steps=4, batch_size=6, seed=False, fallback=False).encode(images, names=NAMES)


def test_names_are_front_coded_and_deflated_and_version_1_and_2_files_still_decode(model, images, fixed_batches):
    digits = [f"digit{i:04d}.png" for i in range(297)]  # the CLI's names for the digits test split
    packed = compression._pack_names(digits)
    assert compression._unpack_names(packed) == tuple(digits)
    assert len(packed) < 0.03 * len("\n".join(digits).encode())  # 92 bytes instead of 4157
    # Shared prefixes beyond 255 bytes and of 10 bytes (the newline's code), repeats, non-ASCII,
    # a POSIX name that is not UTF-8 (surrogateescape) and an empty name all come back.
    odd = ["x" * 300 + "a", "x" * 300 + "b", "0123456789a", "0123456789b", "ü.png", "ü.png", "\udcff.png", ""]
    assert compression._unpack_names(compression._pack_names(odd)) == tuple(odd)
    with pytest.raises(CompressionError, match="Corrupted file names"):
        compression._unpack_names(packed[:-5])
    # Files of format versions 1 (names stored raw) and 2 (names packed) still decode, names included.
    version_1 = _as_version(fixed_batches, 1, "\n".join(NAMES).encode())
    version_2 = _as_version(fixed_batches, 2, compression._pack_names(NAMES))
    for old in (version_1, version_2):
        assert read_header(old).names == NAMES and read_header(old).sizes == ((8, 8),) * 15
        np.testing.assert_array_equal(BitsBackCodec(model).decode(old), images)
    with pytest.raises(CompressionError, match="14 file names for 15 images"):
        read_header(_as_version(fixed_batches, 2, compression._pack_names(NAMES[:14])))


def test_decoded_file_names_are_png_with_unique_stems():
    names = [
        "digit4.jpg", "noext", "digit0.dat", "a.png", "a.jpg", "A.PNG", "a-1.png",
        "", "..", "../../evil.png", "archive.tar.gz",
    ]  # fmt: skip
    assert decoded_file_names(names, len(names)) == [
        "digit4.png", "noext.png", "digit0.png", "a.png", "a-2.png", "A-3.png", "a-1.png",
        "00007.png", "00008.png", "evil.png", "archive.tar.png",
    ]  # fmt: skip
    assert decoded_file_names((), 2) == ["00000.png", "00001.png"]


# --------------------------------------------------------------------------------------------
# The command line.


def _odd_images(channels):
    """Images of odd sizes (1x1, 7x13, 33x65, 100x64) and contents (noise, all 0, all 255, a ramp)."""
    rng = np.random.default_rng(channels)
    ramp = np.arange(33 * 65 * channels).reshape(33, 65, channels) % 256
    return {
        "one.png": rng.integers(0, 256, (1, 1, channels)),
        "zeros.png": np.zeros((7, 13, channels)),
        "ones.png": np.full((7, 13, channels), 255),
        "ramp.png": ramp,
        "noise.png": rng.integers(0, 256, (100, 64, channels)),
    }


def _save(path, image, kind="PNG"):
    image = image.astype(np.uint8)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format=kind)


def _run_command_line(*args):
    """`python -m vdm_tf.compression ARGS` in a fresh process (its own TensorFlow runtime); its stdout."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "vdm_tf.compression", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_command_line_decodes_in_another_process_to_png_with_the_encoded_pixels(model_file, images, tmp_path, capsys):
    """Encode with the command line here (odd sizes and contents, JPEG inputs, odd extensions, two
    files with one stem), bits-back forced, and decode with it in a fresh Python process: PNG files
    holding exactly the pixels read at encode."""
    inputs = {"digit4.jpg": "JPEG", "a.png": "PNG", "a.jpg": "JPEG", "noext": "PNG", "digit0.dat": "PNG"}
    inputs["image_5.png"] = "PNG"
    paths, pixels = [], []
    odd = [((name, "PNG"), image) for name, image in list(_odd_images(1).items())[:2]]
    for (name, kind), image in [*zip(inputs.items(), images[3:9]), *odd]:
        paths.append(str(tmp_path / name))
        _save(paths[-1], image, kind)
        with Image.open(paths[-1]) as picture:
            pixels.append(np.asarray(picture))
    assert not np.array_equal(pixels[0], images[3, ..., 0])  # JPEG is lossy: what is read is what counts
    out = str(tmp_path / "images.vdmz")
    args = ["encode", f"--model={model_file}", *paths, "-o", out, "--steps=2", "--elbo_samples=0", "--no-fallback"]
    assert run_command_line(args) == 0
    summary = capsys.readouterr().out
    assert "8 images 1x1x1, 7x13x1, 8x8x1 (tiles 8x8x1), T=2" in summary and "net" in summary, summary
    header = read_header((tmp_path / "images.vdmz").read_bytes())
    assert header.mode == compression.BITS_BACK and header.sizes[6:] == ((1, 1), (7, 13))
    names_bpd = 8 * header.names_bytes / header.num_dims
    assert f"\n  names       {names_bpd:8.3f} bpd ({header.names_bytes} bytes for 8 names)\n" in summary, summary
    assert "2 inputs are JPEG files, not PNG: decode writes PNG files holding the decoded pixels" in summary, summary
    decoded = tmp_path / "decoded"
    _run_command_line("decode", f"--model={model_file}", out, "-o", str(decoded))
    written = ["digit4.png", "a.png", "a-1.png", "noext.png", "digit0.png", "image_5.png", "one.png", "zeros.png"]
    assert sorted(os.listdir(decoded)) == sorted(written)  # no staging directory left behind
    for name, expected in zip(written, pixels):
        with Image.open(decoded / name) as picture:
            assert picture.format == "PNG" and picture.mode == "L"
            np.testing.assert_array_equal(np.asarray(picture), expected)


@pytest.fixture(scope="module")
def rgb_model_file(model, model_file, tmp_path_factory):
    """{channels: (model, .keras file)}: the grey model and an RGB one."""
    rgb = random_denoiser_model(seed=2, channels=3)
    path = str(tmp_path_factory.mktemp("rgb_model") / "rgb.keras")
    rgb.save(path)
    return {1: (model, model_file), 3: (rgb, path)}


@pytest.mark.parametrize("channels, fallback", [(1, False), (3, False), (3, True)])
def test_command_line_round_trips_images_of_any_size(channels, fallback, rgb_model_file, tmp_path, monkeypatch, capsys):
    """Grey and RGB images of odd sizes in one message: bits-back (tiles 8x8, border crops at their
    own size, batched across images by shape) or, with the fallback, the smaller conventional code."""
    model, path = rgb_model_file[channels]
    monkeypatch.setattr(compression.cli, "load_model", lambda path: model)
    paths = []
    for name, image in _odd_images(channels).items():
        paths.append(str(tmp_path / name))
        _save(paths[-1], image)
    out = str(tmp_path / "rgb.vdmz")
    flag = "--fallback" if fallback else "--no-fallback"
    assert (
        run_command_line(["encode", f"--model={path}", *paths, "-o", out, "--steps=2", "--elbo_samples=0", flag]) == 0
    )
    header = read_header(open(out, "rb").read())
    # The untrained model loses to PNG on these images: the fallback stores PNG/WebP files.
    assert header.mode == (compression.CONVENTIONAL if fallback else compression.BITS_BACK)
    assert run_command_line(["decode", f"--model={path}", out, "-o", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    for name, image in _odd_images(channels).items():
        with Image.open(tmp_path / "out" / name) as picture:
            assert picture.mode == ("RGB" if channels == 3 else "L")
            np.testing.assert_array_equal(np.asarray(picture).reshape(image.shape), image.astype(np.uint8))


def intra_op_threads_default():
    """The intra-op thread count a fresh TensorFlow process uses here (`compression.intra_op_threads`)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_rgb_photos_round_trip_with_the_bundled_model_and_the_threads_of_the_header(tmp_path):
    """RGB PNG files through `python -m vdm_tf.compression` without --model (the bundled photos
    model), bits-back forced, each command in a fresh process as a user runs them. --threads sets
    TensorFlow's intra-op threads before it starts (the header records them; the default is this
    machine's CPU count); decode sets the header's count in its own process before running the
    model, else the network's outputs (and the probe's SHA-256) could differ."""
    threads = 1 if intra_op_threads_default() != 1 else 2
    rng = np.random.default_rng(7)
    rows, cols = np.indices((32, 32))
    photos = {  # the seed (the first image's rows), then a tile the model codes
        "noise.png": rng.integers(0, 256, (12, 20, 3)),
        "smooth.png": np.stack([4 * rows, 5 * cols, 2 * (rows + cols)], -1) + rng.integers(0, 6, (32, 32, 3)),
    }
    paths = []
    for name, image in photos.items():
        paths.append(str(tmp_path / name))
        _save(paths[-1], image)
    out = str(tmp_path / "photos.vdmz")
    summary = _run_command_line(
        "encode", *paths, "-o", out, "--steps=2", "--elbo_samples=0", "--no-fallback", f"--threads={threads}"
    )
    assert "2 images 12x20x3, 32x32x3 (tiles 32x32x3), T=2" in summary and "-ELBO" not in summary, summary
    header = read_header(open(out, "rb").read())
    assert header.mode == compression.BITS_BACK and header.image_shape == (32, 32, 3)
    assert header.threads == threads and header.seed_rows <= 12  # the model codes all of smooth.png
    decoded = _run_command_line("decode", out, "-o", str(tmp_path / "out"))
    assert f"{threads} intra-op threads as the encoder" in decoded, decoded
    for name, image in photos.items():
        with Image.open(tmp_path / "out" / name) as picture:
            assert picture.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(picture), image.astype(np.uint8))


ELBO_LINE = re.compile(r"\n  -ELBO\(T\) +(\d+\.\d+) bpd \+- (\d+\.\d+) \((\d+) time samples/tile\)\n")


def test_command_line_elbo_samples_are_the_time_samples_of_the_printed_elbo(
    model, model_file, images, tmp_path, capsys, monkeypatch
):
    """--elbo_samples=K prints the tiles' discrete-time -ELBO with K time samples per tile: the
    figure and standard error `tiles_elbo_bpd` computes with K = 3 (805.018 +- 16.756 for this
    untrained model), to the printed digits; K = 8, the default, gives 753.158 +- 83.905 and K = 1
    808.606 +- 423.158."""
    monkeypatch.setattr(compression.cli, "load_model", lambda path: model)
    x = [images[i] for i in (3, 9, 12)]
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for path, image in zip(paths, x):
        _save(path, image)
    argv = ["encode", f"--model={model_file}", *paths, "-o", str(tmp_path / "out.vdmz"), "--steps=3"]
    assert run_command_line([*argv, "--elbo_samples=3"]) == 0
    summary = capsys.readouterr().out
    elbo = compression.tiles_elbo_bpd(model, x, 3, num_time_samples=3)
    assert ELBO_LINE.search(summary).groups() == (f"{elbo['bpd']:.3f}", f"{elbo['stderr']:.3f}", "3"), summary


def test_one_image_round_trip_prints_no_standard_error(model, model_file, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compression.cli, "load_model", lambda path: model)
    Image.fromarray(images[5, ..., 0]).save(tmp_path / "one.png")
    out = str(tmp_path / "one.vdmz")
    args = ["encode", f"--model={model_file}", str(tmp_path / "one.png"), "-o", out, "--steps=2", "--elbo_samples=2"]
    assert run_command_line(args) == 0
    summary = capsys.readouterr().out
    assert "-ELBO(T)" in summary and "+-" not in summary and "nan" not in summary, summary
    assert run_command_line(["decode", f"--model={model_file}", out, "-o", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "one.png")), images[5, ..., 0])


@pytest.mark.parametrize("failing", ["save", "replace"])
def test_a_failed_write_keeps_the_decoded_images(
    failing, model, model_file, images, encoded, tmp_path, monkeypatch, capsys
):
    """Writing fails after decoding (disk full, say) while saving the 3rd file or moving the 6th
    into place: every image is still on disk, in the output directory or in a rescue directory."""
    monkeypatch.setattr(compression.cli, "load_model", lambda path: model)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    calls = {"save": 0, "replace": 0}
    output = str(tmp_path / "out")

    def fail_on_call(kind, number, function):
        def wrapped(path, *args):
            # A save inside the output directory (its staging directory); a move into it.
            if os.path.dirname(args[0]) == output if kind == "replace" else path.startswith(output):
                calls[kind] += 1
                if calls[kind] == number:
                    raise OSError(28, "No space left on device")
            return function(path, *args)

        return wrapped

    if failing == "save":
        monkeypatch.setattr(image_files, "write_image", fail_on_call("save", 3, image_files.write_image))
    else:
        monkeypatch.setattr(os, "replace", fail_on_call("replace", 6, os.replace))
    (tmp_path / "images.vdmz").write_bytes(encoded)
    assert run_command_line(["decode", f"--model={model_file}", str(tmp_path / "images.vdmz"), "-o", output]) == 1
    error = capsys.readouterr().err
    assert "No space left on device" in error and len(error.strip().splitlines()) == 1, error
    (rescue,) = os.listdir(tmp_path / "tmp")
    assert str(tmp_path / "tmp" / rescue) in error
    placed = sorted(os.listdir(output))  # complete files only, no staging directory
    assert len(placed) == (0 if failing == "save" else 5)
    assert sorted(placed + os.listdir(tmp_path / "tmp" / rescue)) == sorted(NAMES)
    for i, name in enumerate(NAMES):
        path = os.path.join(output, name) if name in placed else os.path.join(tmp_path / "tmp" / rescue, name)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[i, ..., 0])


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, encoded):
    """Paths for the command line's error matrix, by name."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {"dir": str(root), "missing": str(root / "missing.png"), "missing_vdmz": str(root / "missing.vdmz")}
    paths["missing_keras"] = str(root / "missing.keras")
    paths["missing_newline"] = str(root / "gone\nfile.vdmz")  # the message still fits on one line

    def write(key, name, content):
        paths[key] = str(root / name)
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            content.save(root / name, format="PNG")

    write("good", "good.png", Image.new("L", (8, 8), 7))
    write("palette", "palette.png", Image.new("P", (8, 8)))
    write("grey_alpha", "grey_alpha.png", Image.new("LA", (8, 8)))
    write("rgb", "rgb.png", Image.new("RGB", (8, 8)))
    write("rgba", "rgba.png", Image.new("RGBA", (8, 16)))
    write("newline", "new\nline.png", Image.new("L", (8, 8)))
    write("text", "text.png", b"not an image\n")
    write("empty", "empty.png", b"")
    write("truncated", "truncated.png", open(paths["good"], "rb").read()[:40])
    write("broken_keras", "broken.keras", b"not a zip file")
    write("vdmz", "good.vdmz", encoded)
    write("truncated_vdmz", "truncated.vdmz", encoded[:-7])
    flipped = bytearray(encoded)
    flipped[len(encoded) // 2] ^= 0x10
    write("corrupted_vdmz", "corrupted.vdmz", bytes(flipped))
    taller = bytearray(encoded)
    taller[6] = 16  # the header's height: images of 16x8x1
    write("other_shape_vdmz", "other_shape.vdmz", _recrc(bytes(taller)))
    os.makedirs(root / "cifar_run")
    write("cifar_config", "cifar_run/config.json", b'{"dataset": "cifar10"}')  # a run directory's config
    paths["cifar_run"] = str(root / "cifar_run")
    os.makedirs(root / "occupied" / "image_3.png")  # decode would write image 3 where a directory is
    paths["occupied"] = str(root / "occupied")
    return paths


ENCODE = ["encode", "--model={model}", "{good}", "-o", "{dir}/out.vdmz"]
DECODE = ["decode", "--model={model}", "{vdmz}", "-o", "{dir}/decoded"]
ERRORS = {  # name: (argv, what the message says)
    "missing input": (ENCODE[:2] + ["{missing}"] + ENCODE[3:], "missing.png: no such file"),
    "non-image file": (ENCODE[:2] + ["{text}"] + ENCODE[3:], "not a readable image file"),
    "empty file": (ENCODE[:2] + ["{empty}"] + ENCODE[3:], "the file is empty"),
    "truncated image": (ENCODE[:2] + ["{truncated}"] + ENCODE[3:], "expected an L image (the model's channels)"),
    "palette PNG": (ENCODE[:2] + ["{palette}"] + ENCODE[3:], "got mode P;"),
    "grey+alpha PNG": (ENCODE[:2] + ["{grey_alpha}"] + ENCODE[3:], "got mode LA;"),
    "RGB for a grey model": (ENCODE[:2] + ["{rgb}"] + ENCODE[3:], "got mode RGB;"),
    "RGBA PNG": (ENCODE[:2] + ["{rgba}"] + ENCODE[3:], "got mode RGBA; expected an L image"),
    "grey and RGB, no --model": (["encode", "{good}", "{rgb}"] + ENCODE[3:], "mix grey (L) and RGB images"),
    "RGBA, no --model": (["encode", "{rgba}"] + ENCODE[3:], "got mode RGBA; expected an L or RGB image"),
    "directory as input": (ENCODE[:2] + ["{dir}"] + ENCODE[3:], "is a directory; expected an L image"),
    "newline in a name": (ENCODE[:2] + ["{newline}"] + ENCODE[3:], "without newlines; got 'new\\nline.png'"),
    "encode output is a directory": (ENCODE[:4] + ["{dir}"], "is a directory; expected the name"),
    "encode output under a file": (ENCODE[:4] + ["{good}/out.vdmz"], "is a file, not a directory"),
    "encode, missing --model": (["encode", "--model={missing_keras}"] + ENCODE[2:], "--model must be a .keras"),
    "encode, --model without config": (["encode", "--model={dir}"] + ENCODE[2:], "--model must be a .keras"),
    "encode, run directory of RGB images": (
        ["encode", "--model={cifar_run}"] + ENCODE[2:],
        "got mode L; expected an RGB image (the model's channels)",
    ),
    "encode, broken .keras": (["encode", "--model={broken_keras}"] + ENCODE[2:], "not a .keras file of a vdm_tf"),
    "decode output is a file": (DECODE[:4] + ["{good}"], "is a file; expected a directory"),
    "decode output under a file": (DECODE[:4] + ["{good}/decoded"], "is a file, not a directory"),
    "decode output name is a directory": (DECODE[:4] + ["{occupied}"], "image_3.png is a directory; decode writes"),
    "missing .vdmz": (DECODE[:2] + ["{missing_vdmz}"] + DECODE[3:], "No such file"),
    "missing .vdmz, newline in its name": (DECODE[:2] + ["{missing_newline}"] + DECODE[3:], "No such file"),
    "not a .vdmz": (DECODE[:2] + ["{good}"] + DECODE[3:], "Not a vdm_tf compressed file"),
    "truncated .vdmz": (DECODE[:2] + ["{truncated_vdmz}"] + DECODE[3:], "Truncated file"),
    "corrupted .vdmz": (DECODE[:2] + ["{corrupted_vdmz}"] + DECODE[3:], "CRC-32"),
    ".vdmz of another shape": (
        DECODE[:2] + ["{other_shape_vdmz}"] + DECODE[3:],
        "was coded with a model of 16x8x1 images",
    ),
    "decode, missing --model": (["decode", "--model={missing_keras}"] + DECODE[2:], "--model must be a .keras"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_command_line_rejects_bad_input_in_one_line_before_loading_the_model(
    case, bad_inputs, model_file, monkeypatch, capsys
):
    """Exit status 1, one line naming what was expected, no traceback, and the model (seconds to
    load, TensorFlow's runtime) never loaded: every input is checked first."""
    monkeypatch.setattr(compression.cli, "load_model", lambda path: pytest.fail("loaded the model before checking"))
    template, expected = ERRORS[case]
    argv = [part.format_map(dict(bad_inputs, model=model_file)) for part in template]
    assert run_command_line(argv) == 1
    out, error = capsys.readouterr()
    assert out == "" and "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert expected in error, error
    assert not os.path.exists(os.path.join(bad_inputs["dir"], "out.vdmz"))
    assert not os.path.exists(os.path.join(bad_inputs["dir"], "decoded"))


def test_command_line_reports_a_model_that_does_not_load_in_one_line(bad_inputs, tmp_path, capsys):
    """A .keras file whose configuration reads (so every input check passes) but whose model does not load."""
    import zipfile

    broken = str(tmp_path / "broken.keras")
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("config.json", '{"class_name": "NoSuchModel", "config": {"image_shape": [8, 8, 1]}}')
    argv = ["encode", f"--model={broken}", bad_inputs["good"], "-o", str(tmp_path / "out.vdmz")]
    assert run_command_line(argv) == 1
    out, error = capsys.readouterr()
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert f"--model={broken}: could not load the model" in error, error


# --------------------------------------------------------------------------------------------
# Few images: the seed and the conventional fallback.


def test_one_image_message_is_no_larger_than_its_png_file_plus_the_container(model):
    """With the fallback a message is never larger than the images' own PNG files (Pillow,
    optimize) plus the container's header, size table, names and CRC-32."""
    rng = np.random.default_rng(5)
    for image in [
        rng.integers(0, 256, (33, 65, 1)).astype(np.uint8),
        edge_and_digit_images()[9],
        np.zeros((1, 1, 1), np.uint8),
    ]:
        data = BitsBackCodec(model, num_steps=2).encode(image[None], names=["photo.png"])
        header = read_header(data)
        container = compression._HEADER.size + header.sizes_bytes + header.names_bytes + 4
        assert len(data) <= compression.image_file_bytes(image, optimize=True) + container, (len(data), container)
        np.testing.assert_array_equal(BitsBackCodec(model).decode(data)[0], image)


def test_the_seed_pays_the_initial_bits_and_comes_back_exactly():
    """On Gaussian data (analytic denoiser) the first image's top rows, coded as PNG/WebP at the
    bottom of the stack, are the bits the first pops read: fewer pseudo-random words are spent
    (initial bits) and the file is smaller than without seed; the seed comes back bit-exact."""
    model, data = gaussian_model_and_data()
    x = data.sample(40, seed=3)
    files = {
        seed: BitsBackCodec(model, num_steps=10, batch_size=8, seed=seed, fallback=False).encode(x)
        for seed in (False, True)
    }
    with_seed, without = read_header(files[True]), read_header(files[False])
    assert with_seed.seed_rows == 8 and with_seed.seed_bytes > 0 and without.seed_bytes == 0
    assert with_seed.initial_bits < without.initial_bits - 4 * with_seed.seed_bytes, (
        with_seed.initial_bits,
        without.initial_bits,
    )
    assert len(files[True]) < len(files[False])
    # The file: net codelength + initial bits + the seed's words + header, size table and CRC-32.
    overhead = 8 * (compression._HEADER.size + with_seed.sizes_bytes + 4)
    assert 8 * len(files[True]) == with_seed.net_bits + with_seed.initial_bits + 32 * with_seed.seed_words + overhead
    np.testing.assert_array_equal(BitsBackCodec(model).decode(files[True]), x)
