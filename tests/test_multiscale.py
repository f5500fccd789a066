"""Multi-scale (Haar) diffusion: the transform, the VLB against quadrature, samples, the model contract.

The Gaussian tests use independent per-pixel Gaussian data of equal std s: its Haar
coefficients are independent Gaussians of std s too (the transform is orthonormal), so each
coefficient has the linear optimal denoiser of tests/gaussian.py at its own group's noise level,
and every expectation of the VLB is a one-dimensional integral computed here by quadrature,
with a NumPy Haar transform written from the definition.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from gaussian import GaussianData, GaussianDenoiser, sigmoid

from vdm_tf import VDM, haar, networks, schedules
from vdm_tf.multiscale import MultiScaleVDM

IMAGE_SHAPE = (4, 4, 1)
LEVELS = 2
END_TIMES = (0.3, 0.55)
STD = 0.1
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def numpy_haar(x, levels):
    """Haar of one image [H, W, C] from the definition: (low, [d_1, .., d_L]), float64."""
    details = []
    for _ in range(levels):
        p00, p01, p10, p11 = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
        x = (p00 + p01 + p10 + p11) / 2
        oriented = [(p00 - p01 + p10 - p11) / 2, (p00 + p01 - p10 - p11) / 2, (p00 - p01 - p10 + p11) / 2]
        details.append(np.stack(oriented, axis=-2).reshape(x.shape[0], x.shape[1], -1))
    return x, details


def block_mean(x, level):
    """Means of [H, W, C] over its 2^level x 2^level blocks: [H / 2^level, W / 2^level, C]."""
    size = 2**level
    height, width, channels = x.shape
    return x.reshape(height // size, size, width // size, size, channels).mean(axis=(1, 3))


class HaarGaussianDenoiser(keras.layers.Layer):
    """The optimal denoiser of every stage of a MultiScaleVDM on Gaussian data with a FixedLinear base.

    Coefficient c of group k is N(m_c, s^2); at time t its group has gamma_k = gamma(t / t_k), so
    eps_hat_c = sigma_k (z_c - alpha_k m_c) / (alpha_k^2 s^2 + sigma_k^2). The model passes
    gamma(t), from which t = (gamma - gamma_min) / (gamma_max - gamma_min).
    """

    def __init__(self, mean, std, levels, end_times, **kwargs):
        super().__init__(**kwargs)
        low, details = numpy_haar(np.asarray(mean, np.float64), levels)
        self.group_means = [tf.constant(m, tf.float32) for m in [low] + details]
        self.std, self.levels, self.end_times = std, levels, tuple(end_times)
        self.height = mean.shape[0]

    def call(self, z_t, gamma_t, training=None):
        stage = (self.height // z_t.shape[1]).bit_length() - 1
        t = (tf.reshape(gamma_t, [-1, 1, 1, 1]) - GAMMA_MIN) / (GAMMA_MAX - GAMMA_MIN)
        low, details = haar.haar(z_t, self.levels - stage)
        groups = [low] + details
        means = self.group_means[:1] + self.group_means[1 + stage :]
        end_times = (1.0,) + self.end_times[stage:]
        eps_hat = []
        for z, mean, end_time in zip(groups, means, end_times):
            gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t / end_time
            alpha, sigma = tf.sqrt(tf.sigmoid(-gamma)), tf.sqrt(tf.sigmoid(gamma))
            eps_hat.append(sigma * (z - alpha * mean) / (alpha**2 * self.std**2 + sigma**2))
        return haar.inverse_haar(eps_hat[0], eps_hat[1:])


def quadrature_vlb_bpd(data, levels, end_times, num=100_001):
    """The multi-scale negative ELBO of the linear denoiser, in bpd, by quadrature in t per group."""
    f_low, f_details = numpy_haar(data.f_mean, levels)
    m_low, m_details = numpy_haar(data.mean, levels)
    # Group k's coefficients: the mean of the discretized data, its variance (Haar weights of a
    # level-j coefficient are +-2^-j over a 2^j x 2^j block), the assumed mean m.
    groups = [(f_low, block_mean(data.f_var, levels), m_low, 1.0)]
    for level, (f_k, m_k, end_time) in enumerate(zip(f_details, m_details, end_times), start=1):
        groups.append((f_k, np.tile(block_mean(data.f_var, level), 3), m_k, end_time))
    diffusion = prior = 0.0
    var_1 = sigmoid(GAMMA_MAX)
    for f_mean, f_var, mean, end_time in groups:
        t = np.linspace(0.0, end_time, num)[:, None]
        gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t / end_time
        dgamma_dt = (GAMMA_MAX - GAMMA_MIN) / end_time
        alpha, sigma = np.sqrt(sigmoid(-gamma)), np.sqrt(sigmoid(gamma))
        a = sigma / (alpha**2 * STD**2 + sigma**2)  # eps_hat = a z - a alpha m
        squared_error = (
            (1 - a * sigma) ** 2 + (a * alpha * (f_mean.ravel() - mean.ravel())) ** 2 + (a * alpha) ** 2 * f_var.ravel()
        )
        diffusion += 0.5 * np.trapezoid(dgamma_dt * squared_error.sum(-1), t[:, 0])
        prior += 0.5 * np.sum((1 - var_1) * (f_mean**2 + f_var) + var_1 - np.log(var_1) - 1)
    nats = diffusion + prior + data.reconstruction_nats(GAMMA_MIN)
    return nats / (data.num_dims * np.log(2.0))


@pytest.fixture(scope="module")
def data():
    # |mean| + 3.5 std < 1: the discretization to 256 levels does not clip the tails.
    return GaussianData(np.random.default_rng(0).uniform(-0.3, 0.3, IMAGE_SHAPE), np.full(IMAGE_SHAPE, STD))


@pytest.fixture(scope="module")
def analytic_model(data):
    denoiser = HaarGaussianDenoiser(data.mean, STD, LEVELS, END_TIMES)
    return MultiScaleVDM(denoiser, schedules.FixedLinear(GAMMA_MIN, GAMMA_MAX), IMAGE_SHAPE, LEVELS, END_TIMES)


# ---------------------------------------------------------------------------------------------
# The Haar transform.


@pytest.mark.parametrize("levels", [1, 3])
def test_haar_is_orthonormal_and_inverts_to_float_rounding(levels):
    x = tf.random.stateless_normal([5, 16, 8, 3], [1, 2])
    low, details = haar.haar(x, levels)
    assert low.shape == (5, 16 >> levels, 8 >> levels, 3)
    assert [d.shape for d in details] == [(5, 16 >> k, 8 >> k, 9) for k in range(1, levels + 1)]
    norm = tf.norm(tf.reshape(x, [5, -1]), axis=1).numpy()
    coefficient_norm = np.sqrt(sum(tf.reduce_sum(tf.square(c), axis=[1, 2, 3]).numpy() for c in [low] + details))
    np.testing.assert_allclose(coefficient_norm, norm, rtol=2e-6)
    relative_error = tf.norm(haar.inverse_haar(low, details) - x) / tf.norm(x)
    assert relative_error < 1e-6
    # A partial reassembly is the level-1 low-pass image.
    np.testing.assert_allclose(haar.inverse_haar(low, details[1:]), haar.haar(x, 1)[0], atol=1e-5)


def test_haar_matches_the_definition():
    x = np.random.default_rng(1).normal(size=(8, 8, 2))
    low, details = haar.haar(tf.constant(x[None], tf.float32), 2)
    expected_low, expected_details = numpy_haar(x, 2)
    np.testing.assert_allclose(low[0], expected_low, atol=1e-5)
    for detail, expected in zip(details, expected_details):
        np.testing.assert_allclose(detail[0], expected, atol=1e-5)


def test_bad_levels_and_end_times_are_rejected():
    with pytest.raises(ValueError, match="divisible by 2\\^levels"):
        haar.haar(tf.zeros([1, 6, 8, 1]), 2)
    with pytest.raises(ValueError, match="end_times must be"):
        MultiScaleVDM(GaussianDenoiser(0.0, 0.1), schedules.FixedLinear(), IMAGE_SHAPE, 2, end_times=(0.6, 0.3))
    with pytest.raises(ValueError, match="levels must be >= 1"):
        MultiScaleVDM(GaussianDenoiser(0.0, 0.1), schedules.FixedLinear(), IMAGE_SHAPE, 0)
    with pytest.raises(ValueError, match="L \\+ 1 = 3"):
        MultiScaleVDM([GaussianDenoiser(0.0, 0.1)] * 2, schedules.FixedLinear(), IMAGE_SHAPE, 2)


# ---------------------------------------------------------------------------------------------
# The VLB and the sampler on Gaussian data.


def test_one_shared_schedule_gives_vdm_numbers_and_samples(data):
    # All groups ending at t = 1: one stage, VDM in the Haar basis with the same draws. The
    # pixel-space linear denoiser of equal-std data is also the Haar-space one.
    vdm = VDM(GaussianDenoiser(data.mean, data.std), schedules.FixedLinear(), IMAGE_SHAPE)
    multiscale = MultiScaleVDM(GaussianDenoiser(data.mean, data.std), schedules.FixedLinear(), IMAGE_SHAPE, 2, (1, 1))
    x = data.sample(64, seed=1)
    expected, terms = vdm.elbo(x, seed=5, num_time_samples=2), multiscale.elbo(x, seed=5, num_time_samples=2)
    for name in ("bpd", "diffusion", "prior", "reconstruction"):
        np.testing.assert_allclose(terms[name], expected[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(multiscale.sample(16, 5, seed=2), vdm.sample(16, 5, seed=2))


def test_vlb_matches_quadrature(analytic_model, data):
    expected = quadrature_vlb_bpd(data, LEVELS, END_TIMES)
    # Independent batches (fresh data and seeds): their means' spread gives the standard error.
    means = [analytic_model.elbo(data.sample(4096, seed=100 + i), seed=i)["bpd"].numpy().mean() for i in range(8)]
    mean, stderr = np.mean(means), np.std(means, ddof=1) / np.sqrt(len(means))
    assert abs(mean - expected) < 4 * stderr + 1e-3, (mean, stderr, expected)
    assert stderr < 0.05


def ancestral_chain_moments(group_means, end_times, num_steps):
    """Exact means and variances of the coefficients z_0 / alpha_0 that the sampler produces.

    With the linear denoiser every ancestral step is affine per coefficient,
    z_s = k z_t + b + sqrt(sigma_s^2 c) noise, so the moments propagate exactly from N(0, 1) at
    each group's end time through the documented grid: stage m (of n, starting at t_s) gets the
    steps b_m + 1 .. b_{m+1}, b_m = m + round((T - n) t_s), equally spaced in time.
    """
    boundaries = (0.0,) + tuple(end_times) + (1.0,)
    starts = boundaries[:-1]
    steps = [m + int(np.round((num_steps - len(starts)) * start)) for m, start in enumerate(starts)] + [num_steps]
    moments = []
    for group, (means, end_time) in enumerate(zip(group_means, (1.0,) + tuple(end_times))):
        mean, var = np.zeros_like(means), 1.0
        for stage in reversed(range(len(starts) if group == 0 else group)):
            times = np.linspace(boundaries[stage], boundaries[stage + 1], steps[stage + 1] - steps[stage] + 1)
            for s, t in zip(times[-2::-1], times[:0:-1]):
                gamma_s, gamma_t = (GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * u / end_time for u in (s, t))
                alpha_s, alpha_t, sigma_t = (
                    np.sqrt(sigmoid(-gamma_s)),
                    np.sqrt(sigmoid(-gamma_t)),
                    np.sqrt(sigmoid(gamma_t)),
                )
                c = -np.expm1(gamma_s - gamma_t)
                a = sigma_t / (alpha_t**2 * STD**2 + sigma_t**2)  # eps_hat = a (z - alpha_t m)
                k = alpha_s / alpha_t * (1 - sigma_t * c * a)
                mean = k * mean + alpha_s / alpha_t * sigma_t * c * a * alpha_t * means
                var = k**2 * var + sigmoid(gamma_s) * c
        alpha_0 = np.sqrt(sigmoid(-GAMMA_MIN))
        moments.append((mean / alpha_0, np.sqrt(var) / alpha_0))
    return moments


def test_samples_follow_the_exact_ancestral_chain_which_converges_to_the_data(analytic_model, data):
    low, details = numpy_haar(data.mean, LEVELS)
    # The sampler's output distribution tends to the data's as the steps grow (O(1 / steps)):
    for _, std in ancestral_chain_moments([low] + details, END_TIMES, 4000):
        assert abs(std / STD - 1) < 0.01
    num, num_steps = 10_000, 200
    samples = analytic_model.sample(num, num_steps=num_steps, seed=7).numpy()
    assert samples.dtype == np.uint8 and samples.shape == (num,) + IMAGE_SHAPE
    f = 2 * (samples.astype(np.float64) + 0.5) / 256 - 1
    sample_low, sample_details = haar.haar(tf.constant(f, tf.float32), LEVELS)
    expected = ancestral_chain_moments([low] + details, END_TIMES, num_steps)
    for group, (mean, std) in zip([sample_low] + sample_details, expected):
        group = group.numpy()
        np.testing.assert_array_less(np.abs(group.mean(0) - mean), 4 * std / np.sqrt(num))
        np.testing.assert_array_less(np.abs(group.std(0) / std - 1), 4 / np.sqrt(2 * num))


def test_the_export_serves_it(analytic_model, data):
    from export.saved_model import ServingModule

    # ServingModule picks a default dequantization from model.sde, which a multi-scale model has
    # not; it only matters for the Score-SDE signatures, which are off.
    module = ServingModule(analytic_model, time_samples=2, dequantization="uniform")
    x = data.sample(3, seed=4)
    served = module.likelihood(tf.constant(x), tf.constant(4, tf.int64))
    terms = analytic_model.elbo(x, seed=4, num_time_samples=2)
    for name in ("bpd", "diffusion", "prior", "reconstruction"):
        np.testing.assert_allclose(served["bpd" if name == "bpd" else f"{name}_bpd"], terms[name], rtol=1e-5)
    samples = module.sample(tf.constant(2), tf.constant(3), tf.constant(0, tf.int64))["images"]
    np.testing.assert_array_equal(samples, analytic_model.sample(2, 3, seed=0))
    with pytest.raises(AttributeError, match="one schedule per Haar group"):
        analytic_model.sde  # noqa: B018


class OnlyAt(keras.layers.Layer):
    """Wraps a denoiser and fails unless called at one resolution: checks StageDenoisers' dispatch."""

    def __init__(self, inner, height, **kwargs):
        super().__init__(**kwargs)
        self.inner, self.height = inner, height

    def call(self, z_t, gamma_t, training=None):
        assert z_t.shape[1] == self.height, (z_t.shape, self.height)
        return self.inner(z_t, gamma_t, training=training)


