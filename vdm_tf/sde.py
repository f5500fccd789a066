"""Stochastic differential equations of diffusion models (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations").

A forward SDE `dz = f(z, t) dt + g(t) dw` on t in [0, 1] carries data z(0) ~ p_data to a prior
z(1) ~ p_1. All SDEs here are linear, so `z_t | x ~ N(m_t x, s_t^2 I)` in closed form (eq. 29,
appendix B). Given the score `s(z, t) = grad_z log p_t(z)`:

- the reverse-time SDE: `dz = [f - g^2 s] dt + g dw_bar` (eq. 6), and
- the probability-flow ODE: `dz/dt = f - 0.5 g^2 s` (eq. 13), which has the same marginals.

Times `t` are float32 [N] (one per example) or scalars; `z` is [N, H, W, C]. Every method that
returns a per-example coefficient returns it with shape [N, 1, 1, 1] so it broadcasts over z.

Classes: `VPSDE` (linear beta), `SubVPSDE`, `VESDE` (geometric sigma), and `ScheduleSDE`, the
variance-preserving SDE of a vdm_tf noise schedule: `beta(t) = sigmoid(gamma(t)) gamma'(t)`,
so every learned VDM schedule is an SDE with `m_t = alpha_t`, `s_t = sigma_t`.
"""

import math

import tensorflow as tf

from vdm_tf import images


def per_example(value, z):
    """A scalar or per-example [N] value as [N, 1, 1, 1], to broadcast against the batch z."""
    return images.per_example(tf.broadcast_to(tf.cast(value, z.dtype), tf.shape(z)[:1]), 4)


class SDE:
    """Base class of linear SDEs `dz = -0.5 beta(t) z dt + g(t) dw` and friends.

    Subclasses define `drift_coefficient(t)` (f(z, t) = drift_coefficient(t) * z),
    `diffusion(t)` (g), `marginal(t)` (m_t, s_t) and `prior_std`.
    """

    t_min = 1e-5  # samplers stop, and likelihoods start, here (the score blows up at t = 0)
    prior_std = 1.0

    def get_config(self):
        """Constructor arguments; `from_config` rebuilds the SDE from them (and the class name)."""
        return {}

    def drift_coefficient(self, t):
        raise NotImplementedError

    def diffusion(self, t):
        raise NotImplementedError

    def marginal(self, t):
        """(m_t, s_t): z_t | x ~ N(m_t x, s_t^2 I); float32 tensors shaped like t."""
        raise NotImplementedError

    def drift(self, z, t):
        """f(z, t) = drift_coefficient(t) z."""
        return per_example(self.drift_coefficient(t), z) * z

    def gamma(self, t):
        """log(s_t^2 / m_t^2), the log noise-to-signal ratio at t: what a denoiser is conditioned on."""
        mean, std = self.marginal(t)
        return 2.0 * (tf.math.log(std) - tf.math.log(mean))

    def transition(self, t, s):
        """(a, v): z_t | z_s ~ N(a z_s, v I) for s < t (a linear SDE's transition kernel)."""
        mean_t, std_t = self.marginal(t)
        mean_s, std_s = self.marginal(s)
        a = mean_t / mean_s
        return a, tf.square(std_t) - tf.square(a * std_s)

    def prior_sample(self, shape, seed):
        return self.prior_std * tf.random.stateless_normal(shape, seed)

    def prior_log_prob(self, z):
        """log N(z; 0, prior_std^2 I) per example, in nats: float32 [N]."""
        dims = tf.cast(tf.reduce_prod(tf.shape(z)[1:]), z.dtype)
        squared = tf.reduce_sum(tf.square(z), axis=[1, 2, 3]) / self.prior_std**2
        return -0.5 * (squared + dims * math.log(2.0 * math.pi * self.prior_std**2))

    def reverse_drift(self, z, t, score, probability_flow=False):
        """Drift of the reverse-time SDE (eq. 6), or of the probability-flow ODE (eq. 13)."""
        g = per_example(self.diffusion(t), z)
        weight = 0.5 if probability_flow else 1.0
        return self.drift(z, t) - weight * tf.square(g) * score

    def discretize(self, z, t, dt):
        """(f_i, G_i) of z_{t+dt} = z_t + f_i + G_i noise: the Euler-Maruyama discretisation.

        `VESDE` overrides it with SMLD's exact variance increments (Song et al., eq. 45-47).
        """
        return self.drift(z, t) * dt, per_example(self.diffusion(t), z) * tf.sqrt(dt)


