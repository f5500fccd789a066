"""Pixel encoding, input checks and the discretized decoder p(x | z_0)."""

import numpy as np
import pytest
import tensorflow as tf

from vdm_tf import images


def test_encode_is_bin_centres_and_decode_inverts_it():
    x = np.arange(256, dtype=np.uint8)
    f = images.encode(x).numpy()
    np.testing.assert_allclose(f, 2 * (x + 0.5) / 256 - 1, atol=1e-7)
    assert f.min() > -1 and f.max() < 1
    np.testing.assert_array_equal(images.decode(f).numpy(), x)
    # Anything within half a bin of a centre decodes to that value; outside [-1, 1] clips.
    np.testing.assert_array_equal(images.decode(f + 0.99 / 256).numpy(), x)
    np.testing.assert_array_equal(images.decode(tf.constant([-3.0, 3.0])).numpy(), [0, 255])


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (np.zeros((2, 8, 8, 1), np.float32), TypeError, "got dtype float32"),
        (np.full((2, 8, 8, 1), 300), ValueError, "got values in 300..300"),
        (np.full((2, 8, 8, 1), -1), ValueError, "values in 0..255"),
        (np.zeros((2, 8, 8), np.uint8), ValueError, "got shape (2, 8, 8)"),
        (np.zeros((2, 8, 8, 3), np.uint8), ValueError, "got shape (2, 8, 8, 3)"),
        (tf.zeros((2, 8, 8, 1), tf.int32), TypeError, "int32 tensor"),
    ],
)
def test_check_images_names_the_expected_form(bad, error, words):
    with pytest.raises(error, match="uint8 with shape \\[N, 8, 8, 1\\] and values in 0..255") as info:
        images.check_images(bad, (8, 8, 1))
    assert words in str(info.value)


def test_check_images_accepts_integers_in_range():
    checked = images.check_images(np.full((3, 8, 8, 1), 255, np.int64), (8, 8, 1))
    assert checked.dtype == tf.uint8 and checked.shape == (3, 8, 8, 1)


def numpy_log_probs(z_0, gamma_0):
    """log p(x = k | z_0) for every k, computed directly from VDM eq. (22-23)."""
    centres = 2 * (np.arange(256) + 0.5) / 256 - 1
    gamma_0 = np.asarray(gamma_0)[..., None]
    z_rescaled = z_0[..., None] / np.sqrt(1 / (1 + np.exp(gamma_0)))
    logits = -0.5 * np.exp(-gamma_0) * (z_rescaled - centres) ** 2
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_reconstruction_nll_is_the_softmax_cross_entropy():
    rng = np.random.default_rng(0)
    z_0 = rng.uniform(-1, 1, (3, 2, 2, 1))
    x = rng.integers(0, 256, (3, 2, 2, 1))
    gamma_0 = np.array([-8.0, -10.0, -12.0])
    expected = -np.take_along_axis(numpy_log_probs(z_0, gamma_0[:, None, None, None]), x[..., None], -1)
    nll = images.reconstruction_nll(x, tf.constant(z_0, tf.float32), tf.constant(gamma_0, tf.float32))
    np.testing.assert_allclose(nll.numpy(), expected.sum(axis=(1, 2, 3, 4)), rtol=1e-3)


def full_softmax_nll(x, z_0, gamma_0):
    """Per-pixel cross entropy of all 256 `decoder_logits`, in TensorFlow: the windows' reference."""
    logits = images.decoder_logits(z_0, gamma_0)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(x, tf.int32), logits=logits)


# A grid of gamma_0, and each window's largest gamma_0 (where it leaves out the most).
WINDOW_EDGES = [round(-np.log(min_snr) - 1e-3, 4) for _, min_snr in images.NLL_WINDOWS]


