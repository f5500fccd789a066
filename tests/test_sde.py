"""Score-SDE toolkit on Gaussian data: SDE formulas, samplers and the exact ODE likelihood."""

import numpy as np
import pytest
import tensorflow as tf
from gaussian import (
    BIN_CENTRES,
    CorrelatedGaussianScoreModel,
    GaussianDenoiser,
    GaussianScoreModel,
    reconstruction_nll_per_value,
    rounded_moments,
    sigmoid,
)

from vdm_tf import VDM, images, likelihood, samplers, schedules, sde

IMAGE_SHAPE = (4, 4, 1)
MEAN = np.linspace(-0.5, 0.5, 16).reshape(IMAGE_SHAPE)
STD = np.linspace(0.1, 0.4, 16).reshape(IMAGE_SHAPE)

SDES = {
    "vp": lambda: sde.VPSDE(),
    "subvp": lambda: sde.SubVPSDE(),
    "ve": lambda: sde.VESDE(sigma_min=0.01, sigma_max=20.0),
    "schedule": lambda: sde.ScheduleSDE(schedules.FixedLinear(-10.0, 8.0)),
}


@pytest.mark.parametrize("name", sorted(SDES))
def test_marginals_solve_the_moment_equations_of_the_sde(name):
    """For dz = f(t) z dt + g dw: dm/dt = f m and d(s^2)/dt = 2 f s^2 + g^2 (finite differences)."""
    process = SDES[name]()
    t = tf.constant(np.linspace(0.05, 0.95, 19), tf.float32)
    h = 1e-3
    (m_plus, s_plus), (m_minus, s_minus) = process.marginal(t + h), process.marginal(t - h)
    m, s = process.marginal(t)
    f, g = process.drift_coefficient(t), process.diffusion(t)
    np.testing.assert_allclose((m_plus - m_minus) / (2 * h), f * m, rtol=2e-2, atol=1e-3)
    variance_rate = (tf.square(s_plus) - tf.square(s_minus)) / (2 * h)
    np.testing.assert_allclose(variance_rate, 2 * f * tf.square(s) + tf.square(g), rtol=2e-2, atol=1e-3)


def test_closed_form_marginals():
    t = tf.constant([0.1, 0.5, 1.0])
    ve = sde.VESDE(0.01, 50.0)
    mean, std = ve.marginal(t)
    np.testing.assert_allclose(std, 0.01 * (50.0 / 0.01) ** t.numpy(), rtol=1e-5)
    np.testing.assert_allclose(mean, 1.0)
    vp, subvp = sde.VPSDE(0.1, 20.0), sde.SubVPSDE(0.1, 20.0)
    integral = 0.1 * t.numpy() + 0.5 * (20.0 - 0.1) * t.numpy() ** 2
    np.testing.assert_allclose(vp.marginal(t)[0], np.exp(-0.5 * integral), rtol=1e-5)
    np.testing.assert_allclose(vp.marginal(t)[1] ** 2, 1 - np.exp(-integral), rtol=1e-5)
    np.testing.assert_allclose(subvp.marginal(t)[1], 1 - np.exp(-integral), rtol=1e-5)
    schedule = schedules.FixedLinear(-10.0, 8.0)
    gamma = -10.0 + 18.0 * t.numpy()
    mean, std = sde.ScheduleSDE(schedule).marginal(t)
    np.testing.assert_allclose(mean**2, 1 / (1 + np.exp(gamma)), rtol=1e-5)
    np.testing.assert_allclose(sde.ScheduleSDE(schedule).beta(t), 18.0 / (1 + np.exp(-gamma)), rtol=1e-5)


def gaussian_vdm():
    """A VDM whose denoiser is the analytic optimum for continuous Gaussian data."""
    model = VDM(GaussianDenoiser(MEAN, STD), schedules.FixedLinear(-10.0, 8.0), IMAGE_SHAPE)
    model.build()
    return model


def test_vdm_score_is_the_analytic_score_of_its_schedule_sde():
    model = gaussian_vdm()
    reference = GaussianScoreModel(model.sde, MEAN, STD)
    z = tf.random.stateless_normal((3, *IMAGE_SHAPE), (1, 2))
    t = tf.constant([0.1, 0.5, 0.9])
    np.testing.assert_allclose(model.score(z, t), reference.score(z, t), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "schedule"])
