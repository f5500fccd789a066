"""i-DODE's dequantizations in `vdm_tf.likelihood.ode_bpd` (Zheng et al. 2023; thu-ml/i-DODE):
truncated-normal dequantization and the uniform protocol started at gamma = -11.8, both
integrated in gamma = log(s^2 / m^2).

The references are closed forms on continuous Gaussian data with its exact score
(`gaussian.GaussianScoreModel`): the ODE maps each pixel affinely, so log p_ODE is quadratic and
its mean over any zero-mean dequantization noise is the closed form with the noise's variance
added; the truncated normal's variance and entropy come from scipy. Each pixel's flow has a
diagonal Jacobian, for which a Rademacher Hutchinson probe gives the exact trace, so the only
noise left is that of the dequantization draws (4 standard errors) and the solver's error.
"""

import copy
import re

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf
from exported_model import ODE_TOLERANCE, random_images, tiny_model, tiny_score_sde_model
from gaussian import BIN_CENTRES, GaussianScoreModel, sigmoid
from test_sde import IMAGE_SHAPE, MEAN, STD, dissimilar_images, per_image_means

import vdm_tf
from tests.client_commands import PROJECT_ROOT
from vdm_tf import likelihood, schedules, sde, traced

DIMS = int(np.prod(IMAGE_SHAPE))
REPEATS = 256  # dequantization draws per image
# The ODE solve at the default rtol = atol = 1e-5 in float32, ~150 steps: its error on these
# images is below 2e-5 bpd (against a solve at 1e-7); the allowance is 5 times that.
SOLVER_ALLOWANCE = 1e-4


def vp_time_of_gamma(gamma, beta_min=0.1, beta_max=20.0):
    """t of `sde.VPSDE()` where log(s^2 / m^2) = gamma: s^2 / m^2 = expm1(integral of beta), so
    the integral beta_min t + (beta_max - beta_min) t^2 / 2 is log1p(exp(gamma))."""
    half_slope = 0.5 * (beta_max - beta_min)
    return (-beta_min + np.sqrt(beta_min**2 + 4 * half_slope * np.log1p(np.exp(gamma)))) / (2 * half_slope)


def started_at(model, t_start):
    """The closed-form model of the same data whose ODE starts at t_start instead of t_min."""
    process = copy.copy(model.sde)
    process.t_min = float(t_start)
    return GaussianScoreModel(process, model.mean, model.std)


def truncated_normal_bpd(model, x, gamma_start):
    """E_eps of the truncated-normal bound, bpd per image: z = m f + s eps with eps ~ N(0, 1)
    cut at tau = m / (256 s) (m^2 = sigmoid(-gamma), s^2 = sigmoid(gamma) on these VP SDEs),
    E log p_ODE(z) in closed form with variance s^2 Var(eps) added, E log q = -entropy of z."""
    m, s = np.sqrt(sigmoid(-gamma_start)), np.sqrt(sigmoid(gamma_start))
    q = scipy.stats.truncnorm(-m / (256 * s), m / (256 * s))
    log_p = model.ode_log_density(m * BIN_CENTRES[x], noise_var=s**2 * q.var())
    log_q = -DIMS * (q.entropy() + np.log(s))
    return (log_q - log_p) / (DIMS * np.log(2))


@pytest.fixture(scope="module")
def vp_model():
    return GaussianScoreModel(sde.VPSDE(), MEAN, STD)


@pytest.fixture(scope="module")
def schedule_model():
    """gamma_0 = -11: tau = exp(5.5) / 256 = 0.96, a truncation that moves the entropy by 0.8 nats per pixel."""
    return GaussianScoreModel(sde.ScheduleSDE(schedules.FixedLinear(-11.0, 8.0)), MEAN, STD)


