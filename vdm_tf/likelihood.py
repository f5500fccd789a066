"""Exact likelihood through the probability-flow ODE (Song et al. 2021, section 4.3, appendix D.2).

    out = vdm_tf.likelihood.ode_log_likelihood(model, z0, seed=0)   # {"log_likelihood", "nfe"}
    out = vdm_tf.likelihood.ode_bpd(model, x_uint8, seed=0, dequantization="truncated_normal")

The ODE `dz/dt = f_tilde(z, t) = f(z, t) - 0.5 g(t)^2 score(z, t)` maps z(t_min) to z(1)
deterministically, so (instantaneous change of variables, eq. 39)

    log p_0(z(t_min)) = log p_1(z(1)) + integral_{t_min}^1 div f_tilde(z(t), t) dt.

Both are integrated together by `vdm_tf.ode_solver.solve`: Dormand-Prince 5(4) with scipy's RK45
step control, the solver of the official score-SDE and i-DODE likelihoods (`solve_ivp(method="RK45")`),
in one graph, over the whole state (z and the integral of every example) as scipy sees it
flattened; its docstring says why not TFP's `DormandPrince`. The divergence is either the
Hutchinson-Skilling estimate `eps^T (d f_tilde / dz) eps` with one probe `eps` (Rademacher or
Gaussian) fixed for the whole solve, which makes the log-likelihood an unbiased estimate, or
the exact trace of the Jacobian (`exact_divergence=True`: D backward passes, vectorised; for
small images).

The same ODE in the log noise-to-signal ratio gamma = log(s_t^2 / m_t^2) = -log SNR, as i-DODE
integrates it (Zheng et al. 2023, "Improved Techniques for Maximum Likelihood Estimation for
Diffusion ODEs"; thu-ml/i-DODE, model_vdm.py `VDM.ode` and `solve_ivp(ode_func, (g_0, g_1))`):
for any linear SDE the moment equations dm/dt = f m and d(s^2)/dt = 2 f s^2 + g^2 give
d gamma / dt = g(t)^2 / s_t^2, so

    dz/dgamma = f_tilde(z, t) s_t^2 / g(t)^2 = (d log m / d gamma) z - 0.5 s_t^2 score(z, t),

at t = t(gamma), and the divergence carries the same factor s_t^2 / g(t)^2. For the schedule SDE
of a VDM this is i-DODE's `-0.5 sigma^2 z + 0.5 sigma eps_hat`. Any model with `.sde` and
`.score(z, t)` runs it: t(gamma) is found by bisection on the SDE's increasing gamma(t).

Bits per dimension of uint8 images, f = 2 (x + 0.5) / 256 - 1 the bin centre (ARCHITECTURE.md,
math conventions); each protocol is a lower bound log P(x) >= E_q[log p(z) - log q(z | x)] with
q supported on x's box, the boxes of the 256^D images tiling the space:

- `dequantization="uniform"`: Song et al.'s protocol. z = 2 (x + u) / 256 - 1, u ~ U[0, 1)^D,
  at t_min: q = (256 / 2)^D on the bin, bpd = -log p(z) / (D ln 2) + 7 (7 = log2(256 / 2)).
  With `start_gamma`, the ODE starts at gamma = start_gamma instead, integrated in gamma: i-DODE's
  uniform protocol, whose remark on gamma_0 starts it at `UNIFORM_START_GAMMA` = -11.8 rather
  than at the schedule's gamma_0 (model_vdm.py: `g_0 = -11.8  # Remark A.2 in the paper`).
- `dequantization="variational"` (models with a discretized decoder, e.g. a VDM): z_0 ~ q(z_0 | x)
  and bpd = (-log p_ODE(z_0) - log p(x | z_0) + log q(z_0 | x)) / (D ln 2), a bound that uses
  the model's own decoder instead of uniform noise.
- `dequantization="truncated_normal"`: i-DODE's training-free dequantization. The ODE starts at
  gamma_s (by default the SDE's own start, gamma(t_min): i-DODE's g_0 = gamma(0)), from
  z_s = m_s f + s_s eps with eps ~ N(0, I) truncated to [-tau, tau]^D, tau = m_s / (256 s_s)
  (`tau = alpha_0 / sigma_0 / 256`): the noise the model was trained on at gamma_s, cut where
  z_s leaves m_s times x's bin (half-width 1 / 256). q's log-density is in z units, so no
  constant is added; its expectation is i-DODE's closed form (its default `num_importance=1`):

      E log q = -D [0.5 log(2 pi e s_s^2) + log Z - tau phi(tau) / Z],   Z = erf(tau / sqrt 2),

  and bpd = (E log q - log p_ODE(z_s)) / (D ln 2).

The prior at t = 1 is the SDE's (`sde.prior_log_prob`, N(0, prior_std^2 I)) for every protocol;
i-DODE's code uses N(0, sigma_1^2 I), which differs by O(alpha_1^2) per dimension.
"""

