"""Training the i-DODE way (vdm_tf.VDM's velocity parameterisation, importance-sampled gammas,
flow matching; vdm_tf.schedules' VariancePreserving and StraightPath) against closed forms.

The reference is what the official code computes (github thu-ml/i-DODE, model_vdm.py; the lines are
cited where a formula is written out here), independently of vdm_tf's code: the velocity targets
(:211, :214), the importance density and its inverse (:98-120, :173-176), the weights (:209-218)
and the second-order term (:188-206, :223-234), in the velocity's own units, in NumPy. The data
are the discretized Gaussians of tests/gaussian.py with their analytic denoiser, as in
tests/test_vdm_gaussian.py.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from gaussian import GaussianData, GaussianDenoiser, sigmoid
from test_vdm_gaussian import batch_means

import vdm_tf
from vdm_tf import VDM, runs, schedules, seeding
from vdm_tf.models.vdm import hutchinson_trace
from vdm_tf.run_config import Config

IMAGE_SHAPE = (4, 4, 1)
D = 16
PATHS = {"vp": schedules.VariancePreserving, "sp": schedules.StraightPath}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return GaussianData(rng.uniform(-0.3, 0.3, IMAGE_SHAPE), rng.uniform(0.05, 0.2, IMAGE_SHAPE))


def softplus(x):
    return np.logaddexp(0.0, x)


def idode_alpha_sigma(path, gamma):
    """i-DODE's `noise_schedule` (model_vdm.py:122-131), float64."""
    if path == "vp":
        return np.sqrt(sigmoid(-gamma)), np.sqrt(sigmoid(gamma))
    return sigmoid(-gamma / 2), sigmoid(gamma / 2)


def idode_normaliser(path, g0, g1):
    """Z = integral of alpha^2 over [g0, g1]: model_vdm.py:175 (VP) and :98-105 with its branch (SP)."""
    if path == "vp":
        return np.log((1 + np.exp(-g0)) / (1 + np.exp(-g1)))

    def cum_weight(g):
        e = np.exp(-g / 2)
        return np.where(e <= 1e-3, e, np.log(1 + e)) + np.where(e <= 1e-3, 1 - e, 1 / (1 + e))

    return -2 * (cum_weight(g1) - cum_weight(g0))


def idode_gamma(path, g0, g1, u):
    """i-DODE's gamma of u: the closed form of model_vdm.py:176 (VP), 100 bisection steps of :107-120 (SP)."""
    z = idode_normaliser(path, g0, g1)
    if path == "vp":
        return np.log(1 / (np.exp(-z * u) * (1 + np.exp(-g0)) - 1))
    low, high = np.full_like(u, g0), np.full_like(u, g1)
    for _ in range(100):
        middle = (low + high) / 2
        below = idode_normaliser("sp", g0, middle) <= z * u
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return (low + high) / 2


class VelocityDenoiser(keras.layers.Layer):
    """The analytic denoiser of `GaussianData` predicting i-DODE's velocity on its path.

    Input: the path's latent z_p (VP: z; SP: z / (alpha + sigma), the same gamma). Output:
    VP (eps_hat - sigma z_p) / alpha (model_vdm.py:211), SP (eps_hat - z_p) / (sqrt 2 alpha) (:214),
    with eps_hat the eps denoiser's on the variance-preserving latent.
    """

    def __init__(self, data, path, **kwargs):
        super().__init__(**kwargs)
        self.eps_denoiser = GaussianDenoiser(data.mean, data.std)
        self.kind = path

    def call(self, z_path, gamma_t, training=None):
        gamma = tf.reshape(gamma_t, [-1, 1, 1, 1])
        alpha_vp, sigma_vp = tf.sqrt(tf.sigmoid(-gamma)), tf.sqrt(tf.sigmoid(gamma))
        if self.kind == "vp":
            return (self.eps_denoiser(z_path, gamma_t) - sigma_vp * z_path) / alpha_vp
        eps_hat = self.eps_denoiser(z_path * (alpha_vp + sigma_vp), gamma_t)
        return (eps_hat - z_path) / (np.sqrt(2.0) * tf.sigmoid(-gamma / 2))