@pytest.mark.parametrize("name", ["schedule", "vp"])
def test_truncated_normal_bpd_is_the_closed_form(name, request):
    """The ODE starts at the SDE's own start gamma(t_min) (-11 for the schedule, log expm1(1e-6)
    = -13.8 for the VP SDE, tau = 0.96 and 3.9) from z = m f + s eps, and the bound adds the
    truncated normal's log q: on 3 images, 256 draws each, the mean is the closed form to within
    4 standard errors (3e-6 to 3e-4 bpd) plus the solver's allowance. A Gaussian entropy in its
    place is 1.1 bpd off (schedule), a start 0.1 later in gamma 0.03 bpd."""
    model = request.getfixturevalue(f"{name}_model")
    x = dissimilar_images()
    out = likelihood.ode_bpd(model, np.repeat(x, REPEATS, axis=0), seed=1, dequantization="truncated_normal")
    mean, standard_error = per_image_means(out["bpd"].numpy(), len(x))
    gamma_start = float(model.sde.gamma(tf.constant([model.sde.t_min]))[0])
    expected = truncated_normal_bpd(model, x, gamma_start)
    assert np.all(np.abs(mean - expected) < 4 * standard_error + SOLVER_ALLOWANCE), (mean, expected, standard_error)
    assert int(out["nfe"]) > 10


def test_draws_are_averaged_per_image_in_one_solve(schedule_model):
    """`draws=K`: each image's K draws (rows d * N + i of one batch, one solve) averaged. On the
    closed form: 16 repeats of each image, 16 draws each, are within 4 standard errors of it (a
    mean over other rows than an image's own draws mixes these images, whose closed forms are 6.2,
    7.8 and 9.1 bpd, and fails); and the result is exactly the solve of the tiled batch, averaged
    over its K blocks."""
    x = dissimilar_images()
    options = dict(seed=1, dequantization="truncated_normal")
    out = likelihood.ode_bpd(schedule_model, np.repeat(x, 16, axis=0), draws=16, **options)
    assert out["bpd"].shape == (len(x) * 16,)
    mean, standard_error = per_image_means(out["bpd"].numpy(), len(x))
    gamma_start = float(schedule_model.sde.gamma(tf.constant([schedule_model.sde.t_min]))[0])
    expected = truncated_normal_bpd(schedule_model, x, gamma_start)
    assert np.all(np.abs(mean - expected) < 4 * standard_error + SOLVER_ALLOWANCE), (mean, expected, standard_error)
    batched = likelihood.ode_bpd(schedule_model, x, draws=2, **options)
    tiled = likelihood.ode_bpd(schedule_model, np.tile(x, (2, 1, 1, 1)), **options)
    np.testing.assert_array_equal(batched["bpd"].numpy(), tiled["bpd"].numpy().reshape(2, -1).mean(0))
    assert int(batched["nfe"]) == int(tiled["nfe"])


def test_exact_trace_gives_the_hutchinson_numbers_on_independent_pixels(schedule_model):
    """The exact trace in gamma: same draws (same seed), and here the same divergence."""
    x = np.repeat(dissimilar_images(), 2, axis=0)
    options = dict(seed=3, dequantization="truncated_normal")
    hutchinson = likelihood.ode_bpd(schedule_model, x, **options)["bpd"].numpy()
    exact = likelihood.ode_bpd(schedule_model, x, exact_divergence=True, **options)["bpd"].numpy()
    np.testing.assert_allclose(exact, hutchinson, atol=1e-5)


def test_truncated_normal_from_a_later_start(vp_model):
    """start_gamma = -12 on the VP SDE: t found by the search on gamma(t), tau = exp(6) / 256 = 1.58;
    the closed form starts its ODE at t(-12) = 6.1e-5 (solved exactly for the VP SDE)."""
    x = dissimilar_images()
    options = dict(dequantization="truncated_normal", start_gamma=-12.0)
    out = likelihood.ode_bpd(vp_model, np.repeat(x, REPEATS, axis=0), seed=2, **options)
    mean, standard_error = per_image_means(out["bpd"].numpy(), len(x))
    expected = truncated_normal_bpd(started_at(vp_model, vp_time_of_gamma(-12.0)), x, -12.0)
    assert np.all(np.abs(mean - expected) < 4 * standard_error + SOLVER_ALLOWANCE), (mean, expected, standard_error)


