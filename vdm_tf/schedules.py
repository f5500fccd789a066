"""Noise schedules gamma(t) of Variational Diffusion Models.

A schedule maps time t in [0, 1] to gamma(t) = -log SNR(t), increasing in t, with
`sigma_t^2 = sigmoid(gamma(t))` and `alpha_t^2 = sigmoid(-gamma(t))` (Kingma et al. 2021,
"Variational Diffusion Models", section 3.2-3.3). Every schedule here has the form of VDM eq. (59):

    gamma(t) = gamma_0 + (gamma_1 - gamma_0) * shape(t),   shape(0) = 0, shape(1) = 1,

so the endpoints gamma_0 = gamma(0), gamma_1 = gamma(1) and the monotone `shape` in between are
separate pieces. By VDM's invariance result (section 5.1) the continuous-time VLB depends only
on the endpoints; the shape changes only the variance of its Monte-Carlo estimate, which is why
`LearnedMonotonic` trains its shape on that variance (appendix I.2) and its endpoints on the VLB.

A schedule also names the *path* its denoiser sees and the importance density of the
likelihood-weighted loss (Zheng et al. 2023, "Improved Techniques for Maximum Likelihood
Estimation for Diffusion ODEs", i-DODE; github thu-ml/i-DODE `model_vdm.py`):

- vdm_tf's latents are always the variance-preserving `z = alpha f + sigma eps`,
  `alpha^2 = sigmoid(-gamma)`. i-DODE's straight path (`StraightPath`, "SP") has the same
  gamma = log(sigma^2 / alpha^2) with `alpha + sigma = 1`, so its latent is the same one scaled,
  `z_sp = z / (alpha + sigma)` (`to_path`): the network is trained and run on z_sp while every
  sampler, likelihood and decoder keeps working on z.
- `velocity_coefficients(gamma)` = (a, b) with `eps = a v + b z_path` for the path's velocity v
  (the velocity parameterisation of `vdm_tf.VDM`).
- `importance_sample(u)`: gamma with density `p(gamma) = alpha_path(gamma)^2 / Z` on
  [gamma_0, gamma_1] from u in [0, 1) and 1 / p(gamma), i-DODE's importance sampling of the
  continuous-time diffusion loss `0.5 * integral ||eps - eps_hat||^2 d gamma`.
"""

import keras
import tensorflow as tf

from vdm_tf.images import per_example

BISECTION_STEPS = 100  # i-DODE's (model_vdm.py:107): far below float32 resolution after ~30