class LinearVelocity(keras.layers.Layer):
    """v_hat = W z + c on flattened images: a network whose Jacobian (W) is known."""

    def __init__(self, weight, bias, **kwargs):
        super().__init__(**kwargs)
        self.weight = tf.constant(weight, tf.float32)
        self.bias = tf.constant(bias, tf.float32)

    def call(self, z, gamma_t, training=None):
        flat = tf.reshape(z, [tf.shape(z)[0], -1])
        return tf.reshape(flat @ tf.transpose(self.weight) + self.bias, tf.shape(z))


def velocity_model(data, path, g0=-10.0, g1=5.0, **options):
    return VDM(VelocityDenoiser(data, path), PATHS[path](g0, g1), IMAGE_SHAPE, parameterization="velocity", **options)


# ------------------------------------------------------------------------------------------------
# (d) The schedules against their closed forms.


@pytest.mark.parametrize("path", ["vp", "sp"])
def test_schedules_gamma_derivative_endpoints_and_path(path):
    schedule = PATHS[path](-13.3, 5.0)
    assert schedule.trainable_variables == [] and not schedule.learns_shape
    t = np.linspace(0.0, 1.0, 1001)
    gamma, dgamma = (v.numpy() for v in schedule.gamma_and_derivative(tf.constant(t, tf.float32)))
    np.testing.assert_allclose(gamma, -13.3 + 18.3 * t, atol=2e-6)  # model_vdm.py:665-671
    assert gamma[0] == np.float32(-13.3) and abs(gamma[-1] - 5.0) < 1e-6 and np.all(np.diff(gamma) > 0)
    numeric = (schedule(tf.constant(t[1:-1] + 1e-3)) - schedule(tf.constant(t[1:-1] - 1e-3))).numpy() / 2e-3
    np.testing.assert_allclose(dgamma[1:-1], numeric, rtol=1e-3)
    # The path's coefficients (model_vdm.py:122-131): SNR exp(-gamma) on both paths.
    g = np.linspace(-13.3, 5.0, 37)
    alpha, sigma = (v.numpy() for v in schedule.path_coefficients(tf.constant(g, tf.float32)))
    expected_alpha, expected_sigma = idode_alpha_sigma(path, g)
    np.testing.assert_allclose(alpha, expected_alpha, rtol=1e-6)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-6)
    np.testing.assert_allclose(np.log(sigma**2 / alpha**2), g, atol=1e-4)
    # The path's latent is vdm_tf's z scaled: z_p = alpha_p f + sigma_p eps for z = alpha f + sigma eps.
    rng = np.random.default_rng(1)
    f, eps = rng.uniform(-1, 1, (37, 2, 2, 1)), rng.normal(size=(37, 2, 2, 1))
    vp_alpha, vp_sigma = (v[:, None, None, None] for v in idode_alpha_sigma("vp", g))
    z = tf.constant(vp_alpha * f + vp_sigma * eps, tf.float32)
    z_path = schedule.to_path(z, tf.constant(g, tf.float32)).numpy()
    a, s = (v[:, None, None, None] for v in idode_alpha_sigma(path, g))
    np.testing.assert_allclose(z_path, a * f + s * eps, rtol=2e-5, atol=1e-6)
    # eps = a v + b z_p for i-DODE's velocity target (model_vdm.py:211, :214).
    v = (eps - s * z_path) / a if path == "vp" else (eps - z_path) / (a * np.sqrt(2))
    ca, cb = (c.numpy()[:, None, None, None] for c in schedule.velocity_coefficients(tf.constant(g, tf.float32)))
    np.testing.assert_allclose(ca * v + cb * z_path, eps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["vp", "sp"])
