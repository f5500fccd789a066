"""The VDM estimators against closed forms on discretized Gaussian data (tests/gaussian.py).

Standard errors come from the spread of whole-batch means over independent batches: the
antithetic time samples make the examples of one batch dependent, so per-example spreads
would overstate them.
"""

import numpy as np
import pytest
import tensorflow as tf
from gaussian import BIN_CENTRES, GaussianData, GaussianDenoiser, PosteriorDenoiser
from test_schedules import randomised_monotonic

from vdm_tf import VDM, images, schedules

IMAGE_SHAPE = (4, 4, 1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # |mean| + 3.5 std < 1: the discretization to 256 levels does not clip the tails.
    return GaussianData(rng.uniform(-0.3, 0.3, IMAGE_SHAPE), rng.uniform(0.05, 0.2, IMAGE_SHAPE))


def batch_means(model, data, num_batches, batch_size=4096):
    """Mean bpd of `num_batches` independent batches (fresh data, fresh seed each)."""
    means = [
        model.elbo(data.sample(batch_size, seed=1000 + i), seed=i)["bpd"].numpy().mean() for i in range(num_batches)
    ]
    return np.mean(means), np.std(means, ddof=1) / np.sqrt(num_batches)


def linear_model(data, schedule, timesteps=0):
    return VDM(GaussianDenoiser(data.mean, data.std), schedule, IMAGE_SHAPE, timesteps=timesteps)


@pytest.mark.parametrize("timesteps", [0, 10, 100])
def test_elbo_matches_numerical_integration(data, timesteps):
    schedule = schedules.FixedLinear(gamma_min=-13.3, gamma_max=5.0)
    mean, stderr = batch_means(linear_model(data, schedule, timesteps), data, num_batches=12)
    grid = schedule(tf.linspace(0.0, 1.0, timesteps + 1)).numpy() if timesteps else None
    expected = data.vlb_bpd(float(schedule.gamma_0), float(schedule.gamma_1), grid)
    assert abs(mean - expected) < 4 * stderr + 1e-3, (mean, stderr, expected)
    assert stderr < 0.05


@pytest.mark.parametrize("timesteps, max_gap", [(0, 0.03), (1000, 0.12)])
def test_elbo_with_the_optimal_denoiser_lies_just_above_the_nll(data, timesteps, max_gap):
    model = VDM(PosteriorDenoiser(data), schedules.FixedLinear(), IMAGE_SHAPE, timesteps=timesteps)
    mean, stderr = batch_means(model, data, num_batches=16)
    nll = data.nll_bpd()
    assert mean > nll - 3 * stderr, (mean, stderr, nll)
    assert mean < nll + max_gap, (mean, stderr, nll)


def dissimilar_images(data):
    """The pixels nearest the data mean, two data samples, all 0, all 255 and all 128 (f = 1/256:
    the prior is its variance part alone). Per image, the terms differ by up to 15 times."""
    grey = [np.full((1, *IMAGE_SHAPE), value, np.uint8) for value in (0, 255, 128)]
    mean = images.decode(tf.constant(data.mean, tf.float32)).numpy()[None]
    return np.concatenate([mean, data.sample(2, seed=5), *grey])


@pytest.mark.parametrize("gamma_0, gamma_1", [(-10.0, 5.0), (-6.0, 0.5)])
def test_each_term_of_the_elbo_matches_its_closed_form_per_image(data, gamma_0, gamma_1):
    """Per image, with f = encode(x) and the linear denoiser, VDM eq. 11's terms in closed form:
    the prior 0.5 sum(alpha_1^2 f^2 + sigma_1^2 - log sigma_1^2 - 1) is deterministic (0.0002-0.005
    bpd at gamma_1 = 5, 0.1-0.3 bpd at gamma_1 = 0.5); the reconstruction (decoder quadrature) and
    the diffusion (0.5 * integral of the per-image E||eps - eps_hat||^2 over gamma) are compared
    over 32 independent seeds of 16 time samples each."""
    x = dissimilar_images(data)
    f = BIN_CENTRES[x]
    model = linear_model(data, schedules.FixedLinear(gamma_0, gamma_1))
    runs = [model.elbo(x, seed=seed, num_time_samples=16) for seed in range(32)]
    to_bpd = 1 / (data.num_dims * np.log(2))
    expected = {
        "prior": data.prior_nats(gamma_1, f) * to_bpd,
        "reconstruction": data.reconstruction_nats(gamma_0, x) * to_bpd,
        "diffusion": data.continuous_diffusion_nats(gamma_0, gamma_1, f, num=20_001) * to_bpd,
    }
    for run in runs:
        np.testing.assert_allclose(run["prior"], expected["prior"], rtol=1e-5)
        total = run["prior"] + run["reconstruction"] + run["diffusion"]
        np.testing.assert_allclose(run["bpd"], total, rtol=1e-6)
    for name in ("reconstruction", "diffusion"):
        values = np.stack([run[name].numpy() for run in runs])
        mean, stderr = values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values))
        assert np.all(np.abs(mean - expected[name]) < 4.5 * stderr), (name, mean, expected[name], stderr)