class NoiseSchedule(keras.layers.Layer):
    """Base class: endpoints gamma_0 < gamma_1 and a linear shape.

    The endpoints are parametrised as `gamma_0` and `gamma_1 = gamma_0 + |gamma_range|` so that the
    schedule stays increasing whatever the optimiser does (VDM's learned linear schedule,
    `gamma(t) = b + |w| t`, is exactly this). Subclasses override `shape`.

    Args:
        gamma_min: initial gamma_0 (log noise-to-signal ratio at t = 0).
        gamma_max: initial gamma_1 (at t = 1).
        learn_endpoints: whether gamma_0 and gamma_1 are trainable.
        **kwargs: forwarded to `keras.layers.Layer`.
    """

    def __init__(self, gamma_min=-13.3, gamma_max=5.0, learn_endpoints=True, **kwargs):
        super().__init__(**kwargs)
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max must exceed gamma_min; got gamma_min={gamma_min}, gamma_max={gamma_max}.")
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.learn_endpoints = bool(learn_endpoints)
        self._gamma_0 = self.add_weight(
            name="gamma_0",
            shape=(),
            initializer=keras.initializers.Constant(self.gamma_min),
            trainable=self.learn_endpoints,
        )
        self._gamma_range = self.add_weight(
            name="gamma_range",
            shape=(),
            initializer=keras.initializers.Constant(self.gamma_max - self.gamma_min),
            trainable=self.learn_endpoints,
        )

    @property
    def gamma_0(self):
        """gamma(0), a float32 scalar tensor."""
        return tf.convert_to_tensor(self._gamma_0)

    @property
    def gamma_1(self):
        """gamma(1), a float32 scalar tensor."""
        return self.gamma_0 + tf.abs(tf.convert_to_tensor(self._gamma_range))

    @property
    def variance_variables(self):
        """Variables trained to minimise the variance of the diffusion loss instead of on the VLB."""
        return []

    @property
    def learns_shape(self):
        """Whether the shape has trainable weights (which the continuous-time loss trains only
        through gamma(t) and gamma'(t) at uniform times: importance-sampled gammas leave them out)."""
        endpoints = {id(self._gamma_0), id(self._gamma_range)}
        return any(id(v) not in endpoints for v in self.trainable_variables)

    def shape(self, t):
        """The normalised, increasing shape of the schedule: shape(0) = 0, shape(1) = 1."""
        return t

    def call(self, t):
        """gamma(t) for t in [0, 1] (any shape)."""
        t = tf.convert_to_tensor(t, tf.float32)
        return self.gamma_0 + (self.gamma_1 - self.gamma_0) * self.shape(t)

    def gamma_and_derivative(self, t):
        """gamma(t) and d gamma / dt, the latter by autodiff (no finite differences).

        Both stay differentiable with respect to the schedule's weights, as the continuous-time
        diffusion loss `0.5 * gamma'(t) * ||eps - eps_hat||^2` (VDM eq. 17) needs. The shape acts
        elementwise on t, so the reverse-mode gradient of its sum is its derivative at every t.
        (Forward mode, `tf.autodiff.ForwardAccumulator`, gives the same numbers but makes XLA's
        CPU code for the training step several hundred times slower.)
        """
        t = tf.convert_to_tensor(t, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(t)
            shape = self.shape(t)
        shape_derivative = tape.gradient(shape, t, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        gamma_range = self.gamma_1 - self.gamma_0
        return self.gamma_0 + gamma_range * shape, gamma_range * shape_derivative

    # ----------------------------------------------------------------------------------------
    # The denoiser's path and the importance density (i-DODE). Variance preserving here.

    def to_path(self, z, gamma):
        """The latent of the path the denoiser sees for vdm_tf's latents z [N, ...] at gamma [N]: z itself."""
        return z

    def path_coefficients(self, gamma):
        """(alpha, sigma) of the denoiser's path at gamma: sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma))
        (i-DODE `noise_schedule`, model_vdm.py:124-126)."""
        gamma = tf.convert_to_tensor(gamma, tf.float32)
        return tf.sqrt(tf.sigmoid(-gamma)), tf.sqrt(tf.sigmoid(gamma))

    def velocity_coefficients(self, gamma):
        """(a, b) with eps = a v + b z for the velocity v = (eps - sigma z) / alpha = alpha eps - sigma f.

        i-DODE model_vdm.py:211 (its target) and :272 (eps_hat = alpha F_hat + sigma z).
        """
        return self.path_coefficients(gamma)

    def importance_cdf(self, gamma):
        """integral_{gamma_0}^{gamma} alpha(g)^2 dg = softplus(-gamma_0) - softplus(-gamma).

        alpha^2 = sigmoid(-g) = -d/dg log(1 + e^-g) (i-DODE model_vdm.py:175).
        """
        gamma = tf.convert_to_tensor(gamma, tf.float32)
        return tf.nn.softplus(-self.gamma_0) - tf.nn.softplus(-gamma)

    def importance_gamma(self, u):
        """The inverse of `importance_cdf` / Z at u in [0, 1], in closed form.

        i-DODE model_vdm.py:175-176, gamma = -log((1 + e^-gamma_0) e^(-Z u) - 1), written as
        -log(expm1(softplus(-gamma_1) + Z (1 - u))): the same number, without the cancellation
        of (1 + e^-gamma_0) e^(-Z u) - 1 near u = 1 (both terms of the sum are positive).
        Differentiable in the endpoints (a learned linear schedule trains them through it).
        """
        u = tf.convert_to_tensor(u, tf.float32)
        total = self.importance_cdf(self.gamma_1)
        return -tf.math.log(tf.math.expm1(tf.nn.softplus(-self.gamma_1) + total * (1.0 - u)))

    def importance_sample(self, u):
        """gamma with density p(gamma) = alpha_path(gamma)^2 / Z on [gamma_0, gamma_1], and 1 / p(gamma).

        `u` in [0, 1) (e.g. antithetic times) is mapped through the inverse CDF, so a stratified
        u gives stratified gammas. For any function h, E[h(gamma) / p(gamma)] = integral h d gamma:
        with h = 0.5 ||eps - eps_hat||^2 that is the continuous-time diffusion loss (the same VLB
        as uniform times; VDM eq. 17 written in gamma), whatever the schedule's shape.
        i-DODE model_vdm.py:173-180 and the weights of :212, :215.
        """
        gamma = self.importance_gamma(u)
        alpha, _ = self.path_coefficients(gamma)
        return gamma, self.importance_cdf(self.gamma_1) / tf.square(alpha)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(gamma_min=self.gamma_min, gamma_max=self.gamma_max)
        return config


@keras.saving.register_keras_serializable(package="vdm_tf")
class FixedLinear(NoiseSchedule):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) * t, nothing trained.

    Example:
    >>> schedule = FixedLinear(gamma_min=-13.3, gamma_max=5.0)
    >>> float(schedule(0.5))  # -4.15

    Reference: Kingma et al. 2021, "Variational Diffusion Models", appendix E (the fixed baseline).
    """

    def __init__(self, gamma_min=-13.3, gamma_max=5.0, **kwargs):
        super().__init__(gamma_min, gamma_max, learn_endpoints=False, **kwargs)


@keras.saving.register_keras_serializable(package="vdm_tf")
class VariancePreserving(NoiseSchedule):
    """i-DODE's "VP" schedule: gamma(t) = gamma_min + (gamma_max - gamma_min) t, fixed, VP path.

    The process of `FixedLinear` with i-DODE's defaults (-13.3, 5.0): alpha^2 = sigmoid(-gamma),
    sigma^2 = sigmoid(gamma); the velocity v = alpha eps - sigma f; the importance density
    p(gamma) proportional to alpha^2 = sigmoid(-gamma), inverted in closed form.

    Example:
    >>> schedule = VariancePreserving()
    >>> gamma, inverse_density = schedule.importance_sample(tf.constant([0.0, 0.5, 0.99]))

    Reference: Zheng et al. 2023 (i-DODE), github thu-ml/i-DODE model_vdm.py:122-131 ("VP"),
    :173-176, :665-671 (`NoiseSchedule_FixedLinear`).
    """

    def __init__(self, gamma_min=-13.3, gamma_max=5.0, **kwargs):
        super().__init__(gamma_min, gamma_max, learn_endpoints=False, **kwargs)


@keras.saving.register_keras_serializable(package="vdm_tf")
class StraightPath(NoiseSchedule):
    """i-DODE's "SP" (straight-path) schedule: the fixed linear gamma(t), the path alpha + sigma = 1.

    z_sp = (1 - sigma) f + sigma eps with sigma = sigmoid(gamma / 2), alpha = sigmoid(-gamma / 2)
    (i-DODE model_vdm.py:127-129): the segment from the data to the noise, with the same
    gamma = log(sigma^2 / alpha^2) as the variance-preserving latent z, so z_sp = z / (alpha_vp +
    sigma_vp) and every vdm_tf tool works on z. The denoiser sees z_sp; its velocity is
    v = (eps - z_sp) / (sqrt(2) alpha) = (eps - f) / sqrt(2) (:214), eps = sqrt(2) alpha v + z_sp
    (:274); the importance density is proportional to alpha^2 = sigmoid(-gamma / 2)^2, inverted
    by bisection as in i-DODE (:98-120, :177-179).

    Example:
    >>> schedule = StraightPath()
    >>> z_sp = schedule.to_path(z, gamma)   # what the network is trained on

    Reference: Zheng et al. 2023 (i-DODE), github thu-ml/i-DODE model_vdm.py.
    """

    def __init__(self, gamma_min=-13.3, gamma_max=5.0, **kwargs):
        super().__init__(gamma_min, gamma_max, learn_endpoints=False, **kwargs)

    def to_path(self, z, gamma):
        """z / (alpha + sigma) of the variance-preserving coefficients: the straight path's latent."""
        alpha, sigma = NoiseSchedule.path_coefficients(self, gamma)
        return z / per_example(alpha + sigma, len(z.shape))

    def path_coefficients(self, gamma):
        """(sigmoid(-gamma / 2), sigmoid(gamma / 2)) (i-DODE model_vdm.py:128-129)."""
        gamma = tf.convert_to_tensor(gamma, tf.float32)
        return tf.sigmoid(-0.5 * gamma), tf.sigmoid(0.5 * gamma)

    def velocity_coefficients(self, gamma):
        """(sqrt(2) alpha, 1): eps = sqrt(2) alpha v + z_sp (i-DODE model_vdm.py:274)."""
        alpha, _ = self.path_coefficients(gamma)
        return tf.sqrt(2.0) * alpha, tf.ones_like(alpha)

    def importance_cdf(self, gamma):
        """integral_{gamma_0}^{gamma} sigmoid(-g / 2)^2 dg = 2 (W(gamma_0) - W(gamma)),
        W(g) = log(1 + e^(-g/2)) + 1 / (1 + e^(-g/2)) = softplus(-g / 2) + sigmoid(g / 2).

        i-DODE model_vdm.py:98-105 (its small-e^(-g/2) branch approximates the same W).
        """
        gamma = tf.convert_to_tensor(gamma, tf.float32)

        def w(g):
            return tf.nn.softplus(-0.5 * g) + tf.sigmoid(0.5 * g)

        return 2.0 * (w(self.gamma_0) - w(gamma))

    def importance_gamma(self, u):
        """The inverse of `importance_cdf` / Z at u: `BISECTION_STEPS` halvings of [gamma_0, gamma_1]
        (i-DODE model_vdm.py:107-120). Not differentiable (the schedule is fixed)."""
        target = tf.stop_gradient(self.importance_cdf(self.gamma_1) * tf.convert_to_tensor(u, tf.float32))
        low = tf.fill(tf.shape(target), tf.stop_gradient(self.gamma_0))
        high = tf.fill(tf.shape(target), tf.stop_gradient(self.gamma_1))

        def halve(i, low, high):
            middle = 0.5 * (low + high)
            below = self.importance_cdf(middle) <= target
            return i + 1, tf.where(below, middle, low), tf.where(below, high, middle)

        _, low, high = tf.while_loop(lambda i, *_: i < BISECTION_STEPS, halve, (tf.constant(0), low, high))
        return 0.5 * (low + high)


@keras.saving.register_keras_serializable(package="vdm_tf")
class LearnedLinear(NoiseSchedule):
    """VDM's learnable scalar schedule `gamma(t) = b + |w| t`: linear, endpoints trained on the VLB.

    Reference: google-research/vdm, `NoiseSchedule_Scalar`.
    """

    def __init__(self, gamma_min=-13.3, gamma_max=5.0, **kwargs):
        super().__init__(gamma_min, gamma_max, learn_endpoints=True, **kwargs)


@keras.saving.register_keras_serializable(package="vdm_tf")
class LearnedMonotonic(NoiseSchedule):
    """Monotone-network schedule with learned endpoints (VDM eq. 59 and appendix I.2).

    The unnormalised network is VDM's `NoiseScheduleNet`, a linear term plus a sigmoid layer,
    all with positive (absolute-valued) weights so it is increasing in t:

        g(t) = |w1| t + sum_j |w3_j| * 2 (sigmoid(|w2_j| (2t - 1) + b2_j) - 0.5) / n_features,
        shape(t) = (g(t) - g(0)) / (g(1) - g(0)).

    With `minimize_variance=True` the VDM model trains the weights of g on the variance of the
    continuous-time diffusion loss (appendix I.2: the gradient of E[L^2] is the per-example VLB
    gradient scaled by 2 L), and the endpoints on the VLB. With `False`, everything trains on
    the VLB (as the public reference code does).

    Args:
        gamma_min: initial gamma_0.
        gamma_max: initial gamma_1.
        n_features: width of the sigmoid layer (1024 in VDM).
        minimize_variance: train the shape on the variance of the diffusion loss.
        **kwargs: forwarded to `keras.layers.Layer`.

    Example:
    >>> schedule = LearnedMonotonic(gamma_min=-13.3, gamma_max=5.0)
    >>> gamma, dgamma_dt = schedule.gamma_and_derivative(tf.constant([0.0, 0.5, 1.0]))

    Reference: Kingma et al. 2021, "Variational Diffusion Models", eq. (59), appendix I.2;
    google-research/vdm `NoiseScheduleNet`.
    """

    def __init__(self, gamma_min=-13.3, gamma_max=5.0, n_features=1024, minimize_variance=True, **kwargs):
        super().__init__(gamma_min, gamma_max, learn_endpoints=True, **kwargs)
        self.n_features = int(n_features)
        self.minimize_variance = bool(minimize_variance)
        small_normal = keras.initializers.RandomNormal(stddev=0.01)  # flax's `normal()`, as in VDM
        self.linear_weight = self.add_weight(name="linear_weight", shape=(), initializer="ones")
        self.hidden_weight = self.add_weight(name="hidden_weight", shape=(self.n_features,), initializer=small_normal)
        self.hidden_bias = self.add_weight(name="hidden_bias", shape=(self.n_features,), initializer="zeros")
        self.output_weight = self.add_weight(name="output_weight", shape=(self.n_features,), initializer=small_normal)

    @property
    def variance_variables(self):
        if not self.minimize_variance:
            return []
        return [self.linear_weight, self.hidden_weight, self.hidden_bias, self.output_weight]

    def unnormalised(self, t):
        """The monotone network g(t), elementwise over t of any shape."""
        t = t[..., None]
        hidden = tf.sigmoid(tf.abs(self.hidden_weight) * (2.0 * t - 1.0) + self.hidden_bias)
        nonlinear = tf.reduce_sum(tf.abs(self.output_weight) * 2.0 * (hidden - 0.5), axis=-1) / self.n_features
        return tf.abs(self.linear_weight) * t[..., 0] + nonlinear

    def shape(self, t):
        g_0, g_1 = tf.unstack(self.unnormalised(tf.constant([0.0, 1.0])))
        return (self.unnormalised(t) - g_0) / (g_1 - g_0)

    def get_config(self):
        config = super().get_config()
        config.update(n_features=self.n_features, minimize_variance=self.minimize_variance)
        return config