def test_importance_density_and_inverse_are_idodes(path):
    """Z, the CDF (its derivative is alpha_path^2, by finite differences) and the inverse CDF
    against i-DODE's formulas in float64 (Z = 13.293286 VP, 11.299108 SP at (-13.3, 5))."""
    g0, g1 = -13.3, 5.0
    schedule = PATHS[path](g0, g1)
    total = float(schedule.importance_cdf(schedule.gamma_1))
    assert total == pytest.approx(idode_normaliser(path, g0, g1), rel=1e-6)
    assert total == pytest.approx({"vp": 13.293286, "sp": 11.299108}[path], rel=1e-6)
    g = np.linspace(-13.0, 4.7, 60)
    h = 0.05  # float32 CDF values near 11: differences over 2h resolve the derivative to 1e-4
    cdf = lambda x: schedule.importance_cdf(tf.constant(x, tf.float32)).numpy().astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(
        (cdf(g + h) - cdf(g - h)) / (2 * h), idode_alpha_sigma(path, g)[0] ** 2, rtol=1e-3, atol=1e-4
    )
    assert float(schedule.importance_cdf(schedule.gamma_0)) == 0.0
    u = np.concatenate([[0.0], (np.arange(400) + 0.5) / 400, [1.0]])
    gamma, inverse_density = (v.numpy() for v in schedule.importance_sample(tf.constant(u, tf.float32)))
    np.testing.assert_allclose(gamma, idode_gamma(path, g0, g1, u), atol=2e-4)
    assert abs(gamma[0] - g0) < 1e-5 and abs(gamma[-1] - g1) < 1e-5 and np.all(np.diff(gamma) > 0)
    np.testing.assert_allclose(inverse_density, total / idode_alpha_sigma(path, gamma)[0] ** 2, rtol=1e-5)


def test_schedules_serialise_and_come_from_the_configuration():
    for schedule in (schedules.VariancePreserving(-12.0, 4.0), schedules.StraightPath(-12.0, 4.0)):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
        assert type(clone) is type(schedule) and clone.get_config() == schedule.get_config()
    for kind, cls in (("idode_vp", schedules.VariancePreserving), ("idode_sp", schedules.StraightPath)):
        schedule = runs.build_schedule(Config().replace(schedule=kind, gamma_min=-12.0, gamma_max=4.0))
        assert type(schedule) is cls and (schedule.gamma_min, schedule.gamma_max) == (-12.0, 4.0)


# ------------------------------------------------------------------------------------------------
# (b), (c) Importance sampling: the same integral as uniform times, by exact quadrature.


@pytest.mark.parametrize("path", ["vp", "sp"])
def test_importance_weights_integrate_exactly_and_reduce_the_variance(data, path):
    """Midpoint quadrature in u of the importance-weighted integrand (what the loss averages over
    the antithetic u's) against the integral over gamma: for h = 1 the interval's length
    gamma_1 - gamma_0 (a constant factor in the weight or the density fails this), for
    h = 0.5 E||eps - eps_hat||^2 the diffusion term of the VLB. The spread over u of the weighted
    integrand, the variance of a one-sample estimate, is below that of uniform times (2.7x lower
    on VP, 3.0x on SP here): i-DODE's variance reduction."""
    g0, g1 = -13.3, 5.0
    u = (np.arange(100_000) + 0.5) / 100_000
    gamma, inverse_density = (v.numpy().astype(np.float64) for v in PATHS[path](g0, g1).importance_sample(u))
    np.testing.assert_allclose(inverse_density.mean(), g1 - g0, rtol=2e-4)
    importance = 0.5 * inverse_density * data.expected_squared_error(gamma)
    exact = data.continuous_diffusion_nats(g0, g1)
    np.testing.assert_allclose(importance.mean(), exact, rtol=2e-4)
    uniform = 0.5 * (g1 - g0) * data.expected_squared_error(g0 + (g1 - g0) * u)
    np.testing.assert_allclose(uniform.mean(), exact, rtol=2e-4)
    assert importance.var() < 0.5 * uniform.var(), (importance.var(), uniform.var())