import math

import tensorflow as tf

from vdm_tf import images, ode_solver, samplers, sde, seeding, traced

PROBES = ("rademacher", "gaussian")
DEQUANTIZATIONS = ("uniform", "variational", "truncated_normal")
# i-DODE's start of the ODE under uniform dequantization (its paper's remark A.2; model_vdm.py).
UNIFORM_START_GAMMA = -11.8
SEARCH_POINTS, SEARCH_ROUNDS = 256, 5  # t(gamma) in [t_min, 1] to 2^-40 (`_time_of_gamma`)


def hutchinson_probe(shape, seed, probe):
    """The Hutchinson-Skilling probe eps of `shape`: +-1 with equal odds (`"rademacher"`) or N(0, 1)."""
    if probe == "rademacher":
        return tf.cast(tf.random.stateless_uniform(shape, seed, 0, 2, dtype=tf.int32) * 2 - 1, tf.float32)
    return tf.random.stateless_normal(shape, seed)


def _flow(model, z, t):
    return model.sde.reverse_drift(z, t, model.score(z, t), probability_flow=True)


def with_divergence(flow, probe=None):
    """The ODE function (v, (z, log_p)) -> (dz/dv, div_z flow) that `integrate` solves.

    Args:
        flow: (z [N, ...], v scalar) -> dz/dv, per example (examples do not interact).
        probe: the Hutchinson-Skilling probe eps (z's shape), whose `eps^T (d flow / dz) eps` is
            an unbiased estimate of the divergence; None for the exact trace of the Jacobian
            (D backward passes, vectorised: for small images).
    """

    def ode(v, state):
        z, _ = state
        if probe is not None:
            with tf.GradientTape() as tape:
                tape.watch(z)
                dz = flow(z, v)
            probe_jacobian = tape.gradient(dz, z, output_gradients=probe)  # probe^T J
            return dz, tf.reduce_sum(probe_jacobian * probe, axis=tf.range(1, tf.rank(z)))
        batch = tf.shape(z)[0]
        z_flat = tf.reshape(z, [batch, -1])
        with tf.GradientTape() as tape:
            tape.watch(z_flat)
            dz = flow(tf.reshape(z_flat, tf.shape(z)), v)
            dz_flat = tf.reshape(dz, [batch, -1])
        jacobian = tape.batch_jacobian(dz_flat, z_flat)  # [N, D, D]; examples are independent
        return dz, tf.linalg.trace(jacobian)

    return ode


def integrate(ode, start, end, z0, rtol=1e-5, atol=1e-5):
    """Solves `ode` (of `with_divergence`) from `start` to `end` with the divergence's integral.

    Returns z at `end`, the integral of the divergence ([N]) and the number of evaluations of `ode`
    (`vdm_tf.ode_solver.solve`, scipy's RK45 step control, over z and the integral together).
    """
    (z, integral), nfe = ode_solver.solve(ode, start, end, (z0, tf.zeros(tf.shape(z0)[:1], z0.dtype)), rtol, atol)
    return z, integral, nfe


