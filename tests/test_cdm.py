"""Classification Diffusion Models: both theorems on Gaussian data, samplers, training on a 2-D mixture."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from gaussian import BIN_CENTRES, GaussianData, GaussianDenoiser
from scipy.special import logsumexp

from export import saved_model
from trainers import configs, train
from vdm_tf import VDM, datasets, images, samplers, schedules, seeding
from vdm_tf.cdm import CDM
from vdm_tf.networks.noise_level_classifier import NoiseLevelClassifier

IMAGE_SHAPE = (4, 4, 1)
# |mean| + 4 std < 1: the discretization to 256 values does not clip the tails.
MEAN = np.linspace(-0.4, 0.4, 16).reshape(IMAGE_SHAPE)
STD = np.linspace(0.05, 0.14, 16).reshape(IMAGE_SHAPE)
LEVELS = 50
GAMMA_MIN, GAMMA_MAX = -10.0, 8.0


def level_moments(num_levels):
    """alpha_t^2 and sigma_t^2 of the levels 0 .. T + 1 of FixedLinear(GAMMA_MIN, GAMMA_MAX), float64."""
    gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * np.arange(1, num_levels + 1) / num_levels
    alpha2 = np.concatenate([[1.0], 1 / (1 + np.exp(gamma)), [0.0]])
    return alpha2, 1.0 - alpha2


class GaussianLevelClassifier(keras.layers.Layer):
    """The Bayes noise-level classifier of data N(MEAN, STD^2): logit_t = log p_t(z), uniform levels.

    p_t = N(alpha_t MEAN, alpha_t^2 STD^2 + sigma_t^2) per pixel: N(MEAN, STD^2) at t = 0 and
    N(0, 1) at t = T + 1. `scale` (a weight, 0: exact) perturbs every logit by
    scale * t / (T + 1) * ||z||^2, to see that the training loss is lowest at the exact classifier.
    """

    def __init__(self, num_levels, **kwargs):
        super().__init__(**kwargs)
        alpha2, sigma2 = level_moments(num_levels)
        shape = (-1, 1, 1, 1)
        self.means = tf.constant(np.sqrt(alpha2).reshape(shape) * MEAN, tf.float32)
        self.variances = tf.constant(alpha2.reshape(shape) * STD**2 + sigma2.reshape(shape), tf.float32)
        self.ramp = tf.constant(np.arange(num_levels + 2) / (num_levels + 1), tf.float32)
        self.scale = self.add_weight(name="scale", shape=(), initializer="zeros")

    def call(self, z, training=None):
        residual = z[:, None] - self.means  # [N, T + 2, H, W, C]
        log_density = -0.5 * tf.square(residual) / self.variances - 0.5 * tf.math.log(2 * math.pi * self.variances)
        squared_norm = tf.reduce_sum(tf.square(z), axis=[1, 2, 3])[:, None]
        return tf.reduce_sum(log_density, axis=[2, 3, 4]) + self.scale * self.ramp * squared_norm


@pytest.fixture(scope="module")
def gaussian_cdm():
    return CDM(GaussianLevelClassifier(LEVELS), schedules.FixedLinear(GAMMA_MIN, GAMMA_MAX), IMAGE_SHAPE, LEVELS)


def test_theorem_3_1_the_bayes_classifier_gives_the_optimal_denoiser(gaussian_cdm):
    """On the levels' gammas the classifier's gradient is the MSE-optimal denoiser; in between,
    the interpolated denoiser stays within 1% of it (levels 0.37 apart in gamma)."""
    reference = GaussianDenoiser(MEAN, STD)
    z = tf.random.stateless_normal((4, *IMAGE_SHAPE), (1, 2))
    on_grid = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * np.array([1, 7, 25, LEVELS]) / LEVELS
    between = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * np.array([0.3, 7.5, 25.5, 40.2]) / LEVELS
    for gammas, tolerance in ((on_grid, 1e-5), (between, 1e-2)):
        gamma = tf.constant(gammas, tf.float32)
        expected = reference(z, gamma).numpy()
        error = np.abs(gaussian_cdm.denoiser(z, gamma).numpy() - expected).max()
        assert error < tolerance * np.abs(expected).max(), (gammas, error)
    # Pure noise: eps = z exactly.
    np.testing.assert_allclose(gaussian_cdm.denoiser(z, tf.constant(np.inf)), z, atol=1e-6)


def test_theorem_3_2_one_step_log_likelihood_is_the_exact_density(gaussian_cdm):
    z0 = (MEAN + STD * np.random.default_rng(0).standard_normal((5, *IMAGE_SHAPE))).astype(np.float32)
    exact = (-0.5 * ((z0 - MEAN) / STD) ** 2 - 0.5 * np.log(2 * np.pi * STD**2)).reshape(5, -1).sum(-1)
    np.testing.assert_allclose(gaussian_cdm.one_step_log_likelihood(z0), exact, atol=1e-3 * STD.size)


def test_one_step_bpd_is_the_dequantised_density_plus_7(gaussian_cdm):
    """E[bpd] over discretized Gaussian images, in closed form: f = 2 (x + u) / 256 - 1 is the bin
    centre plus U(-1/256, 1/256), so E (f - mu)^2 = var + (mean - mu)^2 + (2/256)^2 / 12."""
    data = GaussianData(MEAN, STD)
    x = data.sample(2000, seed=1)
    bpd = gaussian_cdm.one_step_bpd(x, seed=5).numpy()
    second_moment = data.f_var + (data.f_mean - MEAN) ** 2 + (2 / 256) ** 2 / 12
    nats = np.sum(0.5 * np.log(2 * np.pi * STD**2) + second_moment / (2 * STD**2))
    expected = nats / (STD.size * np.log(2)) + 7
    assert abs(bpd.mean() - expected) < 4 * bpd.std() / np.sqrt(bpd.size), (bpd.mean(), expected)
    # One image near the mean, 2000 dequantisation draws: the within-bin noise's (2/256)^2 / 12
    # term is 12 standard errors (bin centres instead of x + u would fail).
    x = np.repeat(images.decode(tf.constant(MEAN, tf.float32)).numpy()[None], 2000, axis=0)
    bpd = gaussian_cdm.one_step_bpd(x, seed=8).numpy()
    second_moment = (images.encode(x[0]).numpy() - MEAN) ** 2 + (2 / 256) ** 2 / 12
    nats = np.sum(0.5 * np.log(2 * np.pi * STD**2) + second_moment / (2 * STD**2))
    expected = nats / (STD.size * np.log(2)) + 7
    assert abs(bpd.mean() - expected) < 4 * bpd.std() / np.sqrt(bpd.size), (bpd.mean(), expected)
    # Same seed, same numbers; `elbo` is the same number averaged over dequantisation draws.
    np.testing.assert_array_equal(gaussian_cdm.one_step_bpd(x[:7], seed=5), gaussian_cdm.one_step_bpd(x[:7], seed=5))
    np.testing.assert_allclose(gaussian_cdm.elbo(x[:7], seed=5)["bpd"], gaussian_cdm.one_step_bpd(x[:7], seed=5))
    assert gaussian_cdm.elbo(x[:7], seed=5, num_time_samples=3)["bpd"].shape == (7,)
    assert not np.allclose(gaussian_cdm.one_step_bpd(x[:7], seed=6), gaussian_cdm.one_step_bpd(x[:7], seed=5))


def test_training_loss_is_lowest_at_the_bayes_classifier(gaussian_cdm):
    """Perturbing the exact classifier in either direction raises the loss (same randomness)."""
    x = tf.constant(GaussianData(MEAN, STD).sample(2048, seed=2))
    seed = tf.constant([3, 4], tf.int64)

    loss_terms = tf.function(lambda: gaussian_cdm._loss_terms(x, seed, training=True)[0])

    def loss(scale):
        gaussian_cdm.classifier.scale.assign(scale)
        return {name: float(tf.reduce_mean(value)) for name, value in loss_terms().items()}

    at_optimum, above, below = loss(0.0), loss(0.05), loss(-0.05)
    gaussian_cdm.classifier.scale.assign(0.0)
    for perturbed in (above, below):
        assert perturbed["mse"] > at_optimum["mse"] and perturbed["cross_entropy"] > at_optimum["cross_entropy"]
    # mse is a mean over pixels on levels 1 .. T: below 1 (the error of eps_hat = 0), above 0.
    assert 0.05 < at_optimum["mse"] < 1.0


def test_ancestral_sampler_with_the_cdm_denoiser_is_the_vdm_one(gaussian_cdm):
    """On the level grid (num_steps = T) CDM's samples are those of a VDM with the analytic
    denoiser, to within one pixel value; they reproduce the data's moments."""
    vdm = VDM(GaussianDenoiser(MEAN, STD), schedules.FixedLinear(GAMMA_MIN, GAMMA_MAX), IMAGE_SHAPE)
    ours = gaussian_cdm.sample(1000, num_steps=LEVELS, seed=3).numpy().astype(int)
    theirs = vdm.sample(1000, num_steps=LEVELS, seed=3).numpy().astype(int)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01
    data = GaussianData(MEAN, STD)
    f = BIN_CENTRES[ours]
    standard_error = np.sqrt(data.f_var / len(f))
    assert np.all(np.abs(f.mean(0) - data.f_mean) < 4.5 * standard_error)
    # A sanity bound, not the tight check (that is the paired one above): with T = LEVELS steps the
    # ancestral sampler itself shrinks every pixel's std by 5-11% (each step ignores the posterior
    # variance of x given z_t), far beyond the estimates' 2.2% noise.
    assert np.abs(f.std(0) / np.sqrt(data.f_var) - 1).max() < 0.15