def test_time_samples_average_each_images_own_copies(data):
    """elbo(x, num_time_samples=K) must average image n's K copies, not copies of other images:
    the deterministic prior is unchanged by K, and the bpd with K = 4 matches the mean of
    independent single-sample calls within their standard errors (dissimilar images, whose
    bpd differ by up to 15 times: averaging copies of different images is 5-10 of them off)."""
    x = dissimilar_images(data)
    model = linear_model(data, schedules.FixedLinear(-10.0, 5.0))
    np.testing.assert_array_equal(model.elbo(x, seed=0, num_time_samples=4)["prior"], model.elbo(x, seed=0)["prior"])
    with_k = np.stack([model.elbo(x, seed=seed, num_time_samples=4)["bpd"].numpy() for seed in range(64)])
    single = np.stack([model.elbo(x, seed=1000 + seed)["bpd"].numpy() for seed in range(256)])
    stderr = np.hypot(with_k.std(0, ddof=1) / np.sqrt(len(with_k)), single.std(0, ddof=1) / np.sqrt(len(single)))
    assert np.all(np.abs(with_k.mean(0) - single.mean(0)) < 4.5 * stderr), (with_k.mean(0), single.mean(0), stderr)


def test_continuous_vlb_depends_only_on_the_endpoints(data):
    monotonic = randomised_monotonic()
    linear = schedules.FixedLinear(gamma_min=-10.0, gamma_max=6.0)
    expected = data.vlb_bpd(-10.0, 6.0)
    results = {}
    for name, schedule in [("linear", linear), ("monotonic", monotonic)]:
        results[name] = batch_means(linear_model(data, schedule), data, num_batches=12)
        mean, stderr = results[name]
        assert abs(mean - expected) < 4 * stderr + 1e-3, (name, mean, stderr, expected)
    (m1, s1), (m2, s2) = results.values()
    assert abs(m1 - m2) < 4 * np.hypot(s1, s2)
    # The shape does matter in discrete time: the invariance is specific to continuous time.
    grid = monotonic(tf.linspace(0.0, 1.0, 11)).numpy()
    assert abs(data.vlb_bpd(-10.0, 6.0, grid) - data.vlb_bpd(-10.0, 6.0, np.linspace(-10, 6, 11))) > 0.2


def test_discrete_loss_decreases_as_timesteps_double(data):
    schedule = schedules.FixedLinear()
    estimates = [batch_means(linear_model(data, schedule, t), data, num_batches=6) for t in (5, 10, 20, 40)]
    for (m_coarse, s_coarse), (m_fine, s_fine) in zip(estimates, estimates[1:]):
        assert m_fine < m_coarse - 3 * np.hypot(s_coarse, s_fine), estimates
    continuous, _ = batch_means(linear_model(data, schedule), data, num_batches=6)
    assert continuous < estimates[-1][0]


def test_ancestral_samples_match_the_data_moments(data):
    # Ancestral sampling ignores the posterior variance of x within a step, so it is biased
    # towards too little variance by O(1 / num_steps): about 3% at 200 steps, 0.5% at 1000 here.
    model = linear_model(data, schedules.FixedLinear())
    num = 10_000
    samples = model.sample(num, num_steps=1000, seed=7)
    assert samples.dtype == tf.uint8 and samples.shape == (num,) + IMAGE_SHAPE
    f = 2 * (samples.numpy().astype(np.float64) + 0.5) / 256 - 1
    data_std = np.sqrt(data.f_var)
    np.testing.assert_array_less(np.abs(f.mean(0) - data.f_mean), 4 * data_std / np.sqrt(num))
    np.testing.assert_array_less(np.abs(f.std(0) / data_std - 1), 0.035)


def test_sampling_is_deterministic_per_seed_and_argmax_decodes_the_same_path(data):
    model = linear_model(data, schedules.FixedLinear())
    first = model.sample(500, num_steps=20, seed=3).numpy()
    np.testing.assert_array_equal(first, model.sample(500, num_steps=20, seed=3).numpy())
    assert np.any(first != model.sample(500, num_steps=20, seed=4).numpy())
    # The decoder is sharp at gamma_0 = -13.3: its mode is almost always the sampled value.
    argmax = model.sample(500, num_steps=20, seed=3, argmax=True).numpy()
    assert 0.9 < np.mean(argmax == first) < 1.0
