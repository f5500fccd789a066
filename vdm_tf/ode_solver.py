"""Adaptive Dormand-Prince 5(4) in one TensorFlow graph, with scipy's RK45 step control.

    state, nfe = vdm_tf.ode_solver.solve(fn, start, end, initial, rtol=1e-5, atol=1e-5)

`fn(t, state) -> d state / dt` for a nest of tensors `state` (e.g. `(z, log_p)`), integrated
from `start` to `end` (either direction). This is `scipy.integrate.solve_ivp(method="RK45")`
(scipy/integrate/_ivp/rk.py, `RK45` and `RungeKutta._step_impl`; common.py,
`select_initial_step`), the solver of the official i-DODE and score-SDE likelihoods, step for
step: the Dormand-Prince tableau (C, A, B and the error weights E) with the first-same-as-last
evaluation reused, the error norm

    ||err|| = sqrt(mean((err / (atol + rtol max(|y|, |y_new|)))^2))

over every element of the state at once (as scipy sees the state flattened into one vector:
all examples and the log-density together), a step accepted when ||err|| < 1 and rescaled by
`SAFETY ||err||^(-1/5)` within [`MIN_FACTOR`, `MAX_FACTOR`] (not above 1 right after a
rejection), the first step estimated from the function's scale and curvature (Hairer, Norsett
& Wanner, "Solving Ordinary Differential Equations I", II.4), and the last step clipped to land
on `end`. On the same problem it takes the same steps and the same number of evaluations as
scipy, to rounding.

Not `tfp.math.ode.DormandPrince`, the same pair with another step control: its error ratio is
sqrt(mean((err / tol)^4)) (it squares the scaled errors, then its RMS norm squares them again),
larger than scipy's wherever the errors are uneven, and its first step is a fixed 1e-3; on an
i-DODE likelihood it took 2.7 times scipy's evaluations at the same tolerance.

All of it is one `tf.while_loop` (one iteration per attempted step), so it runs inside a
`tf.function` for any batch size with one trace. A solve that needs more than `max_num_steps`
attempts, whose step falls below scipy's minimum (10 floating-point spacings of t), or whose
function returns a non-finite value stops with an `InvalidArgumentError` naming the reason,
instead of returning a state short of `end`.
"""

import tensorflow as tf

# Dormand & Prince (1980), as scipy's RK45 holds them: nodes, stages, 5th-order weights, and the
# difference of the 5th- and 4th-order weights over the 7 evaluations (the last one is f(t + h)).
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
ERROR_ORDER = 4  # the embedded 4th-order solution's: error ~ h^5
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0
MAX_NUM_STEPS = 10_000  # attempted steps (6 evaluations each) before a solve is stopped as failed


def _combine(state, h, weights, slopes):
    """state + h * sum_j weights[j] * slopes[j] per tensor of the nests (zero weights skipped);
    without `state` (None), the sum alone."""
    weights, slopes = zip(*[(w, k) for w, k in zip(weights, slopes) if w != 0.0])

    def leaf(y, *ks):
        step = h * tf.add_n([w * k for w, k in zip(weights, ks)])
        return step if y is None else y + step

    if state is None:
        return tf.nest.map_structure(lambda *ks: leaf(None, *ks), *slopes)
    return tf.nest.map_structure(leaf, state, *slopes)


def rms_norm(nest):
    """sqrt(mean(x^2)) over every element of a nest of tensors (scipy's `norm` of the flat vector)."""
    leaves = tf.nest.flatten(nest)
    squares = tf.add_n([tf.reduce_sum(tf.square(x)) for x in leaves])
    size = tf.add_n([tf.cast(tf.size(x), squares.dtype) for x in leaves])
    return tf.sqrt(tf.math.divide_no_nan(squares, size))


def _scaled(nest, scale):
    return tf.nest.map_structure(tf.divide, nest, scale)


def initial_step(fn, start, end, y0, f0, rtol, atol):
    """The first |h|, scipy's `select_initial_step` for an order-4 error estimate (Hairer et al. II.4):
    the smallest of h1 = (0.01 / max(|f|, |f'|))^(1/5), 100 h0 and the interval, norms in units of
    the tolerance's scale, h0 = 0.01 |y| / |f|, and |f'| from one evaluation of `fn` at start + h0."""
    direction = tf.sign(end - start)
    interval = tf.abs(end - start)
    scale = tf.nest.map_structure(lambda y: atol + rtol * tf.abs(y), y0)
    d0, d1 = rms_norm(_scaled(y0, scale)), rms_norm(_scaled(f0, scale))
    h0 = tf.where((d0 < 1e-5) | (d1 < 1e-5), tf.constant(1e-6, d0.dtype), 0.01 * d0 / d1)
    h0 = tf.minimum(h0, interval)
    f1 = fn(start + h0 * direction, _combine(y0, h0 * direction, (1.0,), (f0,)))
    d2 = rms_norm(_scaled(tf.nest.map_structure(tf.subtract, f1, f0), scale)) / h0
    h1 = tf.where(
        (d1 <= 1e-15) & (d2 <= 1e-15),
        tf.maximum(tf.constant(1e-6, h0.dtype), h0 * 1e-3),
        (0.01 / tf.maximum(d1, d2)) ** (1.0 / (ERROR_ORDER + 1)),
    )
    return tf.minimum(tf.minimum(100.0 * h0, h1), interval)