def test_ode_sampler_runs_on_the_cdm(gaussian_cdm):
    """The probability-flow ODE through the interpolated CDM score, against the exact flow (a VDM
    with the analytic denoiser) from the same z_1: the exact flow's 2000 samples have the moments
    of N(MEAN, STD^2) to within 4.5 standard errors (the std's is 1.6%), and the CDM's are the same
    samples drawn 2-4% towards the mean: the error of interpolating between 50 levels (1.5% with
    100 levels, 0.6% with 200). Being paired, that ratio has almost no sampling noise."""
    exact_flow = VDM(GaussianDenoiser(MEAN, STD), schedules.FixedLinear(GAMMA_MIN, GAMMA_MAX), IMAGE_SHAPE)
    exact, _ = samplers.ode_sample_latents(exact_flow, 2000, seed=4, rtol=1e-3, atol=1e-3)
    x_hat, nfe = samplers.ode_sample_latents(gaussian_cdm, 2000, seed=4, rtol=1e-3, atol=1e-3)
    exact, x_hat = exact.numpy(), x_hat.numpy()
    assert int(nfe) > 10
    for samples in (exact, x_hat):
        assert np.all(np.abs(samples.mean(0) - MEAN) < 4.5 * STD / np.sqrt(len(samples)))
    assert np.all(np.abs(exact.std(0) / STD - 1) < 4.5 / np.sqrt(2 * len(exact)))
    ratio = x_hat.std(0) / exact.std(0)
    assert np.all((ratio > 0.95) & (ratio < 1.0)), ratio