def test_ode_log_likelihood_equals_the_closed_form(name):
    model = GaussianScoreModel(SDES[name](), MEAN, STD)
    z0 = (MEAN + STD * np.random.default_rng(0).standard_normal((4, *IMAGE_SHAPE))).astype(np.float32)
    out = likelihood.ode_log_likelihood(model, z0, exact_divergence=True, rtol=1e-6, atol=1e-6)
    expected = model.ode_log_density(z0)
    per_dim_error = np.abs(out["log_likelihood"].numpy() - expected) / np.prod(IMAGE_SHAPE)
    assert per_dim_error.max() < 1e-3, (out["log_likelihood"].numpy(), expected)
    assert int(out["nfe"]) > 10


def correlated_gaussian():
    """N(MEAN, cov) with cov_ij = STD_i STD_j 0.7^(grid distance of pixels i and j): the flow's
    Jacobian f I + 0.5 g^2 cov_t^-1 is far from diagonal."""
    row, col = np.divmod(np.arange(16), 4)
    distance = np.abs(row[:, None] - row) + np.abs(col[:, None] - col)
    std = STD.reshape(-1)
    return CorrelatedGaussianScoreModel(SDES["vp"](), MEAN, std[:, None] * std * 0.7**distance, IMAGE_SHAPE)


@pytest.fixture(scope="module")
def hutchinson_case():
    """1000 points of the correlated Gaussian, their exact ODE log-density (closed form) and
    A = integral of the flow's Jacobian over t (the same matrix at every point: the flow is affine)."""
    model = correlated_gaussian()
    num = 1000
    noise = np.random.default_rng(0).standard_normal((num, 16))
    cov = model.basis * model.independent.std.reshape(-1) ** 2 @ model.basis.T
    z0 = (MEAN.reshape(-1) + noise @ np.linalg.cholesky(cov).T).reshape(num, *IMAGE_SHAPE).astype(np.float32)
    exact = likelihood.ode_log_likelihood(model, z0[:8], exact_divergence=True)["log_likelihood"].numpy()
    np.testing.assert_allclose(exact, model.ode_log_density(z0[:8]), atol=1e-2)  # the exact path: D backward passes
    return model, z0, model.ode_log_density(z0), model.flow_divergence_integral()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased_with_its_analytic_variance(hutchinson_case, probe):
    """With one probe v per solve, the estimate minus the exact log-density is v^T A v - tr(A).
    Its mean is 0, and its variance is sum_{i != j} (A_ij^2 + A_ij A_ji) for Rademacher probes and
    ||A||_F^2 + tr(A A) for Gaussian ones (A is symmetric here: 2 sum_{i != j} A_ij^2, 2 ||A||_F^2).
    tr(A) = 31.5 nats; the standard error of the mean is 0.12 (Rademacher) and 0.38 nats (Gaussian),
    so a probe scaled by 1.05 (bias 0.1025 tr A = 3.2 nats) or all ones (bias sum_{i != j} A_ij) fails."""
    model, z0, exact, a = hutchinson_case
    out = likelihood.ode_log_likelihood(model, z0, seed=3, probe=probe, rtol=1e-5, atol=1e-5)
    error = out["log_likelihood"].numpy() - exact
    if probe == "rademacher":
        off_diagonal = a - np.diag(np.diag(a))
        variance = np.sum(off_diagonal**2 + off_diagonal * off_diagonal.T)
    else:
        variance = np.sum(a**2 + a * a.T)
    assert abs(error.mean()) < 4 * np.sqrt(variance / len(error)), (error.mean(), np.sqrt(variance / len(error)))
    # The sample variance's standard error from the sample's fourth central moment.
    fourth_moment = np.mean((error - error.mean()) ** 4)
    variance_error = np.sqrt((fourth_moment - error.var() ** 2) / len(error))
    assert abs(error.var(ddof=1) - variance) < 4 * variance_error, (error.var(ddof=1), variance, variance_error)


def dissimilar_images():
    """The pixel values nearest MEAN, MEAN + 1.5 STD and MEAN - 2 STD (clipped)."""
    return np.stack([images.decode(tf.constant(MEAN + k * STD, tf.float32)).numpy() for k in (0.0, 1.5, -2.0)])