def test_uniform_protocol_from_minus_11_8_is_the_closed_form_plus_7(vp_model):
    """i-DODE's uniform protocol: z = 2 (x + u) / 256 - 1 itself is the state at gamma = -11.8
    (t = 3.8e-4 on the VP SDE), bpd = -log p_ODE(z) / (D ln 2) + 7. Started at t_min instead,
    the closed form is 0.3-1.5 bpd away."""
    x = dissimilar_images()
    options = dict(dequantization="uniform", start_gamma=likelihood.UNIFORM_START_GAMMA)
    out = likelihood.ode_bpd(vp_model, np.repeat(x, REPEATS, axis=0), seed=1, **options)
    mean, standard_error = per_image_means(out["bpd"].numpy(), len(x))
    reference = started_at(vp_model, vp_time_of_gamma(-11.8))
    expected = -reference.ode_log_density(BIN_CENTRES[x], noise_var=(2 / 256) ** 2 / 12) / (DIMS * np.log(2)) + 7
    assert np.all(np.abs(mean - expected) < 4 * standard_error + SOLVER_ALLOWANCE), (mean, expected, standard_error)


@pytest.fixture(scope="module", params=["vdm", "score_sde_ve"])
def tiny(request):
    """Untrained tiny models of two families (tests/exported_model.py); the CDM's score, a
    gradient of its classifier, runs the same code at four times the cost."""
    return {"vdm": tiny_model, "score_sde_ve": tiny_score_sde_model}[request.param]()


def test_truncated_normal_runs_on_every_model_family(tiny):
    """Finite bpd [N], the same numbers for the same seed, others for another, one trace for
    every batch size and seed."""
    options = dict(dequantization="truncated_normal", rtol=ODE_TOLERANCE, atol=ODE_TOLERANCE)
    x = random_images(3)
    first = likelihood.ode_bpd(tiny, x, seed=5, **options)
    assert first["bpd"].shape == (3,) and np.all(np.isfinite(first["bpd"].numpy())), first
    again = likelihood.ode_bpd(tiny, x, seed=5, **options)
    np.testing.assert_array_equal(again["bpd"].numpy(), first["bpd"].numpy())
    other = likelihood.ode_bpd(tiny, x[:2], seed=6, **options)
    assert other["bpd"].shape == (2,) and not np.allclose(other["bpd"].numpy(), first["bpd"].numpy()[:2])
    functions = [f for key, f in traced._traced[tiny].items() if key[0] == "ode_bpd_in_gamma"]
    assert [f.experimental_get_tracing_count() for f in functions] == [1]


def test_bad_choices_are_one_line_errors(vp_model):
    x = dissimilar_images()
    with pytest.raises(ValueError) as error:
        likelihood.ode_bpd(vp_model, x, dequantization="gaussian")
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in likelihood.DEQUANTIZATIONS), message
    with pytest.raises(ValueError, match=r"start_gamma must lie in the model's gamma range \[-13.8"):
        likelihood.ode_bpd(vp_model, x, dequantization="truncated_normal", start_gamma=-20.0)
    with pytest.raises(ValueError, match="start_gamma does not apply to the variational bound"):
        likelihood.ode_bpd(vp_model, x, dequantization="variational", start_gamma=-11.8)
    for draws in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"^draws: expected an integer >= 1 \(dequantization draws per image\)"):
            likelihood.ode_bpd(vp_model, x, dequantization="truncated_normal", draws=draws)


def test_the_readme_snippet_runs(vp_model):
    """README.md's truncated-normal paragraph, as written, on the analytic model of the tests above."""
    with open(f"{PROJECT_ROOT}/README.md") as f:
        readme = f.read()
    paragraph = readme[readme.index("**Truncated-normal dequantization") :]
    snippet = re.search(r"```python\n(.*?)```", paragraph, flags=re.S).group(1)
    namespace = {"vdm_tf": vdm_tf, "model": vp_model, "x_uint8": dissimilar_images()}
    exec(snippet, namespace)
    assert namespace["out"]["bpd"].shape == (3,) and np.all(np.isfinite(namespace["out"]["bpd"].numpy()))