def _time_of_gamma(process, gamma):
    """The time t in [t_min, 1] where the SDE's increasing gamma(t) equals the scalar `gamma`.

    A search that narrows [t_min, 1] to one of `SEARCH_POINTS` equal parts per round, the one
    where gamma(t) crosses the target, for `SEARCH_ROUNDS` rounds: 256^5 = 2^40 parts, below
    float32's resolution down to t ~ 1e-5 (VPSDE's t_min). One call of gamma on 257 times per
    round, for any schedule (learned ones included).
    """
    fractions = tf.linspace(0.0, 1.0, SEARCH_POINTS + 1)

    def narrow(low, high):
        grid = low + (high - low) * fractions
        below = tf.reduce_sum(tf.cast(process.gamma(grid) < gamma, tf.int32))
        part = tf.clip_by_value(below - 1, 0, SEARCH_POINTS - 1)
        return grid[part], grid[part + 1]

    bounds = (tf.constant(process.t_min, tf.float32), tf.constant(1.0))
    low, high = tf.while_loop(lambda *_: tf.constant(True), narrow, bounds, maximum_iterations=SEARCH_ROUNDS)
    return 0.5 * (low + high)


def _time_per_gamma(process, t):
    """dt / dgamma = s_t^2 / g(t)^2 ([N]): d gamma / dt = g^2 / s^2 for every linear SDE."""
    _, std = process.marginal(t)
    return tf.square(std) / tf.square(process.diffusion(t))


def _model_flow(model, end, in_gamma=False):
    """The model's probability flow as dz/dt, or dz/dgamma with `in_gamma` (module docstring)."""

    def flow(z, v):
        v = tf.minimum(v, end)  # rounding may put the last stage a spacing past the end
        t = tf.fill(tf.shape(z)[:1], _time_of_gamma(model.sde, v) if in_gamma else v)
        dz = _flow(model, z, t)
        return dz * sde.per_example(_time_per_gamma(model.sde, t), z) if in_gamma else dz

    return flow


def _solve(model, z0, noise, start, end, exact_divergence, rtol, atol, in_gamma=False):
    """The model's flow and its divergence integrated together from `start` to `end` (t, or gamma
    with `in_gamma`): z at `end`, the integral of the divergence ([N]) and the evaluations."""
    ode = with_divergence(_model_flow(model, end, in_gamma), None if exact_divergence else noise)
    return integrate(ode, start, end, z0, rtol, atol)


def ode_log_likelihood(model, z0, seed=0, exact_divergence=False, probe="rademacher", rtol=1e-5, atol=1e-5):
    """log p_0(z0) of the probability-flow ODE's marginal at t = `sde.t_min`, in nats.

    Args:
        model: has `.sde` and `.score(z, t)`.
        z0: float32 [N, H, W, C], points in the model's data space (f units, [-1, 1] for images).
        seed: seed of the Hutchinson probe (ignored with `exact_divergence`).
        exact_divergence: trace of the Jacobian instead of the Hutchinson estimate.
        probe: `"rademacher"` or `"gaussian"`.
        rtol, atol: the ODE solver's tolerances (scipy's RK45 meaning, `vdm_tf.ode_solver`).

    Returns:
        dict: `log_likelihood` float32 [N]; `nfe`, the number of ODE function evaluations
        (each is one score evaluation plus its backward pass).
    """
    samplers.check_choice("probe", probe, PROBES)

    def build():
        @tf.function(
            input_signature=[tf.TensorSpec([None, *model.image_shape], tf.float32), tf.TensorSpec([2], tf.int64)]
        )
        def run(z0, seed):
            noise = hutchinson_probe(tf.shape(z0), seed, probe)
            z_1, integral, nfe = _solve(model, z0, noise, model.sde.t_min, 1.0, exact_divergence, rtol, atol)
            return {"log_likelihood": model.sde.prior_log_prob(z_1) + integral, "nfe": nfe}

        return run

    key = ("ode_log_likelihood", bool(exact_divergence), probe, float(rtol), float(atol))
    run = traced.compiled(model, key, build)
    return run(tf.convert_to_tensor(z0, tf.float32), seeding.as_seed(seed))


