"""Noise schedules gamma(t) of Variational Diffusion Models.

A schedule maps time t in [0, 1] to gamma(t) = -log SNR(t), increasing in t, with
`sigma_t^2 = sigmoid(gamma(t))` and `alpha_t^2 = sigmoid(-gamma(t))` (Kingma et al. 2021,
"Variational Diffusion Models", section 3.2-3.3). Every schedule here has the form of VDM eq. (59):

    gamma(t) = gamma_0 + (gamma_1 - gamma_0) * shape(t),   shape(0) = 0, shape(1) = 1,

so the endpoints gamma_0 = gamma(0), gamma_1 = gamma(1) and the monotone `shape` in between are
separate pieces. By VDM's invariance result (section 5.1) the continuous-time VLB depends only
on the endpoints; the shape changes only the variance of its Monte-Carlo estimate, which is why
`LearnedMonotonic` trains its shape on that variance (appendix I.2) and its endpoints on the VLB.
"""

import keras
import tensorflow as tf


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