# ------------------------------------------------------------------------------------------------
# (a), (b) The velocity model with the exact denoiser: the eps model's numbers, the closed form.


@pytest.mark.parametrize("path", ["vp", "sp"])
def test_velocity_model_scores_and_samples_as_the_eps_model(data, path):
    """The exact denoiser expressed as i-DODE's velocity on its path: eps_hat derived in
    `_denoise` is the eps denoiser's, so every term of the ELBO, the score and the samples are
    the eps model's (up to float32 rounding of the conversion)."""
    eps_model = VDM(GaussianDenoiser(data.mean, data.std), schedules.FixedLinear(-10.0, 5.0), IMAGE_SHAPE)
    model = velocity_model(data, path)
    x = data.sample(256, seed=1)
    for seed in range(3):
        expected, got = eps_model.elbo(x, seed=seed), model.elbo(x, seed=seed)
        for name in ("diffusion", "prior", "reconstruction", "bpd"):
            np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=2e-4, atol=1e-6, err_msg=name)
    z = tf.random.stateless_normal((6, *IMAGE_SHAPE), [1, 2])
    for t in (0.05, 0.5, 0.95):
        np.testing.assert_allclose(model.score(z, t).numpy(), eps_model.score(z, t).numpy(), rtol=2e-4, atol=2e-4)
    same = model.sample(200, num_steps=20, seed=3).numpy() == eps_model.sample(200, num_steps=20, seed=3).numpy()
    assert same.mean() > 0.99


@pytest.mark.parametrize("path", ["vp", "sp"])
def test_importance_sampled_elbo_matches_the_closed_form_with_lower_variance(data, path):
    """With importance-sampled gammas the bound is the same VLB (closed form by quadrature,
    tests/gaussian.py), and the per-example diffusion terms of a batch of one image spread less
    than with uniform antithetic times (the stratified u's cover [0, 1) evenly)."""
    model = velocity_model(data, path, time_sampling="importance")
    mean, stderr = batch_means(model, data, num_batches=8)
    expected = data.vlb_bpd(-10.0, 5.0)
    assert abs(mean - expected) < 4 * stderr + 1e-3, (mean, stderr, expected)
    one = np.repeat(data.sample(1, seed=9), 4096, axis=0)
    spread = {
        sampling: velocity_model(data, path, time_sampling=sampling).elbo(one, seed=1)["diffusion"].numpy().std()
        for sampling in ("antithetic", "importance")
    }
    assert spread["importance"] < 0.8 * spread["antithetic"], spread


# ------------------------------------------------------------------------------------------------
# (e) The flow-matching term.


def idode_losses(path, f, eps, gamma, weight_f, probe, w, c, lam):
    """i-DODE's loss_diff and loss_diff2 (model_vdm.py:183-234) for v_hat = W z_p + c, float64.

    `weight_f`: the weight of ||F - F_hat||^2 (:212, :215). F_div = probe^T W probe (:190-196).
    """
    alpha, sigma = (v[:, None] for v in idode_alpha_sigma(path, gamma))
    z = alpha * f + sigma * eps  # :186, on the path
    f_hat = z @ w.T + c
    f_div = np.einsum("ni,ij,nj->n", probe, w, probe)
    if path == "vp":
        target = (eps - sigma * z) / alpha  # :211
    else:
        target = (eps - z) / alpha / np.sqrt(2)  # :214
    mse = np.sum((target - f_hat) ** 2, axis=1)  # :220
    alpha, sigma = alpha[:, 0], sigma[:, 0]
    if path == "vp":
        residual = sigma * f_div - alpha * (D - mse)  # :226
    else:
        residual = sigma * f_div - D / np.sqrt(2) + np.sqrt(2) * alpha * mse  # :228-232
    return weight_f * mse, weight_f * residual**2 / D * lam  # :221, :233-234


