"""Score-SDE toolkit on Gaussian data: SDE formulas, samplers and the exact ODE likelihood."""

import numpy as np
import pytest
import tensorflow as tf
from gaussian import GaussianDenoiser, GaussianScoreModel

from vdm_tf import VDM, likelihood, samplers, schedules, sde

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


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
    model = GaussianScoreModel(SDES["vp"](), MEAN, STD)
    z0 = np.repeat((MEAN + 0.5 * STD)[None].astype(np.float32), 64, axis=0)  # one point, 64 probes
    out = likelihood.ode_log_likelihood(model, z0, seed=3, probe=probe, rtol=1e-5, atol=1e-5)
    estimates = out["log_likelihood"].numpy()
    expected = model.ode_log_density(z0[:1])[0]
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert standard_error > 0, "each row must draw its own probe"
    assert abs(estimates.mean() - expected) < 4 * standard_error + 1e-3, (estimates.mean(), expected, standard_error)


SAMPLER_CASES = {
    "pc reverse_diffusion + langevin (vp)": ("vp", dict(sampler="pc", num_steps=400)),
    "pc euler_maruyama (subvp)": (
        "subvp",
        dict(sampler="pc", num_steps=400, predictor="euler_maruyama", corrector="none"),
    ),
    "pc reverse_diffusion + annealed langevin (ve)": (
        "ve",
        dict(sampler="pc", num_steps=400, corrector="annealed_langevin", snr=0.075),
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
    """16 x 16 pixels: Langevin's step size, set from the norms of the noise and the score, is
    made for high-dimensional data; at 16 dimensions it inflates the std by about 20%."""
    name, options = SAMPLER_CASES[case]
    mean, std = np.tile(MEAN, (4, 4, 1)), np.tile(STD, (4, 4, 1))
    model = GaussianScoreModel(SDES[name](), mean, std)
    options = dict(options)
    x = latents(model, options.pop("sampler"), 2000, seed=7, **options)
    standard_error = std / np.sqrt(len(x))
    assert np.all(np.abs(x.mean(0) - mean) < 4.5 * standard_error), np.abs(x.mean(0) - mean).max()
    std_error = np.abs(x.std(0) / std - 1)  # the estimate's own noise is 1.6% per pixel
    assert std_error.mean() < 0.04 and std_error.max() < 0.15, (std_error.mean(), std_error.max())


def test_sample_returns_uint8_images_for_every_sampler():
    model = gaussian_vdm()
    for sampler in samplers.SAMPLERS:
        images = samplers.sample(model, 3, sampler=sampler, num_steps=20, seed=1)
        assert images.dtype == tf.uint8 and images.shape == (3, *IMAGE_SHAPE)
    with pytest.raises(ValueError, match="sampler must be one of pc, ancestral, ode"):
        samplers.sample(model, 3, sampler="ddim")