def per_image_means(values, num_images):
    """Mean and standard error over the rows of each image, for values of np.repeat(x, R, axis=0)."""
    values = values.reshape(num_images, -1)
    return values.mean(1), values.std(1, ddof=1) / np.sqrt(values.shape[1])


def test_ode_bpd_with_uniform_dequantization_is_the_closed_form_plus_7():
    """bpd = -log p_ODE(f) / (D ln 2) + 7 with f = 2 (x + u) / 256 - 1, u ~ U[0, 1): f is the bin
    centre plus uniform noise of variance (2/256)^2 / 12 and log p_ODE is quadratic, so the mean
    over u is the closed form at the centre with that variance added. 1024 draws per image: at
    the image nearest the mean the noise term is about 30 standard errors (bin centres alone fail)."""
    model = GaussianScoreModel(SDES["vp"](), MEAN, STD)
    x = dissimilar_images()
    out = likelihood.ode_bpd(model, np.repeat(x, 1024, axis=0), seed=1, rtol=1e-6, atol=1e-6)
    mean, standard_error = per_image_means(out["bpd"].numpy(), len(x))
    dims = np.prod(IMAGE_SHAPE)
    expected = -model.ode_log_density(BIN_CENTRES[x], noise_var=(2 / 256) ** 2 / 12) / (dims * np.log(2)) + 7
    assert np.all(np.abs(mean - expected) < 4 * standard_error), (mean, expected, standard_error)


def test_ode_bpd_variational_is_the_closed_form_bound():
    """VDM with the analytic denoiser: z_0 = alpha_0 f + sigma_0 eps and bpd = (-log p_ODE(z_0)
    - log p(x | z_0) + log q(z_0 | x)) / (D ln 2). In expectation over eps, each term in closed
    form: the quadratic log p_ODE with variance sigma_0^2 added, the decoder's expected NLL by
    quadrature, and E log q(z_0 | x) = -D / 2 (1 + log(2 pi sigma_0^2)), a negative entropy."""
    model = gaussian_vdm()
    x = dissimilar_images()
    options = dict(dequantization="variational", rtol=1e-6, atol=1e-6)
    out = likelihood.ode_bpd(model, np.repeat(x, 512, axis=0), seed=1, **options)
    mean, standard_error = per_image_means(out["bpd"].numpy(), len(x))
    gamma_0, dims = float(model.schedule.gamma_0), np.prod(IMAGE_SHAPE)
    variance_0 = sigmoid(gamma_0)
    ode_nats = -GaussianScoreModel(model.sde, MEAN, STD).ode_log_density(
        np.sqrt(sigmoid(-gamma_0)) * BIN_CENTRES[x], noise_var=variance_0
    )
    reconstruction_nats = reconstruction_nll_per_value(gamma_0)[x.reshape(len(x), -1)].sum(-1)
    log_q = -0.5 * dims * (1 + np.log(2 * np.pi * variance_0))
    expected = (ode_nats + reconstruction_nats + log_q) / (dims * np.log(2))
    assert np.all(np.abs(mean - expected) < 4 * standard_error), (mean, expected, standard_error)


def test_langevin_corrector_keeps_a_16_dimensional_gaussian():
    """Corrector steps alone (no predictor) on N(0, I) at 4 x 4 pixels, where its exact score is
    -z at every t of the VP SDE: the chain starts in its target and must stay there. The step
    is set from the noise and score norms averaged over the batch (Song et al.'s code); computed
    per example it depends on the example's own state, and the std settles at 1.14."""
    model = GaussianScoreModel(SDES["vp"](), np.zeros(IMAGE_SHAPE), np.ones(IMAGE_SHAPE))
    num = 4000
    x = samplers.pc_sample_latents(model, num, num_steps=200, seed=5, predictor="none", corrector="langevin").numpy()
    assert np.all(np.abs(x.mean(0)) < 4.5 / np.sqrt(num)), np.abs(x.mean(0)).max() * np.sqrt(num)
    assert abs(x.std() - 1) < 0.05, x.std()  # 1.015: unadjusted Langevin's own O(step) excess