def test_one_network_per_stage_gives_the_same_model(analytic_model, data):
    denoiser = HaarGaussianDenoiser(data.mean, STD, LEVELS, END_TIMES)
    stage_networks = [OnlyAt(denoiser, IMAGE_SHAPE[0] >> stage) for stage in range(LEVELS + 1)]
    per_stage = MultiScaleVDM(stage_networks, analytic_model.schedule, IMAGE_SHAPE, LEVELS, END_TIMES)
    x = data.sample(64, seed=3)
    np.testing.assert_allclose(per_stage.elbo(x, seed=1)["bpd"], analytic_model.elbo(x, seed=1)["bpd"], rtol=1e-6)
    np.testing.assert_array_equal(per_stage.sample(8, 6, seed=1), analytic_model.sample(8, 6, seed=1))


# ---------------------------------------------------------------------------------------------
# The model contract with trainable networks.


@pytest.fixture(scope="module")
def digits_model():
    net = networks.ScoreUNet(n_layers=1, n_embd=16, fourier_exponents=(3, 4), dropout=0.0)
    model = MultiScaleVDM(net, schedules.LearnedMonotonic(n_features=8), (8, 8, 1), levels=1, seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    return model


def test_a_training_step_updates_the_network_and_the_schedule(digits_model):
    # The schedule's shape trains on the variance objective through VDM.compute_gradients.
    # (Eagerly: tracing the training step takes longer than this whole file may.)
    trained = digits_model.denoiser.conv_out.trainable_variables + digits_model.schedule.trainable_variables
    trained = [v for v in trained if "linear_weight" not in v.path]  # (no gradient while the shape is linear)
    assert len(trained) == 2 + 5  # conv_out kernel and bias; gamma_0, gamma_range and 3 shape weights
    before = [v.numpy().copy() for v in trained]
    digits_model.optimizer.build(digits_model.trainable_variables)
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1)).astype(np.uint8)
    metrics = digits_model.train_step(tf.constant(x))
    assert list(metrics)[0] == "bpd" and np.isfinite(float(metrics["bpd"]))
    assert not [v.path for v, b in zip(trained, before) if np.array_equal(v.numpy(), b)]


def test_config_round_trip(digits_model):
    x = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    restored = MultiScaleVDM.from_config(json.loads(json.dumps(digits_model.get_config())))
    restored.set_weights(digits_model.get_weights())
    assert (restored.levels, restored.end_times) == (1, (0.5,))
    # Called eagerly (the per-example bpd terms at seed 0): tracing would take longer.
    np.testing.assert_allclose(restored(x)["bpd"], digits_model(x)["bpd"], rtol=1e-6)
    stage_networks = [networks.ScoreUNet(n_layers=1, n_embd=16) for _ in range(2)]
    per_stage = MultiScaleVDM(stage_networks, schedules.FixedLinear(), (8, 8, 1), levels=1, end_times=(0.4,))
    assert len(per_stage.trainable_variables) == 2 * len(stage_networks[0].trainable_variables)
    copy = MultiScaleVDM.from_config(json.loads(json.dumps(per_stage.get_config())))
    assert [n.get_config() for n in copy.denoiser.networks] == [n.get_config() for n in stage_networks]
    assert copy.end_times == (0.4,) and len(copy.trainable_variables) == len(per_stage.trainable_variables)