# ---------------------------------------------------------------------------------------------
# Training on a 2-D Gaussian mixture (points as 1 x 1 x 2 images).

MIXTURE_MEANS = np.array([[-0.45, -0.3], [0.4, -0.35], [0.0, 0.45]])
MIXTURE_STDS = np.array([0.12, 0.15, 0.2])
TOY_LEVELS = 10


def mixture_sample(num, seed):
    rng = np.random.default_rng(seed)
    component = rng.integers(0, 3, num)
    return MIXTURE_MEANS[component] + MIXTURE_STDS[component, None] * rng.standard_normal((num, 2))


def mixture_log_density(f):
    squared = np.sum((f[:, None, :] - MIXTURE_MEANS) ** 2, axis=-1) / MIXTURE_STDS**2
    return logsumexp(-0.5 * squared - np.log(2 * np.pi * MIXTURE_STDS**2 * 3), axis=1)


class MLPClassifier(keras.layers.Layer):
    """Three swish layers and the cumulative-sum head of `NoiseLevelClassifier`, on 2-D points."""

    def __init__(self, num_levels, width=128, **kwargs):
        super().__init__(**kwargs)
        self.hidden = [keras.layers.Dense(width, activation="silu") for _ in range(3)]
        self.head = keras.layers.Dense(num_levels + 2, kernel_initializer="zeros")

    def build(self, z_shape):
        width = 2
        for layer in (*self.hidden, self.head):
            layer.build((None, width))
            width = layer.units

    def call(self, z, training=None):
        h = tf.reshape(z, [-1, 2])
        for layer in self.hidden:
            h = layer(h)
        return tf.cumsum(self.head(h), axis=-1)


