"""vdm_tf.ode_solver against scipy's RK45 (`solve_ivp(method="RK45")`, the official likelihoods' solver).

In float64 the in-graph solver takes scipy's steps: the same number of function evaluations and
the same end state to rounding, on a linear system (whose closed form both approach within the
tolerance) and on a nonlinear one, forwards and backwards in time. TFP's DormandPrince, with its
fourth-power error ratio and fixed first step, takes other steps, so the evaluation counts tell
the step controls apart.
"""

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from vdm_tf import likelihood, ode_solver

TOLERANCES = (1e-3, 1e-6, 1e-9)
DIMS, BATCH = 4, 3
RNG = np.random.default_rng(0)
MATRIX = RNG.normal(size=(DIMS, DIMS)) - 2.0 * np.eye(DIMS)  # a damped rotation-and-scaling
FREQUENCIES = RNG.normal(size=DIMS)
Y0 = RNG.normal(size=(BATCH, DIMS))
SPEC = tf.TensorSpec([], tf.float64)


def scipy_solve(fun, span, y0, tol):
    solution = scipy.integrate.solve_ivp(fun, span, y0, method="RK45", rtol=tol, atol=tol)
    assert solution.status == 0, solution.message
    return solution.y[:, -1], solution.nfev


def linear(t, state, xp=tnp):
    """y' = M y per example, and the integral of trace(M) (a log-density's, as in the likelihood);
    `xp`: TensorFlow's numpy, or numpy for scipy."""
    y, _ = state
    return xp.matmul(y, MATRIX.T), xp.zeros_like(y[:, 0]) + np.trace(MATRIX)


def nonlinear(t, state, xp=tnp):
    """y' = -y^3 + 0.3 M y + sin(w t), and the integral of sum(y) per example."""
    y, _ = state
    return -(y**3) + 0.3 * xp.matmul(y, MATRIX.T) + xp.sin(t * FREQUENCIES), xp.sum(y, axis=1)


def flat(fun):
    """`fun` in numpy as scipy sees it: the state one vector, y then the integrals."""

    def flat_fun(t, vector):
        dy, dintegral = fun(t, (vector[: BATCH * DIMS].reshape(BATCH, DIMS), None), xp=np)
        return np.concatenate([dy.reshape(-1), dintegral])

    return flat_fun


@pytest.fixture(scope="module")
def solvers():
    """One traced solve per ODE, the batch size unknown: (start, end, tol) are inputs."""

    def traced(fun):
        @tf.function(input_signature=[tf.TensorSpec([None, DIMS], tf.float64), SPEC, SPEC, SPEC])
        def run(y0, start, end, tol):
            initial = (y0, tf.zeros(tf.shape(y0)[:1], tf.float64))
            (y, integral), nfe = ode_solver.solve(fun, start, end, initial, rtol=tol, atol=tol)
            return tf.concat([tf.reshape(y, [-1]), integral], 0), nfe

        return run

    return {"linear": traced(linear), "nonlinear": traced(nonlinear)}


def solve_both(solvers, name, span, tol):
    fun = {"linear": linear, "nonlinear": nonlinear}[name]
    expected, expected_nfe = scipy_solve(flat(fun), span, np.concatenate([Y0.reshape(-1), np.zeros(BATCH)]), tol)
    got, nfe = solvers[name](Y0, *span, tol)
    return got.numpy(), int(nfe), expected, expected_nfe


@pytest.mark.parametrize("span", [(0.0, 2.0), (1.5, -0.5)], ids=["forwards", "backwards"])
@pytest.mark.parametrize("tol", TOLERANCES)
def test_linear_system_takes_scipys_steps_and_meets_the_closed_form(solvers, span, tol):
    got, nfe, expected, expected_nfe = solve_both(solvers, "linear", span, tol)
    assert nfe == expected_nfe
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    duration = span[1] - span[0]
    y = Y0 @ scipy.linalg.expm(MATRIX * duration).T
    exact = np.concatenate([y.reshape(-1), [np.trace(MATRIX) * duration] * BATCH])
    # The tolerance bounds each step's error relative to the state; backwards the system grows
    # (to 300 from 1) and so do the errors it carries: the global error relative to the state's size.
    np.testing.assert_allclose(got, exact, rtol=0, atol=10 * tol * np.abs(exact).max())


@pytest.mark.parametrize("tol", TOLERANCES)
def test_nonlinear_system_takes_scipys_steps(solvers, tol):
    got, nfe, expected, expected_nfe = solve_both(solvers, "nonlinear", (0.0, 3.0), tol)
    assert nfe == expected_nfe
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_one_trace_serves_every_batch_size(solvers):
    run = solvers["nonlinear"]
    for batch in (1, 5):
        out, _ = run(np.ones((batch, DIMS)), 0.0, 1.0, 1e-6)
        assert out.shape == (batch * (DIMS + 1),)
    assert run.experimental_get_tracing_count() == 1


def test_the_likelihoods_integrate_is_this_solver():
    """`likelihood.integrate` of a linear flow with its exact divergence: scipy's evaluations."""
    ode = likelihood.with_divergence(lambda z, v: tf.matmul(z, MATRIX.T))
    integrate = tf.function(lambda z: likelihood.integrate(ode, 0.0, 2.0, z, rtol=1e-6, atol=1e-6))
    z, integral, nfe = integrate(tf.constant(Y0))
    expected, expected_nfe = scipy_solve(
        flat(linear), (0.0, 2.0), np.concatenate([Y0.reshape(-1), np.zeros(BATCH)]), 1e-6
    )
    assert int(nfe) == expected_nfe
    np.testing.assert_allclose(np.concatenate([z.numpy().reshape(-1), integral.numpy()]), expected, atol=1e-10)


def test_a_solve_past_max_num_steps_is_an_error_naming_it():
    @tf.function(input_signature=[SPEC])
    def run(end):
        return ode_solver.solve(nonlinear, 0.0, end, (tf.constant(Y0), tf.zeros([BATCH], tf.float64)), max_num_steps=3)

    with pytest.raises(tf.errors.InvalidArgumentError, match="max_num_steps"):
        run(tf.constant(100.0, tf.float64))


def test_a_non_finite_function_is_an_error_naming_it():
    def undefined_past_one(t, y):
        return tf.where(t > 1.0, tf.constant(np.nan, tf.float64), -y)

    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        tf.function(lambda: ode_solver.solve(undefined_past_one, 0.0, 2.0, tf.ones([2], tf.float64)))()