@pytest.mark.parametrize("gamma_0", np.linspace(-13.5, -4.0, 20).round(3).tolist() + WINDOW_EDGES)
def test_reconstruction_nll_windows_are_the_full_softmax(gamma_0):
    # One pixel per example. z_0 / alpha_0 halfway between two bins (the most mass outside a
    # window), on bin centres, at random, at the ends of [-1, 1] and beyond it (the window
    # must stay inside 0..255); x the nearest value, a neighbour or anywhere.
    rng = np.random.default_rng(0)
    centres = 2 * (np.arange(256) + 0.5) / 256 - 1
    rescaled = np.concatenate([
        centres[:-1] + 1 / 256, centres, rng.uniform(-1, 1, 256),
        [-1.0, 1.0, -1.0 - 1 / 256, 1.0 + 1 / 256, -1.05, 1.05, -1.3, 1.3, -3.0, 3.0],
    ])
    nearest = np.clip(np.round((rescaled + 1) * 128 - 0.5), 0, 255).astype(np.int64)
    x = np.where(rng.uniform(size=rescaled.size) < 0.5, nearest, rng.integers(0, 256, rescaled.size))
    x = np.clip(x + (np.arange(rescaled.size) % 7 == 0), 0, 255).astype(np.uint8).reshape(-1, 1, 1, 1)
    alpha_0 = np.sqrt(1 / (1 + np.exp(gamma_0)))
    z_0 = tf.constant((alpha_0 * rescaled).reshape(-1, 1, 1, 1), tf.float32)
    gamma = tf.constant(gamma_0, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([z_0, gamma])
        windowed = images.reconstruction_nll(x, z_0, gamma)
        full = tf.reshape(full_softmax_nll(x, z_0, gamma), [-1])
    # Both in float32 from the same z_0 / alpha_0: they differ by rounding only (a window one
    # value too narrow leaves out exp(-8) of a pixel's normaliser at some gamma_0 of this grid).
    np.testing.assert_allclose(windowed.numpy(), full.numpy(), rtol=1e-6, atol=2e-6)
    for variable in (z_0, gamma):  # each z_0's gradient sums terms of the scale of the largest one
        expected = tape.gradient(full, variable).numpy()
        atol = 1e-6 * np.abs(expected).max()
        np.testing.assert_allclose(tape.gradient(windowed, variable).numpy(), expected, rtol=1e-5, atol=atol)


def test_reconstruction_nll_window_follows_the_smallest_snr_of_the_batch():
    # Per-example gamma_0: the example with the widest decoder sets the window for all.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    gamma_0 = tf.constant([-13.3, -7.0])
    alpha_0 = tf.sqrt(tf.sigmoid(-gamma_0))[:, None, None, None]
    z_0 = alpha_0 * (images.encode(x) + 1.0 / 256)  # halfway between two bins
    expected = tf.reduce_sum(full_softmax_nll(x, z_0, gamma_0[:, None, None, None]), axis=[1, 2, 3])
    np.testing.assert_allclose(images.reconstruction_nll(x, z_0, gamma_0).numpy(), expected.numpy(), rtol=1e-6)


def test_argmax_is_the_most_likely_value():
    rng = np.random.default_rng(1)
    z_0 = tf.constant(rng.uniform(-1.2, 1.2, (4, 3, 3, 2)), tf.float32)
    argmax = images.decoder_argmax(z_0, -9.0).numpy()
    np.testing.assert_array_equal(argmax, np.argmax(images.decoder_logits(z_0, -9.0).numpy(), -1))


def test_decoder_sample_follows_the_decoder_distribution():
    # z_0 between two bins with a wide decoder: several values are likely.
    gamma_0 = -9.5
    z_0 = tf.fill((20000, 1, 1, 1), float(images.encode(100)) + 0.4 * 2 / 256)
    samples = images.decoder_sample(z_0, gamma_0, seed=tf.constant([1, 2])).numpy().ravel()
    probs = np.exp(numpy_log_probs(z_0.numpy()[0, 0, 0, 0], gamma_0))
    counts = np.bincount(samples, minlength=256)
    likely = probs > 0.01
    assert likely.sum() >= 3
    expected = probs[likely] * samples.size
    chi2 = np.sum((counts[likely] - expected) ** 2 / expected)
    assert chi2 < 30, (counts[likely], expected)  # ~ likely.sum() degrees of freedom
    np.testing.assert_array_equal(samples, images.decoder_sample(z_0, gamma_0, tf.constant([1, 2])).numpy().ravel())


DIGIT_LEVELS = np.round(np.arange(17) * 255 / 16).astype(np.int64)  # the embedded digits' alphabet


def numpy_alphabet_log_probs(z_0, gamma_0, values):
    """log((1 - F) softmax over `values` + F / 256), written out in NumPy."""
    logits = -0.5 * np.exp(-gamma_0) * (z_0 / np.sqrt(1 / (1 + np.exp(gamma_0))) - (2 * (values + 0.5) / 256 - 1)) ** 2
    inside = np.zeros(256)
    inside[values] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return np.log((1 - images.ALPHABET_FLOOR) * inside + images.ALPHABET_FLOOR / 256)


def test_a_decoder_alphabet_puts_the_mass_on_its_values_and_keeps_a_floor():
    rng = np.random.default_rng(2)
    z_0 = rng.uniform(-1.1, 1.1, (6, 2, 2, 1))
    gamma_0 = -8.5
    log_p = images.decoder_logits(tf.constant(z_0, tf.float32), gamma_0, DIGIT_LEVELS).numpy().astype(np.float64)
    np.testing.assert_allclose(np.exp(log_p).sum(-1), 1.0, rtol=1e-5)  # log p itself: normalised
    expected = np.stack([numpy_alphabet_log_probs(z, gamma_0, DIGIT_LEVELS) for z in z_0.ravel()]).reshape(log_p.shape)
    inside = images.alphabet_mask(DIGIT_LEVELS)
    np.testing.assert_allclose(log_p[..., inside], expected[..., inside], atol=2e-4)
    np.testing.assert_allclose(log_p[..., ~inside], np.log(images.ALPHABET_FLOOR / 256), rtol=1e-6)
    # The NLL of in-alphabet pixels, and the argmax, use the alphabet's values only.
    x = DIGIT_LEVELS[rng.integers(0, 17, z_0.shape)]
    nll = images.reconstruction_nll(x, tf.constant(z_0, tf.float32), gamma_0, DIGIT_LEVELS).numpy()
    np.testing.assert_allclose(nll, -np.take_along_axis(expected, x[..., None], -1).sum((1, 2, 3, 4)), rtol=1e-4)
    argmax = images.decoder_argmax(tf.constant(z_0, tf.float32), gamma_0, DIGIT_LEVELS).numpy()
    np.testing.assert_array_equal(argmax, np.argmax(expected, -1))
    assert set(np.unique(argmax)) <= set(DIGIT_LEVELS)
    samples = images.decoder_sample(tf.fill((2000, 1, 1, 1), 0.03), gamma_0, tf.constant([3, 4]), DIGIT_LEVELS)
    assert set(np.unique(samples.numpy())) <= set(DIGIT_LEVELS)


def test_grid_places_each_image_in_reading_order():
    batch = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(2, 1).repeat(3, 2)
    picture = images.grid(batch, columns=3, padding=1)
    assert picture.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert picture[1, 1, 0] == 0 and picture[1, 5, 0] == 1 and picture[4, 1, 0] == 3 and picture[4, 5, 0] == 4
    assert picture[4, 9, 0] == 0 and picture[0].max() == 0  # empty slot and padding stay black