@pytest.fixture(scope="module")
def trained_toy():
    keras.utils.set_random_seed(0)
    f = mixture_sample(20_000, seed=0)
    x = np.clip(np.floor((f + 1.0) * 128), 0, 255).astype(np.uint8).reshape(-1, 1, 1, 2)
    model = CDM(MLPClassifier(TOY_LEVELS), schedules.FixedLinear(-6.0, 4.0), (1, 1, 2), TOY_LEVELS, seed=1)
    steps = 600
    learning_rate = keras.optimizers.schedules.CosineDecay(2e-2, steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), steps_per_execution=20)
    test = mixture_sample(2000, seed=1).astype(np.float32).reshape(-1, 1, 1, 2)
    before = model.one_step_log_likelihood(test).numpy()
    data = tf.data.Dataset.from_tensor_slices(x).shuffle(20_000, seed=0).repeat().batch(256)
    history = model.fit(data, steps_per_epoch=steps // 2, epochs=2, verbose=0).history
    return model, test, before, history


def test_training_on_a_2d_mixture_approaches_the_true_log_density(trained_toy):
    """600 steps (batch 256, T = 10): the one-step log-density at 2000 data points goes from 1.91
    nats off on average (the untrained classifier's N(0, I)) to 0.19 nats off (median 0.14, mean
    error -0.03); the test allows 0.35 and 0.15."""
    model, test, before, history = trained_toy
    truth = mixture_log_density(test.reshape(-1, 2).astype(np.float64))
    after = model.one_step_log_likelihood(test).numpy()
    assert np.abs(before - truth).mean() > 1.5
    error = after - truth
    assert np.abs(error).mean() < 0.35 and abs(error.mean()) < 0.15, (np.abs(error).mean(), error.mean())
    assert history["loss"][-1] < history["loss"][0] and set(history) == {"bpd", "loss", "cross_entropy", "mse"}


def test_a_trained_cdm_survives_get_config_and_weights(trained_toy):
    model = trained_toy[0]
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 1, 2), dtype=np.uint8)
    config = keras.saving.serialize_keras_object(model)
    copy = keras.saving.deserialize_keras_object(
        config, custom_objects={"MLPClassifier": MLPClassifier}
    )
    copy.set_weights(model.get_weights())
    np.testing.assert_allclose(copy.one_step_bpd(x, seed=1), model.one_step_bpd(x, seed=1), rtol=1e-6)
    assert not copy.schedule.trainable and len(copy.trainable_variables) == len(model.classifier.trainable_variables)


# ---------------------------------------------------------------------------------------------
# The classifier network, tf.distribute, errors.


def test_noise_level_classifier_network():
    classifier = NoiseLevelClassifier(num_levels=7, n_layers=1, n_embd=32, fourier_exponents=(3, 4))
    z = tf.random.stateless_normal((3, 8, 8, 1), (0, 1))
    logits = classifier(z)
    assert logits.shape == (3, 9)
    np.testing.assert_array_equal(logits, 0.0)  # zero-initialised head: all levels equally likely
    bias = np.arange(9.0) - 4.0  # the dense layer's r_0 .. r_{T+1} with a zero kernel
    classifier.logits.bias.assign(bias)
    np.testing.assert_allclose(classifier(z), np.broadcast_to(np.cumsum(bias), (3, 9)), atol=1e-6)
    copy = NoiseLevelClassifier.from_config(classifier.get_config())
    assert copy(z).shape == (3, 9)
    model = CDM(classifier, schedules.FixedLinear(-13.3, 5.0), (8, 8, 1), num_levels=7)
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    assert np.all(np.isfinite(model.one_step_bpd(x)))


def test_the_noise_mse_gradient_matches_finite_differences():
    """The MSE term differentiates the classifier's input gradient: its weight gradient must be exact.

    A directional derivative of the per-pixel noise MSE along a random direction of all the
    classifier's weights, from nested GradientTapes and from a central difference.
    """
    keras.utils.set_random_seed(0)
    classifier = NoiseLevelClassifier(4, n_layers=1, n_embd=8, fourier_features=False, dropout=0.0, head_channels=8)
    model = CDM(classifier, schedules.FixedLinear(-6.0, 4.0), (4, 4, 1), num_levels=4)
    rng = np.random.default_rng(0)
    variables = classifier.trainable_variables
    for variable in variables:  # away from the zero-initialised head
        variable.assign(variable + 0.3 * rng.standard_normal(variable.shape).astype(np.float32))
    z, eps = (tf.constant(rng.standard_normal((6, 4, 4, 1)), tf.float32) for _ in range(2))
    level = tf.constant([1, 2, 3, 4, 1, 2])

    def mse():
        eps_hat, _ = model.denoiser.predict_noise(z, 0.5, lambda logits: tf.gather(logits, level, batch_dims=1))
        return tf.reduce_mean(tf.square(eps - eps_hat))

    direction = [tf.constant(rng.standard_normal(v.shape), tf.float32) for v in variables]
    with tf.GradientTape() as tape:
        loss = mse()
    gradients = tape.gradient(loss, variables)  # None: the blocks' unused time projections
    analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(gradients, direction) if g is not None)
    start = [tf.identity(v) for v in variables]

    def mse_at(step):
        for variable, value, d in zip(variables, start, direction):
            variable.assign(value + step * d)
        return float(mse())

    numeric = (mse_at(1e-3) - mse_at(-1e-3)) / 2e-3
    np.testing.assert_allclose(analytic, numeric, rtol=0.02)