class VPSDE(SDE):
    """Variance preserving: beta(t) = beta_min + t (beta_max - beta_min) (DDPM's continuous limit).

    Args:
        beta_min, beta_max: Song et al.'s defaults 0.1 and 20.
    """

    def __init__(self, beta_min=0.1, beta_max=20.0):
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def get_config(self):
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * tf.square(t)

    def drift_coefficient(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return tf.sqrt(self.beta(t))

    def marginal(self, t):
        log_mean = -0.5 * self.integrated_beta(tf.convert_to_tensor(t, tf.float32))
        return tf.exp(log_mean), tf.sqrt(-tf.math.expm1(2.0 * log_mean))


class SubVPSDE(VPSDE):
    """Sub-VP: the VP drift with diffusion g^2 = beta(t) (1 - exp(-2 int_0^t beta)) (eq. 11).

    Its marginal variance (1 - m_t^2)^2 lies below the VP one, which gives better likelihoods.
    """

    def diffusion(self, t):
        return tf.sqrt(self.beta(t) * -tf.math.expm1(-2.0 * self.integrated_beta(t)))

    def marginal(self, t):
        log_mean = -0.5 * self.integrated_beta(tf.convert_to_tensor(t, tf.float32))
        return tf.exp(log_mean), -tf.math.expm1(2.0 * log_mean)


class VESDE(SDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t, no drift (eq. 9).

    The marginal is N(x, sigma(t)^2 - sigma(0)^2) to within sigma_min; like Song et al. we use
    s_t = sigma(t). The prior is N(0, sigma_max^2 I).

    Args:
        sigma_min, sigma_max: 0.01 and 50 for CIFAR-10 in Song et al.
    """

    def __init__(self, sigma_min=0.01, sigma_max=50.0):
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.prior_std = self.sigma_max
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def get_config(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def sigma(self, t):
        return self.sigma_min * tf.exp(tf.convert_to_tensor(t, tf.float32) * self.log_ratio)

    def drift_coefficient(self, t):
        return tf.zeros_like(tf.convert_to_tensor(t, tf.float32))

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2.0 * self.log_ratio)

    def marginal(self, t):
        sigma = self.sigma(t)
        return tf.ones_like(sigma), sigma

    def discretize(self, z, t, dt):
        """SMLD: G_i^2 = sigma(t + dt)^2 - sigma(t)^2 exactly, no drift."""
        variance = tf.square(self.sigma(t + dt)) - tf.square(self.sigma(t))
        return tf.zeros_like(z), per_example(tf.sqrt(variance), z)


class ScheduleSDE(SDE):
    """The variance-preserving SDE of a vdm_tf noise schedule gamma(t).

    sigma_t^2 = sigmoid(gamma(t)) obeys d sigma^2 / dt = beta (1 - sigma^2) with
    beta(t) = sigmoid(gamma(t)) gamma'(t), so dz = -0.5 beta z dt + sqrt(beta) dw has exactly
    the schedule's marginals m_t = alpha_t, s_t = sigma_t (ARCHITECTURE.md, "Math conventions").

    Args:
        schedule: a `vdm_tf.schedules.NoiseSchedule`.
    """

    t_min = 0.0  # gamma(0) = gamma_0 is finite: z_0 is VDM's least noisy latent

    def __init__(self, schedule):
        self.schedule = schedule

    def beta(self, t):
        gamma, dgamma = self.schedule.gamma_and_derivative(tf.convert_to_tensor(t, tf.float32))
        return tf.sigmoid(gamma) * dgamma

    def drift_coefficient(self, t):
        return -0.5 * self.beta(t)

    def diffusion(self, t):
        return tf.sqrt(self.beta(t))

    def marginal(self, t):
        gamma = self.schedule(tf.convert_to_tensor(t, tf.float32))
        return tf.sqrt(tf.sigmoid(-gamma)), tf.sqrt(tf.sigmoid(gamma))

    def gamma(self, t):
        return self.schedule(tf.convert_to_tensor(t, tf.float32))


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def from_config(name, config=None):
    """The SDE `name` ("vp", "subvp" or "ve") with constructor arguments `config`."""
    if name not in SDES:
        raise ValueError(f"Unknown SDE {name!r}; expected one of {', '.join(SDES)}.")
    return SDES[name](**(config or {}))


def name_of(process):
    """The `SDES` name of an SDE object (inverse of `from_config`)."""
    for name, cls in SDES.items():
        if type(process) is cls:
            return name
    raise ValueError(f"{type(process).__name__} is not one of the named SDEs {', '.join(SDES)}.")
