"""Discretized Gaussian data: the closed-form reference for diffusion estimators.

Each pixel is independent, with P(x = k) proportional to N(f_k; mu, s^2) at the bin centres
f_k = encode(k). For Gaussian (continuous) data the MSE-optimal noise prediction is linear in
z_t, `eps_hat = sigma_t (z_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)`; on the discretized
data it is near-optimal when s is many bins wide. Everything the tests compare against is
computed here by quadrature, independently of vdm_tf's Monte-Carlo code.
"""

import keras
import numpy as np
import tensorflow as tf

BIN_CENTRES = 2.0 * (np.arange(256) + 0.5) / 256 - 1.0


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class GaussianData:
    """Per-pixel discretized Gaussian with means `mean` and std devs `std` (arrays of image_shape)."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, np.float64)
        self.std = np.asarray(std, np.float64)
        self.image_shape = self.mean.shape
        log_w = -0.5 * ((BIN_CENTRES - self.mean[..., None]) / self.std[..., None]) ** 2
        w = np.exp(log_w - log_w.max(axis=-1, keepdims=True))
        self.probs = w / w.sum(axis=-1, keepdims=True)  # [*image_shape, 256]
        self.f_mean = (self.probs * BIN_CENTRES).sum(-1)
        self.f_var = (self.probs * (BIN_CENTRES - self.f_mean[..., None]) ** 2).sum(-1)

    @property
    def num_dims(self):
        return self.mean.size

    def sample(self, num, seed):
        """uint8 images [num, *image_shape]."""
        rng = np.random.default_rng(seed)
        cdf = np.cumsum(self.probs, axis=-1)
        u = rng.random((num,) + self.image_shape + (1,))
        return np.minimum((u > cdf).sum(-1), 255).astype(np.uint8)

    def nll_bpd(self):
        """The exact negative log-likelihood (entropy) of the data, bits per dimension."""
        entropy = -(self.probs * np.log(np.where(self.probs > 0, self.probs, 1.0))).sum()
        return entropy / (self.num_dims * np.log(2.0))

    def expected_squared_error(self, gamma):
        """E ||eps - eps_hat(z_gamma)||^2 summed over pixels, for each gamma in an array."""
        gamma = np.asarray(gamma, np.float64)[..., None]
        alpha, sigma = np.sqrt(sigmoid(-gamma)), np.sqrt(sigmoid(gamma))
        mean, std = self.mean.reshape(-1), self.std.reshape(-1)
        f_mean, f_var = self.f_mean.reshape(-1), self.f_var.reshape(-1)
        a = sigma / (alpha**2 * std**2 + sigma**2)  # eps_hat = a z + b
        b = -a * alpha * mean
        per_pixel = (1 - a * sigma) ** 2 + (a * alpha * f_mean + b) ** 2 + (a * alpha) ** 2 * f_var
        return per_pixel.sum(-1)

    def continuous_diffusion_nats(self, gamma_0, gamma_1, num=200_001):
        """0.5 * integral_{gamma_0}^{gamma_1} E||eps - eps_hat||^2 d gamma (VDM eq. 17, in gamma)."""
        gammas = np.linspace(gamma_0, gamma_1, num)
        return 0.5 * np.trapezoid(self.expected_squared_error(gammas), gammas)

    def discrete_diffusion_nats(self, gammas):
        """VDM eq. (16) summed exactly over the T steps between consecutive `gammas` (T + 1 values)."""
        gammas = np.asarray(gammas, np.float64)
        return 0.5 * np.sum(np.expm1(gammas[1:] - gammas[:-1]) * self.expected_squared_error(gammas[1:]))

    def prior_nats(self, gamma_1):
        var_1 = sigmoid(gamma_1)
        second_moment = self.f_var + self.f_mean**2
        return 0.5 * np.sum((1 - var_1) * second_moment + var_1 - np.log(var_1) - 1)

    def reconstruction_nats(self, gamma_0, num_nodes=80):
        """E_x E_eps0 [-log p(x | z_0)] by Gauss-Hermite quadrature over eps0."""
        nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
        weights = weights / weights.sum()
        scale = np.exp(0.5 * gamma_0)  # sigma_0 / alpha_0
        snr_0 = np.exp(-gamma_0)
        # rescaled z_0 for true value k and node e: f_k + scale * e -> [256, nodes]
        z = BIN_CENTRES[:, None] + scale * nodes[None, :]
        logits = -0.5 * snr_0 * (z[..., None] - BIN_CENTRES) ** 2  # [256, nodes, 256]
        log_norm = np.logaddexp.reduce(logits, axis=-1)
        nll_k = -(np.take_along_axis(logits, np.arange(256)[:, None, None], -1)[..., 0] - log_norm) @ weights
        return np.sum(self.probs * nll_k)

    def vlb_bpd(self, gamma_0, gamma_1, gammas=None):
        """The whole negative ELBO in bpd: continuous time, or discrete time on the grid `gammas`."""
        if gammas is None:
            diffusion = self.continuous_diffusion_nats(gamma_0, gamma_1)
        else:
            diffusion = self.discrete_diffusion_nats(gammas)
        nats = diffusion + self.prior_nats(gamma_1) + self.reconstruction_nats(gamma_0)
        return nats / (self.num_dims * np.log(2.0))


class GaussianDenoiser(keras.layers.Layer):
    """The analytic denoiser of `GaussianData` (continuous-Gaussian optimum), denoiser protocol."""

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = tf.constant(mean, tf.float32)
        self.std = tf.constant(std, tf.float32)

    def call(self, z_t, gamma_t, training=None):
        gamma = tf.reshape(tf.broadcast_to(gamma_t, tf.shape(z_t)[:1]), [-1, 1, 1, 1])
        alpha, sigma = tf.sqrt(tf.sigmoid(-gamma)), tf.sqrt(tf.sigmoid(gamma))
        return sigma * (z_t - alpha * self.mean) / (alpha**2 * self.std**2 + sigma**2)


class PosteriorDenoiser(keras.layers.Layer):
    """The exact MSE-optimal denoiser of `GaussianData`: eps_hat = (z - alpha E[f | z]) / sigma.

    Each pixel's posterior over its 256 values is a softmax of log P(k) - (z - alpha f_k)^2 / (2 sigma^2).
    """

    def __init__(self, data, **kwargs):
        super().__init__(**kwargs)
        self.log_probs = tf.constant(np.log(np.maximum(data.probs, 1e-300)), tf.float32)
        self.centres = tf.constant(BIN_CENTRES, tf.float32)

    def call(self, z_t, gamma_t, training=None):
        gamma = tf.reshape(tf.broadcast_to(gamma_t, tf.shape(z_t)[:1]), [-1, 1, 1, 1])
        alpha, sigma = tf.sqrt(tf.sigmoid(-gamma)), tf.sqrt(tf.sigmoid(gamma))
        residual = (z_t[..., None] - alpha[..., None] * self.centres) / sigma[..., None]
        posterior = tf.nn.softmax(self.log_probs - 0.5 * tf.square(residual))
        f_mean = tf.reduce_sum(posterior * self.centres, axis=-1)
        return (z_t - alpha * f_mean) / sigma


class GaussianScoreModel:
    """Continuous Gaussian data N(mean, std^2), independent per pixel, under any vdm_tf SDE.

    The exact score of the marginal p_t = N(m_t mean, m_t^2 std^2 + s_t^2) and, because the
    probability-flow ODE of Gaussian data is affine per pixel, the exact log-density that the
    ODE model assigns (its prior included) in closed form.
    """

    def __init__(self, sde, mean, std):
        self.sde = sde
        self.mean = np.asarray(mean, np.float64)
        self.std = np.asarray(std, np.float64)
        self.image_shape = self.mean.shape

    def variance(self, t):
        m, s = (np.float64(v) for v in self.sde.marginal(tf.constant(t, tf.float32)))
        return m, m**2 * self.std**2 + s**2

    def score(self, z, t):
        m, s = self.sde.marginal(t)
        m = tf.reshape(tf.broadcast_to(m, tf.shape(z)[:1]), [-1, 1, 1, 1])
        s = tf.reshape(tf.broadcast_to(s, tf.shape(z)[:1]), [-1, 1, 1, 1])
        mean, std = tf.constant(self.mean, tf.float32), tf.constant(self.std, tf.float32)
        return -(z - m * mean) / (tf.square(m) * tf.square(std) + tf.square(s))

    def ode_log_density(self, z0):
        """log p(z0) of the ODE model at t_min (its prior N(0, prior_std^2) at t = 1), nats [N]."""
        z0 = np.asarray(z0, np.float64)
        m0, v0 = self.variance(self.sde.t_min)
        m1, v1 = self.variance(1.0)
        z1 = m1 * self.mean + np.sqrt(v1 / v0) * (z0 - m0 * self.mean)
        prior_var = self.sde.prior_std**2
        log_prior = -0.5 * (z1**2 / prior_var + np.log(2 * np.pi * prior_var))
        return (log_prior + 0.5 * np.log(v1 / v0)).reshape(len(z0), -1).sum(-1)
