"""Training the VDM: the variance objective's gradients, a short run on digits, saving, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_schedules import randomised_monotonic

import vdm_tf

IMAGE_SHAPE = (8, 8, 1)


def tiny_model(schedule=None, dropout=0.0, **kwargs):
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=32, dropout=dropout)
    return vdm_tf.VDM(denoiser, schedule or vdm_tf.schedules.LearnedLinear(), IMAGE_SHAPE, **kwargs)


def tiny_multiscale_model(schedule):
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=32, dropout=0.0)
    return vdm_tf.multiscale.MultiScaleVDM(denoiser, schedule, IMAGE_SHAPE, levels=1, end_times=(0.75,))


@pytest.mark.parametrize("make_model", [tiny_model, tiny_multiscale_model], ids=["vdm", "multiscale"])
def test_variance_objective_gradients_follow_appendix_i2(make_model):
    # The multi-scale model's diffusion loss evaluates the schedule at several clocks per example.
    model = make_model(randomised_monotonic())
    x = vdm_tf.datasets.digits_arrays("train")[:32]
    seed = tf.constant([3, 4], tf.int64)
    grads, _ = model.compute_gradients(x, seed)
    grad_of = dict(zip(map(id, model.trainable_variables), grads))

    with tf.GradientTape(persistent=True) as tape:
        terms, _ = model._loss_terms(x, seed, training=True)
        vlb = tf.reduce_mean(terms["bpd"])
        mean_square = tf.reduce_mean(tf.square(terms["diffusion"]))
    shape_variables = model.schedule.variance_variables
    assert len(shape_variables) == 4
    shape_ids = {id(v) for v in shape_variables}
    other_variables = [v for v in model.trainable_variables if id(v) not in shape_ids]

    # The shape gets d/d eta mean(L_diffusion^2) = mean(2 L dL/d eta), not the VLB gradient ...
    for v, expected, plain in zip(
        shape_variables, tape.gradient(mean_square, shape_variables), tape.gradient(vlb, shape_variables)
    ):
        np.testing.assert_allclose(grad_of[id(v)].numpy(), expected.numpy(), rtol=2e-3, atol=1e-7)
        assert np.linalg.norm(expected.numpy() - plain.numpy()) > 0.1 * np.linalg.norm(plain.numpy())
    # ... while the endpoints and the denoiser get the plain VLB gradient.
    for v, expected in zip(other_variables, tape.gradient(vlb, other_variables)):
        np.testing.assert_allclose(grad_of[id(v)].numpy(), expected.numpy(), rtol=2e-3, atol=1e-7)

    plain_model = make_model(randomised_monotonic(minimize_variance=False))
    plain_model.set_weights(model.get_weights())
    plain_grads, _ = plain_model.compute_gradients(x, seed)
    plain_grad_of = dict(zip(map(id, plain_model.trainable_variables), plain_grads))
    schedule = plain_model.schedule
    plain_shape_variables = [
        schedule.linear_weight, schedule.hidden_weight, schedule.hidden_bias, schedule.output_weight
    ]
    for v, expected in zip(plain_shape_variables, tape.gradient(vlb, shape_variables)):
        np.testing.assert_allclose(plain_grad_of[id(v)].numpy(), expected.numpy(), rtol=2e-3, atol=1e-7)


@pytest.fixture(scope="module")
def trained():
    """A tiny model, its test bpd before training, and after 200 steps on digits."""
    keras.utils.set_random_seed(0)
    model = tiny_model(vdm_tf.schedules.LearnedMonotonic())
    test = vdm_tf.datasets.digits_arrays("test")

    def test_bpd():
        return np.mean([model.elbo(test, seed=s)["bpd"].numpy().mean() for s in range(4)])

    before = test_bpd()
    model.compile(optimizer=keras.optimizers.AdamW(3e-3, beta_2=0.99))
    history = model.fit(vdm_tf.datasets.load("digits", "train", 32, seed=0), steps_per_epoch=200, epochs=1, verbose=0)
    return model, before, test_bpd(), history


def test_short_training_lowers_test_bpd(trained):
    model, before, after, history = trained
    assert set(history.history) == {"bpd", "diffusion", "prior", "reconstruction"}
    assert after < before - 1.0, (before, after)
    assert float(model.optimizer.iterations) == 200


@pytest.mark.parametrize("how", ["keras", "weights"])
def test_save_and_load_keep_the_elbo(trained, tmp_path, how):
    model = trained[0]
    x = vdm_tf.datasets.digits_arrays("test")[:50]
    if how == "keras":
        model.save(tmp_path / "model.keras")
        loaded = keras.models.load_model(tmp_path / "model.keras")
        assert isinstance(loaded.schedule, vdm_tf.schedules.LearnedMonotonic)
    else:
        model.save_weights(tmp_path / "model.weights.h5")
        loaded = tiny_model(vdm_tf.schedules.LearnedMonotonic())
        loaded.load_weights(tmp_path / "model.weights.h5")
    for name, values in model.elbo(x, seed=11).items():
        np.testing.assert_array_equal(loaded.elbo(x, seed=11)[name].numpy(), values.numpy(), err_msg=name)
    np.testing.assert_array_equal(loaded.sample(4, 10, seed=2).numpy(), model.sample(4, 10, seed=2).numpy())


def test_fit_rejects_float_images_with_a_clear_message():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    floats = tf.data.Dataset.from_tensors(tf.zeros((4,) + IMAGE_SHAPE)).repeat()
    with pytest.raises(TypeError, match=r"uint8 with shape \[N, 8, 8, 1\]"):
        model.fit(floats, steps_per_epoch=1, epochs=1, verbose=0)
    wrong_size = tf.data.Dataset.from_tensors(tf.zeros((4, 28, 28, 1), tf.uint8)).repeat()
    with pytest.raises(ValueError, match=r"got shape"):
        model.fit(wrong_size, steps_per_epoch=1, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((2, 8, 8, 1), np.float32), TypeError),
        (np.full((2, 8, 8, 1), 256), ValueError),
        (np.zeros((2, 8, 8, 3), np.uint8), ValueError),
    ],
)
def test_elbo_rejects_bad_images(bad, error):
    with pytest.raises(error, match=r"uint8 with shape \[N, 8, 8, 1\] and values in 0..255"):
        tiny_model().elbo(bad)


def test_sample_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_steps >= 1"):
        tiny_model().sample(4, num_steps=0)


def test_dropout_masks_depend_on_the_step_seed_only():
    """`train_step` reseeds dropout from the step's seed: the same step draws the same masks."""
    model = tiny_model(dropout=0.5)
    for variable in model.denoiser.trainable_variables:  # the output layer starts at zero
        variable.assign(tf.random.stateless_normal(variable.shape, [0, 1]) * 0.1)
    x = vdm_tf.datasets.digits_arrays("train")[:8]
    seed = tf.constant([1, 2], tf.int64)

    def reseeded_terms():
        model._seed_dropout(seed)
        return model._loss_terms(x, seed, training=True)[0]["bpd"].numpy()

    first = reseeded_terms()
    unseeded = model._loss_terms(x, seed, training=True)[0]["bpd"].numpy()  # advances the generators
    assert not np.array_equal(unseeded, first)  # dropout is on: other masks, other numbers
    np.testing.assert_array_equal(reseeded_terms(), first)
    model._seed_dropout(tf.constant([1, 3], tf.int64))
    assert not np.array_equal(model._loss_terms(x, seed, training=True)[0]["bpd"].numpy(), first)


def test_elbo_rejects_an_empty_batch():
    with pytest.raises(ValueError, match=r"uint8 with shape \[N, 8, 8, 1\] and N >= 1; got an empty batch"):
        tiny_model().elbo(np.zeros((0, 8, 8, 1), np.uint8))