@pytest.mark.parametrize("path", ["vp", "sp"])
@pytest.mark.parametrize("sampling", ["antithetic", "importance"])
def test_flow_matching_term_is_idodes_for_a_linear_network(path, sampling):
    """`_weighted_errors` (eps units: w ||eps - eps_hat||^2, w lambda / D r^2) against i-DODE's
    loss_diff and loss_diff2 in the velocity's units, for a dense linear velocity network (its
    Jacobian W is not diagonal, so the probe's estimate is not the trace) and the same probes."""
    rng = np.random.default_rng(2)
    g0, g1, lam = -13.3, 5.0, 0.1
    schedule = PATHS[path](g0, g1)
    w, c = rng.normal(0, 0.3, (D, D)) + np.eye(D), rng.normal(0, 0.1, D)
    model = VDM(LinearVelocity(w, c), schedule, IMAGE_SHAPE, parameterization="velocity", flow_matching_weight=lam)
    n = 40
    f, eps = rng.uniform(-1, 1, (n, D)), rng.normal(size=(n, D))
    probe = rng.choice([-1.0, 1.0], (n, D))
    gamma = np.linspace(g0 + 0.2, g1 - 0.2, n)
    alpha_path = idode_alpha_sigma(path, gamma)[0]
    if sampling == "importance":  # :212, :215 with Z; in eps units 0.5 Z / alpha^2
        total = idode_normaliser(path, g0, g1)
        weight_f, weight = total * (0.5 if path == "vp" else 1.0), 0.5 * total / alpha_path**2
    else:  # 0.5 gamma' alpha^2 (VP), gamma' alpha^2 (SP); in eps units 0.5 gamma'
        weight_f, weight = (g1 - g0) * alpha_path**2 * (0.5 if path == "vp" else 1.0), 0.5 * (g1 - g0) * np.ones(n)
    # vdm_tf's latent is the variance-preserving one: the same f and eps.
    diffusion, flow = model._weighted_errors(
        *(tf.constant(v.reshape(n, *IMAGE_SHAPE), tf.float32) for v in (f, eps)),
        tf.constant(gamma, tf.float32),
        tf.constant(weight, tf.float32),
        False,
        {},
        tf.constant(probe.reshape(n, *IMAGE_SHAPE), tf.float32),
    )
    expected_diffusion, expected_flow = idode_losses(path, f, eps, gamma, weight_f, probe, w, c, lam)
    np.testing.assert_allclose(diffusion.numpy(), expected_diffusion, rtol=2e-4, atol=1e-3)
    np.testing.assert_allclose(flow.numpy(), expected_flow, rtol=2e-3, atol=1e-3)
    assert np.all(expected_flow > 1e-2)  # not vacuous