def test_bad_input_is_rejected_with_the_expected_form(gaussian_cdm):
    with pytest.raises(TypeError, match=r"images must be uint8 with shape \[N, 4, 4, 1\]"):
        gaussian_cdm.one_step_bpd(np.zeros((2, *IMAGE_SHAPE), np.float32))
    with pytest.raises(ValueError, match=r"images must be uint8 with shape \[N, 4, 4, 1\]"):
        gaussian_cdm.one_step_bpd(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"z0 must be float with shape \[N, 4, 4, 1\]"):
        gaussian_cdm.one_step_log_likelihood(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"z0 must be float"):
        gaussian_cdm.one_step_log_likelihood(np.zeros((2, *IMAGE_SHAPE), np.uint8))
    schedule = schedules.FixedLinear(GAMMA_MIN, GAMMA_MAX)
    with pytest.raises(ValueError, match=r"logits of shape \[N, num_levels \+ 2\] = \[N, 12\]"):
        CDM(GaussianLevelClassifier(LEVELS), schedule, IMAGE_SHAPE, num_levels=10)
    with pytest.raises(ValueError, match="num_levels must be a positive"):
        CDM(GaussianLevelClassifier(LEVELS), schedule, IMAGE_SHAPE, num_levels=0)
    with pytest.raises(ValueError, match="num_levels must be a positive"):
        NoiseLevelClassifier(num_levels=0)


def test_replicas_draw_per_example_and_divide_the_loss(gaussian_cdm, monkeypatch):
    """What makes a batch split over replicas train like one device: example i draws its level,
    noise and dequantisation from (seed, global index i) only, and each replica's loss is its
    mean over the replica count (so the sum of the replicas' gradients is the global one)."""
    x = GaussianData(MEAN, STD).sample(64, seed=6)
    seed = seeding.as_seed(7)
    whole, _ = gaussian_cdm._loss_terms(x, seed, False)
    halves = [gaussian_cdm._loss_terms(x[i : i + 32], seed, False, tf.range(i, i + 32), 64)[0] for i in (0, 32)]
    for name, value in whole.items():
        np.testing.assert_allclose(tf.concat([half[name] for half in halves], 0), value, rtol=1e-5, atol=1e-6)
    gaussian_cdm.classifier.scale.assign(0.1)
    (one,), _ = gaussian_cdm.compute_gradients(x, seed)

    class TwoReplicas:
        num_replicas_in_sync = 2

    monkeypatch.setattr(tf.distribute, "get_strategy", lambda: TwoReplicas())
    (two,), _ = gaussian_cdm.compute_gradients(x, seed)
    gaussian_cdm.classifier.scale.assign(0.0)
    assert abs(float(one)) > 1e-3
    np.testing.assert_allclose(two, one / 2, rtol=1e-5)


def test_cdm_preset_trains_evaluates_and_exports_its_one_step_likelihood(tmp_path):
    """The trainer's digits_cdm preset (tiny), its eval through `dataset_bpd` and the export."""
    config = configs.PRESETS["digits_cdm"].replace(
        n_layers=1, n_embd=16, head_channels=16, num_levels=20, batch_size=8,
        train_steps=2, jit_compile=False, checkpoint_every=2, log_every=1, sample_every=100,
    )
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    assert np.isfinite(trainer.train()["loss"])
    model = train.restore_for_inference(str(tmp_path), config)
    assert isinstance(model, CDM)
    digits = datasets.digits_arrays("test")[:3]
    path = saved_model.export_model(model, str(tmp_path / "export"), warmup=False, time_samples=2)
    loaded = tf.saved_model.load(path)
    served = loaded.signatures["one_step_likelihood"](images=tf.constant(digits), seed=tf.constant(5, tf.int64))
    np.testing.assert_allclose(served["bpd"], model.one_step_bpd(digits, seed=5), rtol=1e-5)
    assert set(loaded.signatures["likelihood"](images=tf.constant(digits), seed=tf.constant(0, tf.int64))) == {"bpd"}


def test_cdm_presets_end_their_levels_next_to_pure_noise():
    """Level T of the CDM presets is nearly pure noise (alpha_T^2 < 1e-4), as in the paper's DDPM
    grid: the classifier's denoiser is poor at its top levels by an MSE that scales with alpha_T^2
    (vdm_tf.cdm's docstring; gamma_T = 5 made it 1.7x the VDM's at gamma 5 on digits)."""
    for name in ("digits_cdm", "cifar10_cdm"):
        config = configs.PRESETS[name]
        alpha2_top = float(tf.sigmoid(-config.schedule.gamma_max))
        assert alpha2_top < 1e-4, (name, alpha2_top)
