"""Score models of fixed SDEs: likelihood-weighted score matching is VDM's diffusion loss."""

import numpy as np
import pytest
import tensorflow as tf
from gaussian import GaussianData, GaussianDenoiser, GaussianScoreModel
from test_trainer import tiny_config

from trainers import configs, train
from vdm_tf import score_model, sde

IMAGE_SHAPE = (4, 4, 1)
SDES = {
    "vp": lambda: sde.VPSDE(),
    "subvp": lambda: sde.SubVPSDE(),
    "ve": lambda: sde.VESDE(sigma_min=0.01, sigma_max=20.0),
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return GaussianData(rng.uniform(-0.3, 0.3, IMAGE_SHAPE), rng.uniform(0.05, 0.2, IMAGE_SHAPE))


def gaussian_score_model(data, name):
    return score_model.ScoreSDEModel(GaussianDenoiser(data.mean, data.std), SDES[name](), IMAGE_SHAPE)


@pytest.mark.parametrize("name", sorted(SDES))
def test_score_is_the_analytic_score_in_the_sdes_coordinates(data, name):
    model = gaussian_score_model(data, name)
    expected = GaussianScoreModel(model.sde, data.mean, data.std)
    z = 3.0 * tf.random.stateless_normal((5,) + IMAGE_SHAPE, [0, 1])
    for t in (1e-4, 0.3, 0.9):
        times = tf.fill([5], t)
        np.testing.assert_allclose(model.score(z, times), expected.score(z, times), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SDES))
def test_diffusion_loss_is_likelihood_weighted_score_matching(data, name):
    """E[diffusion] = 0.5 int_{t_min}^1 g(t)^2 E||s_theta - grad log q(z_t | x)||^2 dt (Song et al. 2021b).

    The right side is integrated in the SDE's own time from its drift and diffusion
    coefficients (log-spaced grid: the VP integrand grows like 1/t at small t); the model draws
    its times uniformly in gamma instead, so the test also checks d gamma / dt = g^2 / s^2.
    """
    model = gaussian_score_model(data, name)
    process = model.sde
    t = np.geomspace(process.t_min, 1.0, 100_001)
    mean, std = (v.numpy().astype(np.float64) for v in process.marginal(tf.constant(t, tf.float32)))
    g = process.diffusion(tf.constant(t, tf.float32)).numpy().astype(np.float64)
    gamma = 2.0 * (np.log(std) - np.log(mean))
    # ||s_theta - grad log q||^2 = ||eps_hat - eps||^2 / s_t^2, with the squared error at gamma(t).
    integrand = 0.5 * g**2 / std**2 * data.expected_squared_error(gamma)
    expected_bpd = np.trapezoid(integrand, t) / (data.num_dims * np.log(2.0))
    means = [model.elbo(data.sample(4096, seed=100 + i), seed=i)["diffusion"].numpy().mean() for i in range(8)]
    mean_bpd, stderr = np.mean(means), np.std(means, ddof=1) / np.sqrt(len(means))
    assert abs(mean_bpd - expected_bpd) < 4 * stderr + 2e-3 * expected_bpd, (mean_bpd, stderr, expected_bpd)


def test_trainer_trains_and_restores_a_ve_score_model(tmp_path):
    config = tiny_config(train_steps=2, sde="ve", sigma_max=10.0)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    metrics = trainer.train()
    assert np.isfinite(metrics["bpd"])
    model = train.restore_for_inference(str(tmp_path), config)
    assert isinstance(model, score_model.ScoreSDEModel) and isinstance(model.sde, sde.VESDE)
    assert model.sde.sigma_max == 10.0
    np.testing.assert_allclose(model.schedule.gamma_1, 2 * np.log(10.0), rtol=1e-5)
    with pytest.raises(ValueError, match="expected vdm, vp, subvp or ve"):
        configs.build_model(tiny_config(sde="vpsde"))
