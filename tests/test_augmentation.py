"""Augmentation with the denoiser conditioned on it."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import vdm_tf
from vdm_tf.augmentation import Augmentation

PERMUTATIONS = list(itertools.permutations(range(3)))


def random_images(n, shape=(6, 6, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def decode(conditioning):
    """(flip, rotation, permutation) of each example from its conditioning vector."""
    flip = conditioning[:, 0] > 0.5
    rotation = np.where(conditioning[:, 1:4].any(1), conditioning[:, 1:4].argmax(1) + 1, 0)
    permutation = np.where(conditioning[:, 4:].any(1), conditioning[:, 4:].argmax(1) + 1, 0)
    return flip, rotation, permutation


def test_conditioning_names_the_transformation_applied():
    x = random_images(64)
    augmented, conditioning = Augmentation(probability=0.8)(tf.constant(x), tf.constant([1, 2]), tf.range(64))
    augmented, conditioning = augmented.numpy(), conditioning.numpy()
    assert conditioning.shape == (64, Augmentation.conditioning_dim) == (64, 9)
    flips, rotations, permutations = decode(conditioning)
    for image, out, flip, rotation, permutation in zip(x, augmented, flips, rotations, permutations):
        expected = image[:, ::-1] if flip else image
        expected = np.rot90(expected, rotation)
        expected = expected[..., list(PERMUTATIONS[permutation])]
        np.testing.assert_array_equal(out, expected)
    identity = ~flips & (rotations == 0) & (permutations == 0)
    np.testing.assert_array_equal(conditioning[identity], 0)  # the identity has zero conditioning
    assert 5 < identity.sum() < 40 and flips.any() and (rotations == 3).any() and (permutations == 5).any()


def test_each_example_draws_by_its_global_index():
    x = random_images(8)
    augmentation = Augmentation(probability=1.0)
    whole, _ = augmentation(tf.constant(x), tf.constant([3, 4]), tf.range(8))
    second_half, _ = augmentation(tf.constant(x[4:]), tf.constant([3, 4]), tf.range(4, 8))
    np.testing.assert_array_equal(whole.numpy()[4:], second_half.numpy())
    unchanged, conditioning = Augmentation(probability=0.0)(tf.constant(x), tf.constant([3, 4]), tf.range(8))
    np.testing.assert_array_equal(unchanged.numpy(), x)
    assert not conditioning.numpy().any()


def test_grayscale_images_skip_channel_swaps():
    x = random_images(16, (6, 6, 1))
    augmented, conditioning = Augmentation(channel_swaps=False, probability=1.0)(tf.constant(x), 0, tf.range(16))
    assert augmented.shape == x.shape and not conditioning.numpy()[:, 4:].any()


def conditioned_model(**kwargs):
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=64, dropout=0.0, conditioning_dim=9)
    return vdm_tf.VDM(denoiser, vdm_tf.schedules.LearnedLinear(), (6, 6, 3), augmentation=Augmentation(), **kwargs)


def test_denoiser_conditioning_defaults_to_zeros_and_matters():
    net = conditioned_model().denoiser
    for v in net.weights:
        v.assign(v + tf.random.stateless_normal(v.shape, [0, 1], stddev=0.05))
    z, gamma = tf.random.stateless_normal([4, 6, 6, 3], [1, 1]), tf.fill([4], -3.0)
    omitted = net(z, gamma).numpy()
    np.testing.assert_array_equal(net(z, gamma, conditioning=tf.zeros([4, 9])).numpy(), omitted)
    assert np.abs(net(z, gamma, conditioning=tf.ones([4, 9])).numpy() - omitted).max() > 1e-3


def test_model_trains_with_augmentation_and_scores_the_plain_data(tmp_path):
    model = conditioned_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(tf.data.Dataset.from_tensors(random_images(8)).repeat(), steps_per_epoch=2, epochs=1, verbose=0)
    x = random_images(8, seed=1)
    terms = model.elbo(x, seed=5)
    # Not training: no augmentation, zero conditioning -- the same numbers as calling the
    # denoiser without conditioning.
    plain = vdm_tf.VDM(model.denoiser, model.schedule, (6, 6, 3))
    np.testing.assert_allclose(plain.elbo(x, seed=5)["bpd"].numpy(), terms["bpd"].numpy(), rtol=1e-6)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.augmentation.get_config() == model.augmentation.get_config()
    np.testing.assert_array_equal(loaded.elbo(x, seed=5)["bpd"].numpy(), terms["bpd"].numpy())


def test_mismatched_conditioning_is_a_clear_error():
    with pytest.raises(ValueError, match="conditioning_dim=9"):
        vdm_tf.VDM(vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=32), vdm_tf.schedules.FixedLinear(), (6, 6, 3),
                   augmentation=Augmentation())