def test_hutchinson_estimate_of_the_eps_jacobian_is_unbiased():
    """Over the model's Rademacher probes, probe^T (d eps_hat / dz) probe averages to the trace
    alpha tr(W) + sigma D of the velocity model's eps_hat = alpha (W z + c) + sigma z (VP), and
    is exact for a diagonal W."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (D, D))
    model = VDM(
        LinearVelocity(w, np.zeros(D)), schedules.VariancePreserving(), IMAGE_SHAPE, parameterization="velocity"
    )
    n, gamma = 2000, -1.0
    z = tf.constant(np.repeat(rng.normal(size=(1, *IMAGE_SHAPE)), n, axis=0), tf.float32)
    normal = seeding.per_example_normal(seeding.as_seed(4), tf.range(n), IMAGE_SHAPE)
    probe = tf.where(normal < 0.0, -1.0, 1.0)  # as `VDM._diffusion_terms` draws them
    _, estimate = hutchinson_trace(lambda z: model._denoise(z, tf.fill([n], gamma)), z, probe)
    alpha, sigma = np.sqrt(sigmoid(-gamma)), np.sqrt(sigmoid(gamma))
    exact = alpha * np.trace(w) + sigma * D
    estimate = estimate.numpy()
    assert abs(estimate.mean() - exact) < 4 * estimate.std() / np.sqrt(n), (estimate.mean(), exact)
    assert estimate.std() > 0.5  # W is far from diagonal: single estimates vary
    diagonal = VDM(
        LinearVelocity(np.diag(np.diag(w)), np.zeros(D)),
        schedules.VariancePreserving(),
        IMAGE_SHAPE,
        parameterization="velocity",
    )
    _, exact_estimates = hutchinson_trace(lambda z: diagonal._denoise(z, tf.fill([n], gamma)), z, probe)
    np.testing.assert_allclose(exact_estimates.numpy(), alpha * np.trace(w) + sigma * D, rtol=1e-5)


def test_flow_matching_residual_of_the_optimal_denoiser_has_its_closed_form_variance(data):
    """For continuous Gaussian data and its exact denoiser, eps - eps_hat ~ N(0, v_i) per pixel
    with v_i = alpha^2 s_i^2 / (alpha^2 s_i^2 + sigma^2) and sigma tr(d eps_hat / dz) = sum(1 - v_i),
    so r = sum(delta_i^2 - v_i): E[r] = 0, E[r^2] = 2 sum v_i^2. The term is w lambda / D r^2."""
    lam, gamma, n = 0.1, -3.0, 20_000
    model = velocity_model(data, "vp", -13.3, 5.0, flow_matching_weight=lam)
    rng = np.random.default_rng(5)
    f = data.mean + data.std * rng.normal(size=(n, *IMAGE_SHAPE))
    eps = rng.normal(size=(n, *IMAGE_SHAPE))
    probe = rng.choice([-1.0, 1.0], (n, *IMAGE_SHAPE))
    _, flow = model._weighted_errors(
        tf.constant(f, tf.float32),
        tf.constant(eps, tf.float32),
        tf.fill([n], gamma),
        tf.ones([n]),
        False,
        {},
        tf.constant(probe, tf.float32),
    )
    r_squared = flow.numpy() * D / lam
    a2, s2 = sigmoid(-gamma), sigmoid(gamma)
    v = (a2 * data.std**2 / (a2 * data.std**2 + s2)).reshape(-1)
    expected = 2 * np.sum(v**2)
    assert abs(r_squared.mean() - expected) < 4 * r_squared.std() / np.sqrt(n), (r_squared.mean(), expected)


def test_training_with_flow_matching_reports_the_term_and_adds_it_to_the_loss():
    net = vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=8, dropout=0.0)
    model = VDM(
        net,
        schedules.StraightPath(),
        (8, 8, 1),
        parameterization="velocity",
        time_sampling="importance",
        flow_matching_weight=0.1,
    )
    assert model.TERMS == ("bpd", "diffusion", "prior", "reconstruction", "flow_matching", "loss")
    assert VDM.TERMS == ("bpd", "diffusion", "prior", "reconstruction")
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1)).astype(np.uint8)
    terms, _ = model._loss_terms(x, seeding.as_seed(0), training=False)
    np.testing.assert_allclose(terms["loss"], terms["bpd"] + terms["flow_matching"], rtol=1e-6)
    assert np.all(terms["flow_matching"].numpy() > 0)
    bound = model.elbo(x, seed=0)
    assert set(bound) == {"bpd", "diffusion", "prior", "reconstruction"}  # the bound only
    np.testing.assert_allclose(bound["bpd"], terms["bpd"], rtol=1e-6)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    before = [w.numpy() for w in model.trainable_weights]
    history = model.fit(tf.data.Dataset.from_tensors(x).repeat(), steps_per_epoch=2, epochs=1, verbose=0)
    assert set(history.history) == set(model.TERMS) and np.isfinite(history.history["loss"][-1])
    after = [w.numpy() for w in model.trainable_weights]
    assert all(np.all(np.isfinite(w)) for w in after) and any(np.any(a != b) for a, b in zip(after, before))


# ------------------------------------------------------------------------------------------------
# (f) Serialisation and configuration.


def test_options_round_trip_through_keras_files_and_old_files_load_as_eps(tmp_path, data):
    model = VDM(
        vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=8),
        schedules.StraightPath(-12.0, 4.0),
        (8, 8, 1),
        parameterization="velocity",
        time_sampling="importance",
        flow_matching_weight=0.25,
    )
    path = str(tmp_path / "idode.keras")
    model.save(path)
    loaded = vdm_tf.load(path)
    assert (loaded.parameterization, loaded.time_sampling, loaded.flow_matching_weight) == (
        "velocity",
        "importance",
        0.25,
    )
    assert type(loaded.schedule) is schedules.StraightPath and loaded.TERMS == model.TERMS
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    np.testing.assert_array_equal(loaded.elbo(x, seed=2)["bpd"].numpy(), model.elbo(x, seed=2)["bpd"].numpy())
    config = model.get_config()
    for name in ("parameterization", "time_sampling", "flow_matching_weight"):
        del config[name]
    config["schedule"] = keras.saving.serialize_keras_object(schedules.FixedLinear())
    old = VDM.from_config(config)
    assert (old.parameterization, old.time_sampling, old.flow_matching_weight) == ("eps", "antithetic", 0.0)
    bundled = vdm_tf.load(os.path.join(os.path.dirname(vdm_tf.models.__file__), "photos_grey.keras"))
    assert (bundled.parameterization, bundled.time_sampling, bundled.flow_matching_weight) == ("eps", "antithetic", 0.0)


def test_options_round_trip_through_a_run_directory(tmp_path):
    config = Config().replace(
        dataset="digits",
        n_layers=1,
        n_embd=8,
        dropout=0.0,
        parameterization="velocity",
        time_sampling="importance",
        flow_matching_weight=0.1,
        schedule="idode_sp",
    )
    model = runs.compiled_model(config)
    assert (model.parameterization, model.time_sampling, model.flow_matching_weight) == ("velocity", "importance", 0.1)
    assert type(model.schedule) is schedules.StraightPath
    run = str(tmp_path / "run")
    runs.save_run(run, config, model)
    assert runs.saved_config(run) == config
    loaded = vdm_tf.load(run)
    assert (loaded.parameterization, loaded.time_sampling, loaded.flow_matching_weight) == (
        "velocity",
        "importance",
        0.1,
    )
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    np.testing.assert_array_equal(loaded.elbo(x, seed=2)["bpd"].numpy(), model.elbo(x, seed=2)["bpd"].numpy())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"time_sampling": "importance"}, "take model.parameterization=velocity"),
        ({"flow_matching_weight": 0.1}, "take model.parameterization=velocity"),
        ({"parameterization": "velocity", "time_sampling": "importance", "timesteps": 10}, "continuous-time"),
        ({"parameterization": "velocity", "model": "cdm"}, "train a VDM"),
        ({"parameterization": "velocity", "sde": "vp"}, "train a VDM"),
        ({"schedule": "idode_sp", "multiscale_levels": 1}, "train a VDM"),
        ({"parameterization": "velocity", "time_sampling": "importance"}, "learned_monotonic shape"),
        ({"parameterization": "velocity", "flow_matching_weight": 0.1, "schedule": "learned_linear"}, "fixed schedule"),
        ({"parameterization": "v"}, "Unknown model.parameterization 'v'; expected eps or velocity"),
    ],
)
def test_configurations_that_cannot_train_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        Config().replace(**changes)


def test_the_idode_presets_build_what_they_say():
    from trainers import configs

    for name in ("digits_idode", "photos_idode", "cifar10_idode"):
        model = configs.PRESETS[name].model
        assert (model.parameterization, model.time_sampling) == ("velocity", "importance"), name
        assert configs.PRESETS[name].schedule.kind == "idode_vp", name
    cifar = configs.PRESETS["cifar10_idode"]  # thu-ml/i-DODE configs/cifar10.py
    assert (cifar.schedule.gamma_min, cifar.schedule.gamma_max) == (-13.3, 5.0)
    assert (cifar.network.n_layers, cifar.network.n_embd, cifar.network.dropout, cifar.network.attention) == (
        32,
        128,
        0.1,
        False,
    )
    assert (cifar.data.batch_size, cifar.optimizer.learning_rate, cifar.optimizer.ema_momentum) == (128, 2e-4, 0.9999)
    assert cifar.trainer.train_steps == 6_000_000


def test_fine_tuning_with_flow_matching_resumes_the_run_it_continues(tmp_path):
    """The presets' fine-tuning: the same run directory resumed with flow_matching_weight > 0, whose
    checkpoint has no running sums of the two new terms (they start at zero, the rest is restored)."""
    from trainers import configs, train

    config = configs.PRESETS["digits_idode"].replace(n_layers=1, n_embd=8, batch_size=4, jit_compile=False)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    trainer.model.optimizer.iterations.assign(3)  # as if it had trained 3 steps
    trainer._window["bpd_count"].assign(1.0)  # a logged term's running count since the last log
    trainer.save()
    fine_tuning = config.replace(flow_matching_weight=0.1)
    resumed = train.Trainer(fine_tuning, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    assert resumed.restore() == 3
    for a, b in zip(resumed.model.trainable_variables, trainer.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    window = {name: float(value.numpy()) for name, value in resumed._window.items()}
    assert window["flow_matching_count"] == window["loss_count"] == 0.0
    assert window["bpd_count"] == 1.0


def test_the_readme_section_runs_as_written(tmp_path):
    """README.md's i-DODE section: the Python block builds the model it describes; the two
    commands give the preset's configuration, then the same run with the fine-tuning term
    (the run itself is `test_fine_tuning_with_flow_matching_resumes_the_run_it_continues`)."""
    import re
    import shlex

    from absl import flags

    from trainers import configs, main

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("### Trained for the ODE likelihood (i-DODE)") :]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace = {"vdm_tf": vdm_tf}
    exec(snippet, namespace)
    model = namespace["model"]
    assert (model.parameterization, model.time_sampling) == ("velocity", "importance")
    assert isinstance(model.schedule, schedules.VariancePreserving) and model.image_shape == (32, 32, 3)
    train, fine_tune = re.search(r"```\n(python -m trainers.main.*?)```", section, flags=re.S).group(1).splitlines()

    def config_of(command, saved=None):
        argv = shlex.split(command)[2:]  # after `python -m`: trainers.main and its flags
        flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        try:
            return main.config_from_flags(saved)
        finally:
            flags.FLAGS.unparse_flags()

    first = config_of(train)
    assert first == configs.PRESETS["digits_idode"]
    second = config_of(fine_tune, saved=first)
    assert second == first.replace(flow_matching_weight=0.1, train_steps=2000)
    assert second.trainer.train_steps > first.trainer.train_steps


@pytest.mark.parametrize("schedule", [schedules.VariancePreserving(), schedules.StraightPath()], ids=["vp", "sp"])
def test_the_bits_back_codec_runs_the_chain_on_eps_hat(schedule):
    """The codec's chain needs eps_hat: with a velocity network on either path it must convert the
    output as the model does (the network's raw output is v, not eps)."""
    from vdm_tf.compression import BitsBackCodec

    model = VDM(vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=8), schedule, (8, 8, 1), parameterization="velocity")
    eps_hat, _, shape = BitsBackCodec(model, num_steps=4, batch_size=2)._network(2, (8, 8))
    z = tf.random.stateless_normal(shape, [1, 2])
    np.testing.assert_array_equal(eps_hat(z, tf.constant(-2.0)), model._denoise(z, tf.fill([2], -2.0)))
    assert not np.allclose(eps_hat(z, tf.constant(-2.0)), model.denoiser(z, tf.fill([2], -2.0)), atol=1e-3)