SAMPLER_CASES = {
    "pc reverse_diffusion + langevin (vp)": (
        "vp",
        dict(sampler="pc", num_steps=400, predictor="reverse_diffusion", corrector="langevin"),
    ),
    "pc euler_maruyama (subvp)": (
        "subvp",
        dict(sampler="pc", num_steps=400, predictor="euler_maruyama", corrector="none"),
    ),
    "pc reverse_diffusion + annealed langevin (ve)": (
        "ve",
        dict(sampler="pc", num_steps=400, predictor="reverse_diffusion", corrector="annealed_langevin", snr=0.075),
    ),
    "ancestral (schedule)": ("schedule", dict(sampler="ancestral", num_steps=400)),
    "ode (vp)": ("vp", dict(sampler="ode")),
}


def latents(model, sampler, num, seed, **options):
    if sampler == "ode":
        x_hat, nfe = samplers.ode_sample_latents(model, num, seed=seed, **options)
        assert int(nfe) > 10
        return x_hat.numpy()
    if sampler == "ancestral":
        options = {**options, "predictor": "ancestral", "corrector": "none"}
    return samplers.pc_sample_latents(model, num, seed=seed, **options).numpy()


@pytest.mark.parametrize("case", sorted(SAMPLER_CASES))
def test_samplers_reproduce_the_gaussian(case):
    """4 x 4 pixels, 8000 samples: each pixel's std estimate has 0.8% noise. What remains is each
    sampler's own discretisation error: ancestral steps are O(1 / num_steps) too narrow (-1.5%
    here), and Langevin with snr = 0.16 is unadjusted Langevin, O(step / variance) too wide on
    the narrowest pixels (+2% on average, +4% on the narrowest). Per-example Langevin steps
    (instead of Song et al.'s batch mean) make the std 13% too wide on average."""
    name, options = SAMPLER_CASES[case]
    model = GaussianScoreModel(SDES[name](), MEAN, STD)
    options = dict(options)
    x = latents(model, options.pop("sampler"), 8000, seed=7, **options)
    standard_error = STD / np.sqrt(len(x))
    assert np.all(np.abs(x.mean(0) - MEAN) < 4.5 * standard_error), np.abs(x.mean(0) - MEAN).max()
    std_error = x.std(0) / STD - 1
    assert abs(std_error.mean()) < 0.03 and np.abs(std_error).max() < 0.07, (std_error.mean(), std_error.max())


def test_sample_rounds_each_samplers_latents_to_uint8_images_of_the_data():
    """`sample` is `images.decode` of its sampler's latents (the same draws for the same seed),
    and the images have the moments of the model's data after rounding and clipping to 0..255
    (`rounded_moments`). 2000 samples, 100 steps: per pixel the std estimate has 1.6% noise;
    ancestral sampling is 4% too narrow at 100 steps (see test_samplers_reproduce_the_gaussian);
    "pc" is Euler-Maruyama without corrector here, the default on a VDM's variance-preserving SDE."""
    model = gaussian_vdm()
    num, steps = 2000, 100
    references = {
        "pc": lambda: samplers.pc_sample_latents(model, num, num_steps=steps, seed=1),
        "ancestral": lambda: samplers.pc_sample_latents(
            model, num, num_steps=steps, seed=1, predictor="ancestral", corrector="none"
        ),
        "ode": lambda: samplers.ode_sample_latents(model, num, seed=1)[0],
    }
    mean, std = rounded_moments(MEAN, STD)
    for sampler in samplers.SAMPLERS:
        x = samplers.sample(model, num, sampler=sampler, num_steps=steps, seed=1)
        assert x.dtype == tf.uint8 and x.shape == (num, *IMAGE_SHAPE)
        np.testing.assert_array_equal(x, images.decode(references[sampler]()), err_msg=sampler)
        f = BIN_CENTRES[x.numpy()]
        assert np.all(np.abs(f.mean(0) - mean) < 4.5 * std / np.sqrt(num)), (sampler, f.mean(0) - mean)
        std_error = f.std(0) / std - 1
        assert abs(std_error.mean()) < 0.06 and np.abs(std_error).max() < 0.12, (sampler, std_error)
    with pytest.raises(ValueError, match="sampler must be one of pc, ancestral, ode"):
        samplers.sample(model, 3, sampler="ddim")
