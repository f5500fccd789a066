"""Bits-back ANS compression: lossless round trips, codelength = discrete-time -ELBO, clear failures."""

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from compression_helpers import GAMMA_0, GAMMA_1, edge_and_digit_images, gaussian_model_and_data, random_denoiser_model
from PIL import Image

from vdm_tf import compression
from vdm_tf.compression import BitsBackCodec, CompressionError, ModelMismatchError, read_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return random_denoiser_model(seed=0)


@pytest.fixture(scope="module")
def images():
    return edge_and_digit_images()


@pytest.fixture(scope="module")
def encoded(model, images):
    """15 images in batches of 6 (the last one padded), T = 4."""
    return BitsBackCodec(model, num_steps=4, batch_size=6).encode(images)


def test_round_trip_is_bit_exact_for_random_edge_and_digit_images(model, images, encoded):
    decoded = BitsBackCodec(model).decode(encoded)  # T, batch size and grid come from the header
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    np.testing.assert_array_equal(decoded, images)
    header = read_header(encoded)
    assert (header.count, header.num_steps, header.batch_size, header.image_shape) == (15, 4, 6, (8, 8, 1))
    # The whole encoder is deterministic (network outputs included): same images, same bytes.
    assert BitsBackCodec(model, num_steps=4, batch_size=6).encode(images) == encoded
    # One image alone (a batch of one) and an untrained model that misses: still lossless.
    single = BitsBackCodec(model, num_steps=2).encode(images[:1])
    np.testing.assert_array_equal(BitsBackCodec(model).decode(single), images[:1])


def test_net_codelength_is_the_discrete_time_negative_elbo():
    """On Gaussian data with its analytic denoiser the discrete-time -ELBO is known in closed form.

    512 images of 64 pixels: the Monte-Carlo spread of the codelength (latent samples) and of the
    data's own -ELBO around its expectation (image samples) are each about 0.2%, well inside 1%.
    """
    model, data = gaussian_model_and_data()
    num_steps, batch_size = 50, 256
    x = data.sample(512, seed=1)
    codec = BitsBackCodec(model, num_steps=num_steps, batch_size=batch_size)
    encoded = codec.encode(x)
    header = read_header(encoded)
    gammas = model.schedule(tf.range(num_steps + 1, dtype=tf.float32) / num_steps).numpy().astype(np.float64)
    expected = data.vlb_bpd(GAMMA_0, GAMMA_1, gammas)
    net = header.net_bits / x.size
    assert abs(net - expected) < 0.01 * expected, (net, expected)
    # The file: net codelength + initial bits + header (fixed size without names) + CRC.
    assert 8 * len(encoded) == header.net_bits + header.initial_bits + 8 * (compression._HEADER.size + 4)
    # The initial bits are those of the first batch's first pops, z_0 ~ q(z_0 | x) and z_1 ~ q(z_1 | z_0),
    # each about log2(std / delta * sqrt(2 pi e)) bits per dimension (std / delta = latent_bins for z_1,
    # latent_bins / sqrt(c_1) for z_0 on its finer grid): paid once, not once per batch (two batches here).
    c_1 = -math.expm1(gammas[0] - gammas[1])
    pops = math.log2(codec.latent_bins**2 / math.sqrt(c_1) * 2 * math.pi * math.e)
    assert 0.5 * batch_size * 64 * pops < header.initial_bits < batch_size * 64 * pops
    # The -ELBO helper of the command line and the benchmark agrees with the closed form.
    elbo = compression.discrete_elbo_bpd(model, x[:256], num_steps, num_time_samples=2, batch_size=256)
    assert abs(elbo["bpd"] - expected) < 4 * elbo["stderr"], (elbo["bpd"], elbo["stderr"], expected)


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
    bottom = bytearray(encoded)
    bottom[compression._HEADER.size] ^= 0x01
    with pytest.raises(CompressionError, match="did not end on the initial stack"):
        codec.decode(_recrc(bytes(bottom)))
    with pytest.raises(ModelMismatchError, match="different model"):
        BitsBackCodec(random_denoiser_model(seed=1)).decode(encoded)
    version = bytearray(encoded)
    version[4] = 9
    with pytest.raises(CompressionError, match="Format version 9"):
        codec.decode(_recrc(bytes(version)))
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(images.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="names must be 15 strings"):
        codec.encode(images, names=["a.png"])


def test_command_line_decodes_in_another_process(model, images, tmp_path, capsys):
    """Encode with the command line here, decode with it in a fresh Python process: same pixels, names."""
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    paths = []
    for i, image in enumerate(images[3:9]):
        paths.append(str(tmp_path / f"image_{i}.png"))
        Image.fromarray(image[..., 0]).save(paths[-1])
    out = str(tmp_path / "images.vdmz")
    args = ["encode", f"--model={model_path}", *paths, "-o", out, "--steps=3", "--batch_size=4", "--elbo_samples=0"]
    assert compression.main(args) == 0
    summary = capsys.readouterr().out
    assert "6 images 8x8x1, T=3" in summary and "net" in summary and "PNG" in summary, summary
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    decoded = tmp_path / "decoded"
    command = [sys.executable, "-m", "vdm_tf.compression", "decode", f"--model={model_path}", out, "-o", str(decoded)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for i, image in enumerate(images[3:9]):
        np.testing.assert_array_equal(np.asarray(Image.open(decoded / f"image_{i}.png")), image[..., 0])
    # An RGB file for a grayscale model: a clear error, exit status 1.
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    assert compression.main(["encode", f"--model={model_path}", str(tmp_path / "rgb.png"), "-o", out]) == 1
    assert "mode RGB" in capsys.readouterr().err
