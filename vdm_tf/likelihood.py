"""Exact likelihood through the probability-flow ODE (Song et al. 2021, section 4.3, appendix D.2).

    out = vdm_tf.likelihood.ode_log_likelihood(model, z0, seed=0)   # {"log_likelihood", "nfe"}
    out = vdm_tf.likelihood.ode_bpd(model, x_uint8, seed=0, dequantization="uniform")

The ODE `dz/dt = f_tilde(z, t) = f(z, t) - 0.5 g(t)^2 score(z, t)` maps z(t_min) to z(1)
deterministically, so (instantaneous change of variables, eq. 39)

    log p_0(z(t_min)) = log p_1(z(1)) + integral_{t_min}^1 div f_tilde(z(t), t) dt.

Both are integrated together by `tfp.math.ode.DormandPrince`. The divergence is either the
Hutchinson-Skilling estimate `eps^T (d f_tilde / dz) eps` with one probe `eps` (Rademacher or
Gaussian) fixed for the whole solve, which makes the log-likelihood an unbiased estimate, or
the exact trace of the Jacobian (`exact_divergence=True`: D backward passes, vectorised; for
small images).

Bits per dimension of uint8 images come in two flavours:

- `dequantization="uniform"`: Song et al.'s protocol. f = 2 (x + u) / 256 - 1 with
  u ~ U[0, 1)^D; -log p(x) <= -log p(f) - D log(2 / 256), i.e. bpd = -log p(f) / (D ln 2) + 7.
- `dequantization="variational"` (models with a discretized decoder, e.g. a VDM): z_0 ~ q(z_0 | x)
  and bpd = (-log p_ODE(z_0) - log p(x | z_0) + log q(z_0 | x)) / (D ln 2), a bound that uses
  the model's own decoder instead of uniform noise.
"""

import math

import tensorflow as tf
import tensorflow_probability as tfp

from vdm_tf import images, samplers, seeding, traced

PROBES = ("rademacher", "gaussian")


def _probe(shape, seed, probe):
    if probe == "rademacher":
        return tf.cast(tf.random.stateless_uniform(shape, seed, 0, 2, dtype=tf.int32) * 2 - 1, tf.float32)
    return tf.random.stateless_normal(shape, seed)


def _flow(model, z, t):
    return model.sde.reverse_drift(z, t, model.score(z, t), probability_flow=True)


def _hutchinson_divergence(model, z, t, probe):
    with tf.GradientTape() as tape:
        tape.watch(z)
        flow = _flow(model, z, t)
    probe_jacobian = tape.gradient(flow, z, output_gradients=probe)  # probe^T J
    return flow, tf.reduce_sum(probe_jacobian * probe, axis=[1, 2, 3])


def _exact_divergence(model, z, t):
    batch = tf.shape(z)[0]
    z_flat = tf.reshape(z, [batch, -1])
    with tf.GradientTape() as tape:
        tape.watch(z_flat)
        flow = _flow(model, tf.reshape(z_flat, tf.shape(z)), t)
        flow_flat = tf.reshape(flow, [batch, -1])
    jacobian = tape.batch_jacobian(flow_flat, z_flat)  # [N, D, D]; examples are independent
    return flow, tf.linalg.trace(jacobian)


def ode_log_likelihood(model, z0, seed=0, exact_divergence=False, probe="rademacher", rtol=1e-5, atol=1e-5):
    """log p_0(z0) of the probability-flow ODE's marginal at t = `sde.t_min`, in nats.

    Args:
        model: has `.sde` and `.score(z, t)`.
        z0: float32 [N, H, W, C], points in the model's data space (f units, [-1, 1] for images).
        seed: seed of the Hutchinson probe (ignored with `exact_divergence`).
        exact_divergence: trace of the Jacobian instead of the Hutchinson estimate.
        probe: `"rademacher"` or `"gaussian"`.
        rtol, atol: DormandPrince tolerances.

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
            noise = _probe(tf.shape(z0), seed, probe)

            def ode(t, state):
                z, _ = state
                t = tf.fill(tf.shape(z)[:1], tf.minimum(t, 1.0))  # steps may overshoot t = 1
                if exact_divergence:
                    flow, divergence = _exact_divergence(model, z, t)
                else:
                    flow, divergence = _hutchinson_divergence(model, z, t, noise)
                return flow, divergence

            solver = tfp.math.ode.DormandPrince(rtol=rtol, atol=atol)
            initial = (z0, tf.zeros(tf.shape(z0)[:1]))
            result = solver.solve(ode, model.sde.t_min, initial, solution_times=[1.0])
            z_1, integrated_divergence = result.states[0][-1], result.states[1][-1]
            log_likelihood = model.sde.prior_log_prob(z_1) + integrated_divergence
            return {"log_likelihood": log_likelihood, "nfe": result.diagnostics.num_ode_fn_evaluations}

        return run

    key = ("ode_log_likelihood", bool(exact_divergence), probe, float(rtol), float(atol))
    run = traced.compiled(model, key, build)
    return run(tf.convert_to_tensor(z0, tf.float32), seeding.as_seed(seed))


def ode_bpd(model, x, seed=0, dequantization="uniform", **options):
    """Negative log-likelihood of uint8 images in bits per dimension, through the ODE.

    Args:
        model: has `.sde`, `.score(z, t)` and `.image_shape`; for `"variational"` also
            `.schedule` (the discretized decoder's gamma_0), as a `vdm_tf.VDM` does.
        x: uint8 images [N, H, W, C].
        seed: seeds the dequantisation noise (or z_0) and the Hutchinson probe.
        dequantization: `"uniform"` or `"variational"` (see the module docstring).
        **options: `exact_divergence`, `probe`, `rtol`, `atol` of `ode_log_likelihood`.

    Returns:
        dict: `bpd` float32 [N] and `nfe`.
    """
    samplers.check_choice("dequantization", dequantization, ("uniform", "variational"))
    x = images.check_images(x, tuple(model.image_shape))
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
