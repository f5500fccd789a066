"""Messages of few images (the budgeted ramp of format version 4) and the bundled grey model."""

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from compression_helpers import random_denoiser_model, run_command_line
from PIL import Image

from vdm_tf import compression, datasets
from vdm_tf.compression import BitsBackCodec, read_header

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recrc(data):
    body = data[:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


# --------------------------------------------------------------------------------------------
# The plan: every batch's first pops paid by the bits on the stack.


def test_budgeted_ramp_pays_each_batch_from_the_stack_and_codes_every_pixel_once():
    """A 7000-bit seed pays one 16x16 crop of a 32x32x3 tile at 9 bits per dimension (6912 bits),
    not a whole tile (27648); batches then grow with the bits the earlier ones leave, up to the
    batch size, and every pixel below the seed rows is in exactly one crop."""
    sizes, tile, batch_size = [(32, 32)] * 80 + [(7, 45)], (32, 32, 3), 16
    budget = compression._Budget(seed=7000.0, first_pops=9.0, net=3.0)
    plan = compression._tile_plan(sizes, tile, 32, batch_size, budget=budget)
    assert plan[0].shape == (16, 16) and len(plan[0].tiles) == 1
    available, covered = budget.seed, [np.zeros(size, int) for size in sizes]
    for batch in plan:
        dims, count = math.prod(batch.shape) * tile[2], len(batch.tiles)
        smallest = count == 1 and min(batch.shape) < 2 * compression._MIN_CROP  # nothing left to split
        assert count * dims * budget.first_pops <= available or smallest, (batch, available)
        assert count <= batch.padded <= batch_size
        for image, top, left in batch.tiles:
            covered[image][top : top + batch.shape[0], left : left + batch.shape[1]] += 1
        available += budget.net * dims * count
    assert (covered[0] == 0).all() and all((pixels == 1).all() for pixels in covered[1:])
    assert max(len(batch.tiles) for batch in plan) == batch_size  # the ramp reaches full batches
    # Odd border crops split into unequal quarters, still covering each pixel once.
    odd = compression._tile_plan([(4, 4), (9, 13)], (16, 16, 1), 4, 4, budget=compression._Budget(50.0, 8.0, 4.0))
    assert sorted(batch.shape for batch in odd)[:4] == [(4, 6), (4, 7), (5, 6), (5, 7)], odd
    # Without a seed (or in format version 3): batches of 1, 2, 4, ... whole tiles.
    assert [len(batch.tiles) for batch in compression._tile_plan(sizes, tile, 32, batch_size)][:4] == [1, 2, 4, 8]


# --------------------------------------------------------------------------------------------
# The codec on the bundled models.


@pytest.fixture(scope="module")
def photos_model():
    return compression.load_model(compression.default_model_path(3))


def test_a_message_of_patches_pays_almost_no_initial_bits(photos_model):
    """Three 32x32 test patches with the bundled RGB model: the first is the seed (about 2 bits per
    dimension as PNG/WebP), which pays the first crops; the ramp of whole tiles (format version 3)
    dug kilobytes below it. Both decode bit-exactly. (At T = 2 the net codelength is far above a
    useful T's; bench/compression.py measures whole messages at T = 10 and 50.)"""
    patches = datasets.photos_arrays("test")[[0, 100, 200]]
    files = {}
    for budgeted in (True, False):
        codec = BitsBackCodec(photos_model, num_steps=2, fallback=False)
        if not budgeted:
            codec._budget = lambda *args: None  # the version-3 plan; the file is then labelled version 3
        data = codec.encode(patches)
        if not budgeted:
            data = _recrc(data[:4] + (3).to_bytes(2, "little") + data[6:])
        files[budgeted] = data
        np.testing.assert_array_equal(BitsBackCodec(photos_model).decode(data), patches)
    new, old = read_header(files[True]), read_header(files[False])
    assert (new.version, old.version) == (4, 3) and new.seed_bytes == old.seed_bytes > 0
    assert old.initial_bits > 8000, old.initial_bits  # most of one tile's first pops
    assert new.initial_bits <= 0.02 * old.initial_bits, (new.initial_bits, old.initial_bits)
    # The file: net codelength + initial bits + the seed's words + header, size table and CRC-32.
    overhead = 8 * (compression._HEADER.size + new.sizes_bytes + 4)
    assert 8 * len(files[True]) == new.net_bits + new.initial_bits + 32 * new.seed_words + overhead


# --------------------------------------------------------------------------------------------
# The bundled grey model and the command line without --model.


def test_bundled_models_are_package_data_of_their_channels():
    for channels, name in [(1, "photos_grey.keras"), (3, "photos.keras")]:
        path = compression.default_model_path(channels)
        assert os.path.basename(path) == name and os.path.dirname(path) == os.path.join(REPO, "vdm_tf", "models")
        assert os.path.getsize(path) < 1.5e6
        assert compression._model_image_shape(path) == (32, 32, channels)
    assert compression.default_model_path(2) is None
    setup = open(os.path.join(REPO, "setup.py")).read()
    assert '"vdm_tf.models": ["*.keras"]' in setup


def test_grey_images_round_trip_through_the_command_line_without_model(tmp_path, capsys):
    """Grey PNGs of odd sizes, no --model: the bundled grey model (tiles 32x32x1), bits-back
    (--no-fallback), decoded in a separate process to the same pixels."""
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(33), np.arange(65)).astype(np.uint8)  # smooth: a small seed
    images = {"a.png": ramp, "b.png": rng.integers(0, 256, (7, 13), np.uint8), "c.png": ramp[:20, :37]}
    for name, pixels in images.items():
        Image.fromarray(pixels, "L").save(tmp_path / name)
    out = str(tmp_path / "grey.vdmz")
    argv = ["encode", *(str(tmp_path / name) for name in images), "-o", out, "--steps=2", "--elbo_samples=0"]
    assert run_command_line([*argv, "--no-fallback"]) == 0
    assert "(tiles 32x32x1), T=2" in capsys.readouterr().out
    header = read_header(open(out, "rb").read())
    assert header.mode == compression.BITS_BACK and header.image_shape == (32, 32, 1)
    decoded = tmp_path / "decoded"
    run = subprocess.run(
        [sys.executable, "-m", "vdm_tf.compression", "decode", out, "-o", str(decoded)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for name, pixels in images.items():
        np.testing.assert_array_equal(np.asarray(Image.open(decoded / name)), pixels)


def test_decode_without_model_names_the_bundled_model_that_does_not_fit(tmp_path, monkeypatch, capsys):
    """A grey file of an 8x8 model, decoded without --model: one line, before any model loads."""
    data = BitsBackCodec(random_denoiser_model(seed=0), num_steps=1).encode(np.zeros((1, 8, 8, 1), np.uint8))
    path = tmp_path / "digits.vdmz"
    path.write_bytes(data)
    monkeypatch.setattr(compression.cli, "load_model", lambda path: pytest.fail("loaded the model before checking"))
    assert run_command_line(["decode", str(path), "-o", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert "was coded with a model of 8x8x1 images; the bundled model codes 32x32x1 images: pass the encoder's" in error