def solve(fn, start, end, initial, rtol=1e-3, atol=1e-6, max_num_steps=MAX_NUM_STEPS):
    """The state at `end` of d state / dt = fn(t, state), state(start) = initial (module docstring).

    Args:
        fn: (t scalar, state nest) -> the nest's derivative, same structure, shapes and dtype.
        start, end: scalars; t runs in `initial`'s dtype.
        initial: a nest of floating tensors (any shapes; a batch dimension may be unknown).
        rtol, atol: scipy's tolerances (its defaults here too).
        max_num_steps: attempted steps (accepted or rejected) before the solve fails.

    Returns:
        (the state at `end`, the number of evaluations of `fn`, int32: scipy's `nfev`).
    """
    dtype = tf.nest.flatten(initial)[0].dtype
    start, end = tf.cast(start, dtype), tf.cast(end, dtype)
    rtol, atol = tf.cast(rtol, dtype), tf.cast(atol, dtype)
    direction = tf.sign(end - start)
    f0 = fn(start, initial)
    h_abs = initial_step(fn, start, end, initial, f0, rtol, atol)
    exponent = -1.0 / (ERROR_ORDER + 1)

    def running(t, y, f, h_abs, rejected, attempts, failure):
        return (direction * (t - end) < 0) & tf.equal(failure, 0) & (attempts < max_num_steps)

    def attempt(t, y, f, h_abs, rejected, attempts, failure):
        # scipy's smallest step: 10 spacings of t; a new step starts at least there, a retried one
        # below it fails.
        min_step = 10.0 * tf.abs(tf.math.nextafter(t, direction * float("inf")) - t)
        too_small = rejected & (h_abs < min_step)
        h_abs = tf.maximum(h_abs, min_step)
        t_new = t + h_abs * direction
        t_new = tf.where(direction * (t_new - end) > 0, end, t_new)
        h = t_new - t
        slopes = [f]
        for c, a in zip(C[1:], A[1:]):
            slopes.append(fn(t + c * h, _combine(y, h, a, slopes)))
        y_new = _combine(y, h, B, slopes)
        slopes.append(fn(t + h, y_new))
        scale = tf.nest.map_structure(lambda y, y_new: atol + rtol * tf.maximum(tf.abs(y), tf.abs(y_new)), y, y_new)
        error_norm = rms_norm(_scaled(_combine(None, h, E, slopes), scale))
        growth = tf.where(tf.equal(error_norm, 0), tf.constant(MAX_FACTOR, dtype), SAFETY * error_norm**exponent)
        accepted = error_norm < 1
        after_rejection = tf.where(rejected, tf.constant(1.0, dtype), tf.constant(MAX_FACTOR, dtype))
        factor = tf.where(
            accepted, tf.minimum(tf.minimum(growth, MAX_FACTOR), after_rejection), tf.maximum(growth, MIN_FACTOR)
        )
        failure = tf.where(too_small, 1, tf.where(tf.math.is_finite(error_norm), 0, 2))
        keep = accepted & tf.equal(failure, 0)
        t, y, f = tf.nest.map_structure(
            lambda new, old: tf.where(keep, new, old), (t_new, y_new, slopes[-1]), (t, y, f)
        )
        return t, y, f, tf.abs(h) * factor, ~accepted, attempts + 1, failure

    t, y, _, _, _, attempts, failure = tf.while_loop(
        running, attempt, (start, initial, f0, h_abs, tf.constant(False), tf.constant(0), tf.constant(0))
    )
    checks = [
        tf.debugging.Assert(tf.not_equal(failure, 1), ["ODE solver: the step fell below 10 spacings of t at t =", t]),
        tf.debugging.Assert(
            tf.not_equal(failure, 2), ["ODE solver: the function returned a non-finite value near t =", t]
        ),
        tf.debugging.Assert(
            tf.not_equal(failure, 0) | (direction * (t - end) >= 0),
            ["ODE solver: max_num_steps =", max_num_steps, "attempted steps did not reach the end; t =", t],
        ),
    ]
    with tf.control_dependencies(checks):
        y = tf.nest.map_structure(tf.identity, y)
        return y, 2 + 6 * attempts
