"""Discretized Gaussian data: the closed-form reference for diffusion estimators.

Each pixel is independent, with P(x = k) proportional to N(f_k; mu, s^2) at the bin centres
f_k = encode(k). For Gaussian (continuous) data the MSE-optimal noise prediction is linear in
z_t, `eps_hat = sigma_t (z_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2)`; on the discretized
data it is near-optimal when s is many bins wide. Everything the tests compare against is
computed here by quadrature, independently of vdm_tf's Monte-Carlo code: the ELBO's terms over
the data or per image, and, for continuous Gaussian data under an SDE (`GaussianScoreModel`,
`CorrelatedGaussianScoreModel`), the exact score, the ODE model's density and the integral of
its flow's Jacobian.
"""

import keras
import numpy as np
import scipy.stats
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

    def expected_squared_error(self, gamma, f=None):
        """E ||eps - eps_hat(z_gamma)||^2 summed over pixels, for each gamma in an array.

        The expectation is over the data and the noise; given images `f` (f units, [N, H, W, C])
        over the noise only, for each image: shape [*gamma.shape, N].
        """
        gamma = np.asarray(gamma, np.float64)[..., None]
        if f is None:
            f_mean, f_var = self.f_mean.reshape(-1), self.f_var.reshape(-1)
        else:
            f_mean, f_var = np.asarray(f, np.float64).reshape(len(f), -1), 0.0
            gamma = gamma[..., None]
        alpha, sigma = np.sqrt(sigmoid(-gamma)), np.sqrt(sigmoid(gamma))
        mean, std = self.mean.reshape(-1), self.std.reshape(-1)
        a = sigma / (alpha**2 * std**2 + sigma**2)  # eps_hat = a z + b
        b = -a * alpha * mean
        per_pixel = (1 - a * sigma) ** 2 + (a * alpha * f_mean + b) ** 2 + (a * alpha) ** 2 * f_var
        return per_pixel.sum(-1)

    def continuous_diffusion_nats(self, gamma_0, gamma_1, f=None, num=200_001):
        """0.5 * integral_{gamma_0}^{gamma_1} E||eps - eps_hat||^2 d gamma (VDM eq. 17, in gamma).

        Over the data, or given images `f` (f units) for each image: shape [N].
        """
        gammas = np.linspace(gamma_0, gamma_1, num)
        if f is None:
            return 0.5 * np.trapezoid(self.expected_squared_error(gammas), gammas)
        return np.array([0.5 * np.trapezoid(self.expected_squared_error(gammas, [image])[:, 0], gammas) for image in f])

    def discrete_diffusion_nats(self, gammas):
        """VDM eq. (16) summed exactly over the T steps between consecutive `gammas` (T + 1 values)."""
        gammas = np.asarray(gammas, np.float64)
        return 0.5 * np.sum(np.expm1(gammas[1:] - gammas[:-1]) * self.expected_squared_error(gammas[1:]))

    def prior_nats(self, gamma_1, f=None):
        """KL(q(z_1 | x) || N(0, I)), VDM's prior term: its mean over the data, or given images
        `f` (f units) for each image, shape [N]. Per pixel, with var_1 = 1 - alpha_1^2:
        0.5 (alpha_1^2 f^2 + var_1 - log var_1 - 1)."""
        alpha2_1 = sigmoid(-gamma_1)
        excess = -np.log1p(-alpha2_1) - alpha2_1  # var_1 - log var_1 - 1
        if f is None:
            second_moment = (self.f_var + self.f_mean**2).reshape(-1)
        else:
            second_moment = np.asarray(f, np.float64).reshape(len(f), -1) ** 2
        return 0.5 * np.sum(alpha2_1 * second_moment + excess, axis=-1)

    def reconstruction_nats(self, gamma_0, x=None, num_nodes=80):
        """E_eps0 [-log p(x | z_0)]: its mean over the data, or given uint8 images `x` for each
        image, shape [N]."""
        nll_k = reconstruction_nll_per_value(gamma_0, num_nodes)
        if x is None:
            return np.sum(self.probs * nll_k)
        return nll_k[np.asarray(x).reshape(len(x), -1)].sum(-1)

    def vlb_bpd(self, gamma_0, gamma_1, gammas=None):
        """The whole negative ELBO in bpd: continuous time, or discrete time on the grid `gammas`."""
        if gammas is None:
            diffusion = self.continuous_diffusion_nats(gamma_0, gamma_1)
        else:
            diffusion = self.discrete_diffusion_nats(gammas)
        nats = diffusion + self.prior_nats(gamma_1) + self.reconstruction_nats(gamma_0)
        return nats / (self.num_dims * np.log(2.0))