def truncated_normal_log_q(tau, std, dims):
    """E log q(z | x) of z = m f + std eps, eps ~ N(0, 1) truncated to [-tau, tau], per pixel
    independent: minus the entropy, -dims [0.5 log(2 pi e std^2) + log Z - tau phi(tau) / Z],
    Z = erf(tau / sqrt 2) (i-DODE's model_vdm.py, `eval_type == "tn"`, `logq` of one sample)."""
    mass = tf.math.erf(tau / math.sqrt(2.0))
    density_at_tau = tf.exp(-0.5 * tf.square(tau)) / math.sqrt(2.0 * math.pi)
    entropy = 0.5 * (1.0 + tf.math.log(2.0 * math.pi * tf.square(std))) + tf.math.log(mass)
    return -dims * (entropy - tau * density_at_tau / mass)


def _start_of(model, start_gamma):
    """The checked `start_gamma` as a float, or None for the SDE's own start gamma(t_min)."""
    if start_gamma is None:
        return None
    start_gamma = float(start_gamma)
    first, last = (float(g) for g in model.sde.gamma(tf.constant([model.sde.t_min, 1.0], tf.float32)))
    if not first <= start_gamma < last:
        raise ValueError(
            f"start_gamma must lie in the model's gamma range [{first:.4g}, {last:.4g}); got {start_gamma}."
        )
    return start_gamma


def _bpd_in_gamma(
    model, x, seed, dequantization, start_gamma, exact_divergence=False, probe="rademacher", rtol=1e-5, atol=1e-5
):
    """`ode_bpd` of the protocols integrated in gamma: truncated normal, uniform from `start_gamma`."""
    samplers.check_choice("probe", probe, PROBES)
    rtol, atol = float(rtol), float(atol)
    dims = math.prod(model.image_shape)

    def build():
        @tf.function(
            input_signature=[tf.TensorSpec([None, *model.image_shape], tf.uint8), tf.TensorSpec([2], tf.int64)]
        )
        def run(x, seed):
            process = model.sde
            noise_seed, probe_seed = seeding.split_seed(seed, 2)
            if start_gamma is None:
                t_start = tf.constant([process.t_min], tf.float32)
                gamma_start = process.gamma(t_start)[0]
            else:
                gamma_start = tf.constant(start_gamma, tf.float32)
                t_start = _time_of_gamma(process, gamma_start)[None]
            if dequantization == "truncated_normal":
                mean, std = (value[0] for value in process.marginal(t_start))
                tau = mean / (std * images.NUM_VALUES)
                eps = tf.random.stateless_parameterized_truncated_normal(tf.shape(x), noise_seed, 0.0, 1.0, -tau, tau)
                z = mean * images.encode(x) + std * eps
                log_q = truncated_normal_log_q(tau, std, dims)
            else:
                u = tf.random.stateless_uniform(tf.shape(x), noise_seed)
                z = 2.0 * (tf.cast(x, tf.float32) + u) / images.NUM_VALUES - 1.0
                log_q = -dims * math.log(2.0 / images.NUM_VALUES)
            noise = hutchinson_probe(tf.shape(z), probe_seed, probe)
            gamma_end = process.gamma(tf.ones([1]))[0]
            z_1, integral, nfe = _solve(model, z, noise, gamma_start, gamma_end, exact_divergence, rtol, atol, True)
            nats = log_q - (process.prior_log_prob(z_1) + integral)
            return {"bpd": nats / (dims * math.log(2.0)), "nfe": nfe}

        return run

    key = ("ode_bpd_in_gamma", dequantization, start_gamma, bool(exact_divergence), probe, rtol, atol)
    return traced.compiled(model, key, build)(x, seeding.as_seed(seed))


