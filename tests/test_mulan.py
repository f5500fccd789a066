"""MuLAN (vdm_tf.models.mulan) against closed forms: the diffusion VLB of Gaussian data with
per-pixel schedules against quadrature, the latent's KL, the reduction to VDM, monotone schedules;
and the model's contract (terms, seeds, fit, sampling, save/load). Tiny networks, 2x2 images."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from vdm_tf import images, seeding
from vdm_tf.models.mulan import LatentEncoder, MuLAN, PolynomialSchedule
from vdm_tf.models.vdm import VDM
from vdm_tf.networks import ScoreUNet
from vdm_tf.schedules import FixedLinear

SHAPE = (2, 2, 1)
D = 4
L, K = 6, 2
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0


def make_model(parameterization="eps", cls=MuLAN):
    return cls(
        ScoreUNet(n_layers=1, n_embd=8, conditioning_dim=L, dropout=0.0),
        PolynomialSchedule(D, GAMMA_MIN, GAMMA_MAX, n_features=8),
        LatentEncoder(latent_size=L, n_layers=1, n_embd=8, dropout=0.0),
        SHAPE,
        latent_k=K,
        parameterization=parameterization,
    )


def randomise(layer, rng, scale):
    for variable in layer.weights:
        variable.assign(rng.normal(0.0, scale, variable.shape).astype(np.float32))


def fix_latent(model):
    """Encoder logits 1000 on the first K units, 0 elsewhere: every draw of the latent is that k-hot vector."""
    model.encoder.dense_out.kernel.assign(tf.zeros_like(model.encoder.dense_out.kernel))
    model.encoder.dense_out.bias.assign([1000.0] * K + [0.0] * (L - K))
    return tf.constant([[1.0] * K + [0.0] * (L - K)])


class AnalyticMuLAN(MuLAN):
    """MuLAN whose eps_hat is the MSE-optimal one of continuous Gaussian data N(mu, s^2) per pixel."""

    mean = np.array([0.1, -0.2, 0.3, 0.0], np.float32).reshape(SHAPE)
    std = np.array([0.3, 0.5, 0.2, 0.4], np.float32).reshape(SHAPE)

    def _denoise(self, z_t, gamma_t, training=False, latent=None):
        alpha2, sigma2 = tf.sigmoid(-gamma_t), tf.sigmoid(gamma_t)
        return tf.sqrt(sigma2) * (z_t - tf.sqrt(alpha2) * self.mean) / (alpha2 * self.std**2 + sigma2)


@pytest.fixture(scope="module")
def model():
    """A MuLAN with random weights everywhere (nonlinear per-pixel schedules, image-dependent logits)."""
    rng = np.random.default_rng(0)
    model = make_model()
    randomise(model.schedule, rng, 1.0)
    randomise(model.encoder.conv_out, rng, 0.3)
    randomise(model.encoder.dense_out, rng, 1.0)
    randomise(model.denoiser.conv_out, rng, 0.1)
    return model


@pytest.fixture(scope="module")
def x():
    return np.array([[[[30], [128]], [[200], [250]]], [[[0], [60]], [[90], [255]]], [[[7], [7]], [[7], [7]]]], np.uint8)


def test_terms_shapes_seeds_and_total(model, x):
    first = model.elbo(x, seed=3, num_time_samples=2)
    again = model.elbo(x, seed=3, num_time_samples=2)
    other = model.elbo(x, seed=4, num_time_samples=2)
    assert set(first) == set(MuLAN.TERMS) == {"bpd", "diffusion", "prior", "reconstruction", "latent_kl"}
    for name in MuLAN.TERMS:
        assert first[name].shape == (3,) and first[name].dtype == tf.float32
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["diffusion"], other["diffusion"])
    parts = sum(first[name] for name in ("diffusion", "prior", "reconstruction", "latent_kl"))
    np.testing.assert_allclose(first["bpd"], parts, rtol=1e-6)
    assert np.all(first["latent_kl"] > 0.0)


def test_latent_kl_is_the_categorical_kl_of_the_noise_free_logits(model, x):
    logits = model.encoder(images.encode(x)).numpy().astype(np.float64)
    log_q = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    kl = np.sum(np.exp(log_q) * (log_q - np.log(1.0 / L)), axis=1)  # KL(softmax(logits) || Uniform(L))
    got = model.elbo(x, seed=0, num_time_samples=3)["latent_kl"].numpy() * D * np.log(2.0)
    np.testing.assert_allclose(got, kl, rtol=1e-5)


def test_every_pixel_schedule_increases_with_fixed_ends(model, x):
    rng = np.random.default_rng(1)
    latents = [
        model.encode_latent(images.encode(x), [0, 1], tf.range(3))[0],
        tf.constant(rng.normal(0.0, 2.0, (5, L)), tf.float32),
        model.prior_latent(5, [2, 3]),
    ]
    t = np.linspace(0.0, 1.0, 257, dtype=np.float32)
    for latent in latents:
        n = latent.shape[0]
        latent_t = tf.repeat(latent, len(t), axis=0)
        times = tf.constant(np.tile(t, n))
        with tf.GradientTape() as tape:
            tape.watch(times)
            gamma, derivative = model.schedule.gamma_and_derivative(latent_t, times)
        autodiff = tape.gradient(gamma, times, output_gradients=tf.ones_like(gamma) * np.eye(D, dtype=np.float32)[0])
        gamma = gamma.numpy().reshape(n, len(t), D)
        assert np.all(np.diff(gamma, axis=1) >= -1e-4), np.diff(gamma, axis=1).min()
        assert np.all(derivative.numpy() >= 0.0)
        np.testing.assert_array_equal(gamma[:, 0], np.float32(GAMMA_MIN))
        np.testing.assert_allclose(gamma[:, -1], model.schedule.gamma_1, rtol=0, atol=1e-5)
        np.testing.assert_allclose(model.schedule.gamma_1, GAMMA_MAX, rtol=1e-6)
        # the closed-form derivative is d gamma / dt (pixel 0 by autodiff)
        np.testing.assert_allclose(derivative.numpy()[:, 0], autodiff.numpy(), rtol=2e-3, atol=1e-3)
        # and the schedules differ between pixels (a per-pixel test, not a scalar one)
        assert np.ptp(gamma[:, 128], axis=1).max() > 0.5


def test_diffusion_vlb_of_gaussian_data_matches_quadrature():
    """E_{t, eps}[0.5 sum_i gamma_i'(t) (eps_i - eps_hat_i)^2] for one image x under the analytic
    denoiser is sum_i 0.5 int h_i(gamma) d gamma over [gamma_min, gamma_max], whatever each pixel's
    schedule shape: h = (1 - k sigma)^2 + k^2 alpha^2 (f - mu)^2, k = sigma / (alpha^2 s^2 + sigma^2)."""
    rng = np.random.default_rng(2)
    model = make_model(cls=AnalyticMuLAN)
    randomise(model.schedule, rng, 1.5)
    fix_latent(model)
    x = np.array([[[30], [128]], [[200], [250]]], np.uint8)
    f = images.encode(x).numpy().astype(np.float64).ravel()
    gamma = np.linspace(GAMMA_MIN, GAMMA_MAX, 400_001)[:, None]
    alpha2, sigma2 = 1.0 / (1.0 + np.exp(gamma)), 1.0 / (1.0 + np.exp(-gamma))
    mean, var = AnalyticMuLAN.mean.ravel().astype(np.float64), AnalyticMuLAN.std.ravel().astype(np.float64) ** 2
    k = np.sqrt(sigma2) / (alpha2 * var + sigma2)
    h = (1.0 - k * np.sqrt(sigma2)) ** 2 + k**2 * alpha2 * (f - mean) ** 2
    expected = 0.5 * np.trapezoid(h, gamma[:, 0], axis=0).sum()

    n = 2048
    nats = model.elbo(np.repeat(x[None], n, axis=0), seed=5)["diffusion"].numpy() * D * np.log(2.0)
    standard_error = nats.std() / np.sqrt(n)
    assert abs(nats.mean() - expected) < 4.0 * standard_error, (nats.mean(), expected, standard_error)
    assert standard_error < 0.03 * expected  # so an error of 12% or more in the weight fails


def test_constant_latent_and_shared_schedule_reduce_to_vdm(x):
    """a = b = 0 makes every pixel's gamma the linear one; with a constant latent the denoiser is a
    VDM's: the terms are VDM's (same seed, same draws) and the latent KL is log(L / k)."""
    rng = np.random.default_rng(3)
    model = make_model()
    randomise(model.schedule, rng, 1.0)
    for layer in (model.schedule.dense_out_a, model.schedule.dense_out_b):
        for variable in layer.weights:
            variable.assign(tf.zeros_like(variable))
    randomise(model.denoiser.conv_out, rng, 0.1)
    randomise(model.denoiser.cond_dense0, rng, 0.3)
    latent = fix_latent(model)

    class Conditioned(keras.layers.Layer):
        def call(self, z_t, gamma_t, training=None):
            batch_latent = tf.broadcast_to(latent, [tf.shape(z_t)[0], L])
            return model.denoiser(z_t, gamma_t, training=training, conditioning=batch_latent)

    vdm = VDM(Conditioned(), FixedLinear(GAMMA_MIN, GAMMA_MAX), SHAPE)
    got = model.elbo(x, seed=7, num_time_samples=2)
    want = vdm.elbo(x, seed=7, num_time_samples=2)
    for name in ("diffusion", "prior", "reconstruction"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(got["latent_kl"], np.log(L / K) / (D * np.log(2.0)), rtol=1e-5)
    np.testing.assert_allclose(got["bpd"], want["bpd"] + got["latent_kl"], rtol=1e-4)


def test_velocity_output_is_converted_per_pixel(model):
    velocity = make_model("velocity")
    velocity.set_weights(model.get_weights())
    rng = np.random.default_rng(4)
    z = tf.constant(rng.normal(size=(3, *SHAPE)), tf.float32)
    latent = model.prior_latent(3, [0, 5])
    gamma = model.gamma(latent, tf.constant([0.2, 0.5, 0.9]))
    output = model._denoise(z, gamma, latent=latent)  # the network's output as is
    alpha, sigma = np.sqrt(tf.sigmoid(-gamma).numpy()), np.sqrt(tf.sigmoid(gamma).numpy())
    np.testing.assert_allclose(velocity._denoise(z, gamma, latent=latent), alpha * output + sigma * z, rtol=1e-5)


def test_prior_latent_is_k_hot_and_uniform(model):
    latent = model.prior_latent(6000, [1, 1]).numpy()
    np.testing.assert_array_equal(latent.sum(axis=1), K)
    np.testing.assert_allclose(latent.mean(axis=0), K / L, atol=0.03)


def test_fit_sample_and_keras_round_trip(tmp_path, model, x):
    trained = make_model("velocity")
    trained.set_weights(model.get_weights())
    trained.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    before = [w.copy() for w in trained.get_weights()]
    history = trained.fit(np.repeat(x, 2, axis=0), batch_size=2, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    assert set(history.history) == set(MuLAN.TERMS) and np.isfinite(history.history["bpd"][0])
    assert any(not np.array_equal(b, a) for b, a in zip(before, trained.get_weights()))
    samples = trained.sample(3, num_steps=2, seed=0)
    assert samples.shape == (3, *SHAPE) and samples.dtype == tf.uint8
    path = str(tmp_path / "mulan.keras")
    trained.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is MuLAN and loaded.parameterization == "velocity" and loaded.latent_k == K
    want, got = trained.elbo(x, seed=2), loaded.elbo(x, seed=2)
    for name in MuLAN.TERMS:
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_array_equal(loaded.sample(3, num_steps=2, seed=0), samples)


def test_the_likelihood_signature_serves_every_term(model, x):
    """The exported likelihood gives each of the model's terms as NAME_bpd, latent_kl_bpd included,
    so the served terms add up to the served bpd."""
    from export.saved_model import ServingModule

    module = ServingModule(model, time_samples=2)  # kept: its traced methods hold it weakly
    served = module.likelihood(tf.constant(x), tf.constant(3, tf.int64))
    want = model.elbo(x, seed=3, num_time_samples=2)
    assert set(served) == {"bpd", "diffusion_bpd", "prior_bpd", "reconstruction_bpd", "latent_kl_bpd"}
    for name in MuLAN.TERMS:
        np.testing.assert_allclose(served[name if name == "bpd" else f"{name}_bpd"], want[name], rtol=1e-6)


@pytest.fixture(scope="module")
def analytic():
    """An `AnalyticMuLAN` with its latent fixed; its schedule is whatever a test left (the closed
    forms hold for any per-pixel schedule with fixed ends). Shared: its traced ODE solve is reused."""
    model = make_model(cls=AnalyticMuLAN)
    fix_latent(model)
    return model


def test_ode_log_likelihood_of_gaussian_data_is_the_closed_form(analytic):
    """Gaussian data N(mu, s^2) per pixel and its analytic denoiser: every marginal is Gaussian,
    N(m_t, v_t) with m_t = alpha_t mu, v_t = alpha_t^2 s^2 + sigma_t^2 per pixel, whatever each
    pixel's schedule, and the probability flow is the map z_1 = m_1 + sqrt(v_1 / v_0) (z_0 - m_0).
    With the prior N(0, I) at t = 1, the ODE's log-density is then log N(z_0; m_0, v_0) +
    log N(z_1; 0, 1) - log N(z_1; m_1, v_1), summed over pixels. The schedule is the same for every
    image (the latent is fixed): linear in t (a = b = 0), then nonlinear and different per pixel.
    Pixels do not interact, so the flow's Jacobian is diagonal and the Rademacher estimate of its
    divergence is exact: the default estimator is checked, with no Monte-Carlo error."""
    model = analytic
    latent = tf.tile(fix_latent(model), [3, 1])
    rng = np.random.default_rng(6)
    mean, std = AnalyticMuLAN.mean.astype(np.float64), AnalyticMuLAN.std.astype(np.float64)
    z_0 = (mean + std * rng.normal(size=(3, *SHAPE))).astype(np.float32)

    def log_normal(z, m, v):
        return np.sum(-0.5 * (np.log(2 * np.pi * v) + (z - m) ** 2 / v), axis=(1, 2, 3))

    gammas = np.array([GAMMA_MIN, GAMMA_MAX])
    (alpha2_0, alpha2_1), (sigma2_0, sigma2_1) = (1.0 / (1.0 + np.exp(sign * gammas)) for sign in (1, -1))
    m_0, m_1 = np.sqrt(alpha2_0) * mean, np.sqrt(alpha2_1) * mean
    v_0, v_1 = alpha2_0 * std**2 + sigma2_0, alpha2_1 * std**2 + sigma2_1

    def closed_form(z_0):
        z_1 = m_1 + np.sqrt(v_1 / v_0) * (z_0 - m_0)
        return log_normal(z_0, m_0, v_0) + log_normal(z_1, 0.0, 1.0) - log_normal(z_1, m_1, v_1)

    expected = closed_form(z_0)
    for schedule in ("linear", "per_pixel"):
        if schedule == "linear":
            for layer in (model.schedule.dense_out_a, model.schedule.dense_out_b):
                for variable in layer.weights:
                    variable.assign(tf.zeros_like(variable))
        else:
            randomise(model.schedule, np.random.default_rng(5), 1.5)
        gamma = model.gamma(latent, tf.constant([0.5] * 3)).numpy()
        assert (np.ptp(gamma) > 0.5) == (schedule == "per_pixel"), np.ptp(gamma)
        got = model.ode_log_likelihood(z_0, latent, seed=1, rtol=1e-6, atol=1e-6)["log_likelihood"].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3, err_msg=schedule)

    # ode_bpd, on the same traced solve: z_0 = f + exp(gamma_0 / 2) u, u ~ N(0, 1) truncated to
    # [-3, 3] (|z_0 - f| < 0.004: the closed form at f, to 0.002 bpd on the mean of 64 draws), the
    # latent's KL log(L / k) added (its logits are 1000 on k units), and the official offset.
    x = np.array([[[30], [128]], [[200], [250]]], np.uint8)
    bpd = model.ode_bpd(np.repeat(x[None], 64, axis=0), seed=2, rtol=1e-6, atol=1e-6)["bpd"].numpy()
    offset = -(0.5 * (1 + np.log(2 * np.pi)) - 0.01522 + 0.5 * np.log(sigma2_0)) / np.log(2.0)
    nats = -closed_form(images.encode(x).numpy()[None].astype(np.float64)) + np.log(L / K)
    np.testing.assert_allclose(bpd.mean(), nats / (D * np.log(2.0)) + offset, rtol=0, atol=0.01)
    assert bpd.std() > 1e-4  # each copy has its own dequantization


def test_importance_weighted_bound_is_below_the_mean_single_draw_bound(model):
    """K draws combine by log-mean-exp of the weights p_k / q(u^k): by Jensen the K-draw bpd is
    below the mean of the K single-draw bounds (-log p_k + log q(u^k) + KL) / (D ln 2) - log sigma_0
    / ln 2, q(u) = prod N(u_i; 0, 1) / 0.9974613 (the official truncated-normal weights); it equals
    that bound when all K draws coincide. A plain mean of the weights' logs would meet the mean
    exactly; dropping the log K would put K equal draws log2(K) / D bits below it."""
    rng = np.random.default_rng(7)
    log_p = tf.constant(rng.normal(-10.0, 2.0, (4, 3)), tf.float32)
    u = tf.constant(rng.uniform(-3.0, 3.0, (4, 3, *SHAPE)), tf.float32)
    kl = tf.constant([0.3, 0.0, 1.1])
    log_q = np.sum(-0.5 * u.numpy() ** 2, axis=(2, 3, 4)) - D * (0.5 * np.log(2 * np.pi) + np.log(0.9974613))
    log_sigma_0 = 0.5 * np.log(1.0 / (1.0 + np.exp(-GAMMA_MIN)))
    single = (-(log_p.numpy() - log_q) + kl.numpy()) / (D * np.log(2)) - log_sigma_0 / np.log(2)  # [K, N]
    for k in range(4):  # K copies of one draw: its single-draw bound
        copies = model.ode_bpd_from_draws(tf.repeat(log_p[k : k + 1], 3, 0), tf.repeat(u[k : k + 1], 3, 0), kl)
        np.testing.assert_allclose(copies, single[k], rtol=1e-5)
    bpd = model.ode_bpd_from_draws(log_p, u, kl).numpy()
    assert np.all(bpd < single.mean(axis=0) - 0.05), (bpd, single.mean(axis=0))
    assert np.all(bpd >= single.min(axis=0)), (bpd, single.min(axis=0))  # log-mean-exp <= the max weight


def test_ode_bpd_with_importance_draws_of_gaussian_data_is_the_closed_form(analytic):
    """`ode_bpd(num_importance=3)` of the analytic model (test above): each draw's log p_ODE is the
    closed form at z_0 = f + exp(gamma_0 / 2) u (diagonal flow: the Rademacher divergence is
    exact), the draws' u those `ode_bpd` documents (row k N + n of the truncated normal from the
    seed's first half), combined by log-mean-exp of p / q with the official offset -log sigma_0 /
    ln 2. Checks the draws' layout, the tiling of images and latents, and the combination together."""
    model = analytic
    x = np.array([[[[30], [128]], [[200], [250]]], [[[0], [60]], [[90], [255]]]], np.uint8)
    got = model.ode_bpd(x, seed=5, rtol=1e-6, atol=1e-6, num_importance=3)["bpd"].numpy()

    noise_seed, _ = seeding.split_seed(5, 2)
    u = tf.random.stateless_parameterized_truncated_normal((6, *SHAPE), noise_seed, 0.0, 1.0, -3.0, 3.0).numpy()
    u = u.astype(np.float64).reshape(3, 2, *SHAPE)
    z_0 = images.encode(x).numpy().astype(np.float64) + np.exp(0.5 * GAMMA_MIN) * u
    mean, std = AnalyticMuLAN.mean.astype(np.float64), AnalyticMuLAN.std.astype(np.float64)
    alpha2 = 1.0 / (1.0 + np.exp(np.array([GAMMA_MIN, GAMMA_MAX])))
    sigma2 = 1.0 - alpha2
    m_0, m_1 = np.sqrt(alpha2[0]) * mean, np.sqrt(alpha2[1]) * mean
    v_0, v_1 = alpha2[0] * std**2 + sigma2[0], alpha2[1] * std**2 + sigma2[1]

    def log_normal(z, m, v):
        return np.sum(-0.5 * (np.log(2 * np.pi * v) + (z - m) ** 2 / v), axis=(-3, -2, -1))

    z_1 = m_1 + np.sqrt(v_1 / v_0) * (z_0 - m_0)
    log_p = log_normal(z_0, m_0, v_0) + log_normal(z_1, 0.0, 1.0) - log_normal(z_1, m_1, v_1)  # [3, 2]
    log_q = np.sum(-0.5 * u**2, axis=(2, 3, 4)) - D * (0.5 * np.log(2 * np.pi) + np.log(0.9974613))
    log_w = log_p - log_q
    log_mean = np.log(np.mean(np.exp(log_w - log_w.max(axis=0)), axis=0)) + log_w.max(axis=0)
    expected = (-log_mean + np.log(L / K)) / (D * np.log(2)) - 0.5 * np.log(sigma2[0]) / np.log(2)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    # The three draws differ: their bounds spread by more than the tolerance.
    assert np.ptp(log_w, axis=0).min() > 0.1, log_w


def test_exact_likelihood_signature_is_the_models_ode_bpd(analytic, x, tmp_path):
    """`--export_score_sde` of a MuLAN: `exact_likelihood` (inputs `images`, `seed`, both required)
    answers `model.ode_bpd` at the export's tolerance and `importance_samples`, loaded with
    tf.saved_model.load; the SDE samplers and inpainting, which need a per-example SDE, are left out.
    The analytic model (its encoder and schedule real, its denoiser closed-form) keeps the ODE
    smooth and reuses the traced solve of the tests above (same tolerance)."""
    from export import saved_model

    model = analytic
    tolerance = 1e-6
    path = saved_model.export_model(
        model, str(tmp_path), warmup=False, score_sde=True, ode_tolerance=tolerance, importance_samples=2
    )
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "likelihood", "sample", "exact_likelihood"}
    signature = loaded.signatures["exact_likelihood"]
    assert set(signature.structured_input_signature[1]) == {"images", "seed"}
    got = signature(images=tf.constant(x[:2]), seed=tf.constant(4, tf.int64))
    want = model.ode_bpd(x[:2], seed=4, rtol=tolerance, atol=tolerance, num_importance=2)
    np.testing.assert_allclose(got["bpd"], want["bpd"], rtol=1e-5)
    assert int(got["nfe"]) == int(want["nfe"]) > 0