def reconstruction_nll_per_value(gamma_0, num_nodes=80):
    """E_eps0 [-log p(x = k | z_0)] for each pixel value k (VDM's discretized decoder), [256].

    z_0 = alpha_0 f_k + sigma_0 eps0; Gauss-Hermite quadrature over eps0.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    weights = weights / weights.sum()
    scale = np.exp(0.5 * gamma_0)  # sigma_0 / alpha_0
    snr_0 = np.exp(-gamma_0)
    # rescaled z_0 for true value k and node e: f_k + scale * e -> [256, nodes]
    z = BIN_CENTRES[:, None] + scale * nodes[None, :]
    logits = -0.5 * snr_0 * (z[..., None] - BIN_CENTRES) ** 2  # [256, nodes, 256]
    log_norm = np.logaddexp.reduce(logits, axis=-1)
    return -(np.take_along_axis(logits, np.arange(256)[:, None, None], -1)[..., 0] - log_norm) @ weights


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

    def ode_log_density(self, z0, noise_var=0.0):
        """log p(z0) of the ODE model at t_min (its prior N(0, prior_std^2) at t = 1), nats [N].

        The flow maps each pixel affinely, z1 = m1 mean + sqrt(v1 / v0) (z0 - m0 mean), so
        log p(z0) = log N(z1; 0, prior_std^2) + 0.5 log(v1 / v0) (the divergence integral).
        With `noise_var` (per pixel, broadcast to the image): E_w log p(z0 + w) for independent
        zero-mean w of that variance, whatever its distribution (log p is quadratic).
        """
        z0 = np.asarray(z0, np.float64)
        m0, v0 = self.variance(self.sde.t_min)
        m1, v1 = self.variance(1.0)
        z1 = m1 * self.mean + np.sqrt(v1 / v0) * (z0 - m0 * self.mean)
        prior_var = self.sde.prior_std**2
        second_moment = z1**2 + v1 / v0 * np.asarray(noise_var, np.float64)
        log_prior = -0.5 * (second_moment / prior_var + np.log(2 * np.pi * prior_var))
        return (log_prior + 0.5 * np.log(v1 / v0)).reshape(len(z0), -1).sum(-1)

    def flow_divergence_integral(self):
        """integral_{t_min}^1 div f_tilde dt per pixel, 0.5 log(v1 / v0): f_tilde = f z - 0.5 g^2 score
        has d f_tilde / dz = f + 0.5 g^2 / v_t = 0.5 d log v_t / dt for each pixel."""
        _, v0 = self.variance(self.sde.t_min)
        _, v1 = self.variance(1.0)
        return 0.5 * np.log(v1 / v0)


class CorrelatedGaussianScoreModel:
    """Jointly Gaussian pixels, f ~ N(mean, cov) over the flattened image, under any vdm_tf SDE.

    With cov = Q diag(lam) Q^T the coordinates y = Q^T z are independent Gaussians N(Q^T mean,
    lam), and the SDE acts on each alone (its drift and diffusion are scalar), so the score, the
    ODE density and the flow's Jacobian are those of a `GaussianScoreModel` on y, rotated back.
    The Jacobian of the probability flow is not diagonal: a test case for divergence estimators.
    """

    def __init__(self, sde, mean, cov, image_shape):
        self.sde = sde
        self.image_shape = tuple(image_shape)
        eigenvalues, self.basis = np.linalg.eigh(np.asarray(cov, np.float64))
        mean = np.asarray(mean, np.float64).reshape(-1)
        self.independent = GaussianScoreModel(
            sde, (self.basis.T @ mean).reshape(self.image_shape), np.sqrt(eigenvalues).reshape(self.image_shape)
        )

    def _rotate(self, z, matrix):
        """Each example's flattened z times `matrix` (Q: to y coordinates, Q^T: back)."""
        flat = tf.reshape(z, [tf.shape(z)[0], -1])
        return tf.reshape(flat @ tf.constant(matrix, tf.float32), tf.shape(z))

    def score(self, z, t):
        return self._rotate(self.independent.score(self._rotate(z, self.basis), t), self.basis.T)

    def ode_log_density(self, z0):
        """log p(z0) of the ODE model at t_min, nats [N] (the rotation has determinant +-1)."""
        z0 = np.asarray(z0, np.float64)
        return self.independent.ode_log_density((z0.reshape(len(z0), -1) @ self.basis).reshape(z0.shape))

    def flow_divergence_integral(self):
        """A = integral_{t_min}^1 (d f_tilde / dz) dt, the D x D matrix whose trace the ODE
        likelihood integrates (Q diag(0.5 log(v1 / v0)) Q^T, symmetric)."""
        return (self.basis * self.independent.flow_divergence_integral().reshape(-1)) @ self.basis.T


def rounded_moments(mean, std):
    """Mean and std of encode(decode(f)) for f ~ N(mean, std^2) per pixel, as uint8 samples have:
    `vdm_tf.images.decode` rounds f to the nearest bin centre and clips at both ends."""
    edges = np.arange(1, 256) / 128 - 1  # decode's boundaries between the values k - 1 and k
    mean, std = np.asarray(mean, np.float64)[..., None], np.asarray(std, np.float64)[..., None]
    cdf = scipy.stats.norm.cdf((edges - mean) / std)
    probs = np.diff(cdf, prepend=0.0, append=1.0, axis=-1)
    rounded_mean = (probs * BIN_CENTRES).sum(-1)
    return rounded_mean, np.sqrt((probs * (BIN_CENTRES - rounded_mean[..., None]) ** 2).sum(-1))