def ode_bpd(model, x, seed=0, dequantization="uniform", start_gamma=None, draws=1, **options):
    """Negative log-likelihood of uint8 images in bits per dimension, through the ODE.

    Args:
        model: has `.sde`, `.score(z, t)` and `.image_shape`; for `"variational"` also
            `.schedule` (the discretized decoder's gamma_0), as a `vdm_tf.VDM` does.
        x: uint8 images [N, H, W, C].
        seed: seeds the dequantisation noise (or z_0) and the Hutchinson probe.
        dequantization: `"uniform"`, `"variational"` or `"truncated_normal"` (module docstring).
        start_gamma: where the ODE starts, as gamma = log(s^2 / m^2), for `"truncated_normal"`
            (default: the SDE's gamma(t_min)) and `"uniform"` (default: from t_min in t; i-DODE's
            protocol: `UNIFORM_START_GAMMA`); inside the model's range [gamma(t_min), gamma(1)).
        draws: dequantization draws per image (each with its own probe), solved together as one
            batch of `draws` x N examples (one ODE solve: the step control sees all of them) and
            averaged: i-DODE's evaluation averages 5 draws' log-likelihoods (`num_importance=1`),
            each its own scipy solve; here they share a solve and its tracing (what that saves
            per draw depends on the batch: README, "i-DODE's likelihood against the official code").
        **options: `exact_divergence`, `probe`, `rtol`, `atol` of `ode_log_likelihood`.

    Returns:
        dict: `bpd` float32 [N] (the mean over the draws) and `nfe` (of the one solve).

    Example:
        >>> out = vdm_tf.likelihood.ode_bpd(model, x_uint8, seed=0, dequantization="truncated_normal", draws=5)
    """
    samplers.check_choice("dequantization", dequantization, DEQUANTIZATIONS)
    if dequantization == "variational" and start_gamma is not None:
        raise ValueError("start_gamma does not apply to the variational bound: it starts at the decoder's gamma_0.")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws: expected an integer >= 1 (dequantization draws per image); got {draws!r}.")
    x = images.check_images(x, tuple(model.image_shape))
    if draws > 1:  # rows d * N + i: draw d of image i
        out = ode_bpd(model, tf.tile(x, [draws, 1, 1, 1]), seed, dequantization, start_gamma, **options)
        return {"bpd": tf.reduce_mean(tf.reshape(out["bpd"], [draws, -1]), axis=0), "nfe": out["nfe"]}
    if dequantization == "truncated_normal" or start_gamma is not None:
        return _bpd_in_gamma(model, x, seed, dequantization, _start_of(model, start_gamma), **options)
    noise_seed, probe_seed = seeding.split_seed(seed, 2)
    dims = math.prod(model.image_shape)
    if dequantization == "uniform":
        u = tf.random.stateless_uniform(tf.shape(x), noise_seed)
        f = 2.0 * (tf.cast(x, tf.float32) + u) / images.NUM_VALUES - 1.0
        out = ode_log_likelihood(model, f, probe_seed, **options)
        nats = -out["log_likelihood"] - dims * math.log(2.0 / images.NUM_VALUES)
    else:
        if model.sde.t_min != 0.0:
            raise ValueError("The variational bound needs a model whose SDE starts at its decoder's z_0 (t_min = 0).")
        gamma_0 = model.schedule.gamma_0
        eps = tf.random.stateless_normal(tf.shape(x), noise_seed)
        z_0 = tf.sqrt(tf.sigmoid(-gamma_0)) * images.encode(x) + tf.sqrt(tf.sigmoid(gamma_0)) * eps
        log_q = -0.5 * tf.reduce_sum(tf.square(eps), axis=[1, 2, 3]) - 0.5 * dims * (
            math.log(2.0 * math.pi) + tf.math.log_sigmoid(gamma_0)
        )
        out = ode_log_likelihood(model, z_0, probe_seed, **options)
        reconstruction = images.reconstruction_nll(x, z_0, gamma_0, getattr(model, "pixel_values", None))
        nats = -out["log_likelihood"] + reconstruction + log_q
    return {"bpd": nats / (dims * math.log(2.0)), "nfe": out["nfe"]}
