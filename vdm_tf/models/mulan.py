"""MuLAN: a diffusion model with a learned per-pixel noise schedule conditioned on an auxiliary latent.

Sahoo, Gokaslan, De Sa, Kuleshov (NeurIPS 2024), "Diffusion Models With Learned Adaptive Noise";
official code github s-sahoo/MuLAN (`ldm/model_mulan_epsilon.py`, `ldm/model_mulan_velocity.py`;
/work/notes/mulan_spec.md gives file:line for every piece). The pieces:

- an encoder of the clean image (`LatentEncoder`, the official `UnetEncoder`) gives logits over
  L latent units; the latent is the top-k of the logits perturbed by sum-of-gamma noise, a k-hot
  vector, with a straight-through gradient (`topk_latent`). Its term in the bound is the official
  code's KL(softmax(logits) || uniform over L) (`categorical_kl`), reported as `latent_kl`;
- a per-pixel schedule gamma(t; latent) (`PolynomialSchedule`, the official `poly_fixedend`): a
  polynomial in t whose derivative is a square, so every pixel's gamma increases in t, with the
  same endpoints gamma_min, gamma_max for every pixel and latent;
- the denoiser (`vdm_tf.networks.ScoreUNet` with `conditioning_dim=L`) sees z_t, the per-image mean
  of gamma_t and the latent; it predicts eps or, with `parameterization="velocity"`, the velocity
  v = alpha eps - sigma f, converted per pixel to eps_hat = alpha v_hat + sigma z_t (`_denoise`).

The negative ELBO per image, in nats, is (with the latent drawn from q(latent | x)):
reconstruction -log p(x | z_0) and prior KL(q(z_1 | x) || N(0, I)) (at the fixed endpoints: VDM's
terms), diffusion 0.5 E_t[sum_pixels gamma'_i(t) (eps_i - eps_hat_i)^2] (VDM eq. 17 per pixel),
and the latent KL. `elbo` reports them in bits per dimension; `ode_bpd` is the official exact
likelihood, through the per-pixel probability-flow ODE given the latent.
"""

import math
import numbers

import keras
import tensorflow as tf

from vdm_tf import images, likelihood, samplers, seeding, traced
from vdm_tf.models.base import DiffusionModel, deserialized, serialized
from vdm_tf.models.vdm import VDM
from vdm_tf.networks.blocks import AttentionBlock, ResnetBlock, conv3x3
from vdm_tf.networks.embeddings import TimestepEmbedding
from vdm_tf.networks.fourier_features import FourierFeatures
from vdm_tf.networks.normalization import GroupNorm

PARAMETERIZATIONS = ("eps", "velocity")
GAMMA_NOISE_TERMS = 10  # the official sum-of-gamma noise sums 10 draws (model_mulan_epsilon.py:221-231)
GAMMA_NOISE_TAU = 10.0  # and scales by gamma_tau = 10
LATENT_STREAM = 13  # folded into a sampling seed for the latent's prior draw
# The official exact likelihood's dequantization (notebook_utils.py:326-340, 446-458): noise
# N(0, 1) truncated to [-TN_BOUND, TN_BOUND], and its constant in the bpd offset.
TN_BOUND = 3.0
TN_OFFSET_CONSTANT = 0.01522
# Its normaliser P(|u| < 3) as the official importance weights take it (notebook_utils.py:335-336,
# "Z = 0.9974613" after i-DODE's eq. 28; the exact value is erf(3 / sqrt 2) = 0.9973002).
TN_MASS = 0.9974613


def lecun_dense(units, name, kernel_initializer="lecun_normal"):
    """A Dense layer with flax's default initialisation (lecun_normal kernel, zero bias)."""
    return keras.layers.Dense(units, kernel_initializer=kernel_initializer, name=name)


# ------------------------------------------------------------------------------------------------
# The auxiliary latent.


def categorical_kl(logits):
    """KL(softmax(logits) || Uniform(L)) in nats per row: sum_l q_l (log q_l + log L).

    The official latent term (`_gumbel_kl_loss`, model_mulan_epsilon.py:205-210), on the
    noise-free logits.
    """
    log_q = tf.nn.log_softmax(logits)
    size = tf.cast(tf.shape(logits)[-1], logits.dtype)
    return tf.reduce_sum(tf.exp(log_q) * (log_q + tf.math.log(size)), axis=-1)


def sum_of_gamma_noise(draws, k):
    """The official top-k perturbation from draws G_j ~ Gamma(1/k, 1), j = 1..10 on axis 0.

    tau / k (sum_j G_j j / k - log 10), tau = 10 (model_mulan_epsilon.py:221-231: `noise / beta`
    with beta = k / j).
    """
    j = tf.reshape(tf.range(1, GAMMA_NOISE_TERMS + 1, dtype=tf.float32), [-1] + [1] * (len(draws.shape) - 1))
    total = tf.reduce_sum(draws * j / k, axis=0) - math.log(GAMMA_NOISE_TERMS)
    return GAMMA_NOISE_TAU * total / k


def k_hot(logits, k):
    """1 on each row's k largest logits, 0 elsewhere (ties with the k-th give more ones): float32 [N, L].

    The official `logits_to_embeddings` (notebook_utils.py:548-551) and the forward value of `topk_latent`.
    """
    kth = tf.math.top_k(logits, k).values[:, -1:]
    return tf.cast(logits >= kth, logits.dtype)


def topk_latent(logits, k):
    """The k-hot latent of perturbed logits with the straight-through gradient of its soft version.

    Centred logits l (mean over L removed); forward value 1[l >= k-th largest l]; gradient that of
    l / ||l||_2 (model_mulan_epsilon.py:241-251).
    """
    centred = logits - tf.reduce_mean(logits, axis=1, keepdims=True)
    soft = centred / tf.norm(centred, axis=1, keepdims=True)
    return tf.stop_gradient(k_hot(centred, k) - soft) + soft


@keras.saving.register_keras_serializable(package="vdm_tf")
class LatentEncoder(keras.layers.Layer):
    """Logits of MuLAN's auxiliary latent from a clean image f in [-1, 1]: the official `UnetEncoder`.

    The down half of the VDM U-Net at full resolution (model_mulan_epsilon.py:101-154): a constant
    conditioning vector (two swish Dense layers on the time embedding of t = 0), Fourier features,
    `conv_in`, `n_layers` ResNet blocks (optional attention), the middle ResNet-attention-ResNet,
    GroupNorm, swish, a zero-initialised 3x3 convolution to one channel, swish of its H*W values,
    and a Dense layer to `latent_size` logits. Weights map one to one to the official ones, except
    that the official `dense0` has one more input row, which multiplies a constant zero.

    Args:
        latent_size: L, the number of logits.
        n_layers: ResNet blocks of the down path (`forward_n_layer`).
        n_embd: channels of every block (`sm_n_embd`).
        fourier_features, fourier_exponents, attention, dropout: as `ScoreUNet`'s.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments: f float32 [N, H, W, C], `training` (dropout). Returns float32 [N, L].
    """

    def __init__(
        self,
        latent_size=50,
        n_layers=4,
        n_embd=128,
        fourier_features=True,
        fourier_exponents=(7, 8),
        attention=False,
        dropout=0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.latent_size = int(latent_size)
        self.n_layers = int(n_layers)
        self.n_embd = int(n_embd)
        self.fourier_features = bool(fourier_features)
        self.fourier_exponents = tuple(int(n) for n in fourier_exponents)
        self.attention = bool(attention)
        self.dropout = float(dropout)
        self.time_embedding = TimestepEmbedding(self.n_embd, name="time_embedding")
        self.cond_dense0 = keras.layers.Dense(
            4 * self.n_embd, activation="silu", kernel_initializer="lecun_normal", name="cond_dense0"
        )
        self.cond_dense1 = keras.layers.Dense(
            4 * self.n_embd, activation="silu", kernel_initializer="lecun_normal", name="cond_dense1"
        )
        self.fourier = FourierFeatures(self.fourier_exponents, name="fourier") if self.fourier_features else None
        self.conv_in = conv3x3(self.n_embd, name="conv_in")
        self.down_blocks = [
            ResnetBlock(self.n_embd, self.dropout, name=f"down_block_{i}") for i in range(self.n_layers)
        ]
        self.down_attention = (
            [AttentionBlock(name=f"down_attention_{i}") for i in range(self.n_layers)] if self.attention else []
        )
        self.mid_block1 = ResnetBlock(self.n_embd, self.dropout, name="mid_block1")
        self.mid_attention = AttentionBlock(name="mid_attention")
        self.mid_block2 = ResnetBlock(self.n_embd, self.dropout, name="mid_block2")
        self.norm_out = GroupNorm(name="norm_out")
        self.conv_out = conv3x3(1, zero_init=True, name="conv_out")
        self.dense_out = lecun_dense(self.latent_size, name="dense_out")

    def build(self, f_shape):
        *spatial, channels = f_shape
        h_shape = (*spatial, self.n_embd)
        cond_shape = (spatial[0], 4 * self.n_embd)
        self.cond_dense0.build((spatial[0], self.n_embd))
        self.cond_dense1.build(cond_shape)
        self.conv_in.build((*spatial, channels * (1 + 2 * len(self.fourier_exponents)) if self.fourier else channels))
        for block in (*self.down_blocks, self.mid_block1, self.mid_block2):
            block.build(h_shape, cond_shape)
        for block in (*self.down_attention, self.mid_attention):
            block.build(h_shape)
        self.norm_out.build(h_shape)
        self.conv_out.build(h_shape)
        self.dense_out.build((spatial[0], spatial[1] * spatial[2]))

    def call(self, f, training=None):
        cond = self.time_embedding(tf.zeros(tf.shape(f)[:1], f.dtype))  # t = 0: a learned constant
        cond = self.cond_dense1(self.cond_dense0(cond))
        h = tf.concat([f, self.fourier(f)], axis=-1) if self.fourier else f
        h = self.conv_in(h)
        for i, block in enumerate(self.down_blocks):
            h = block(h, cond, training=training)
            if self.attention:
                h = self.down_attention[i](h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, cond, training=training)), cond, training=training)
        h = self.conv_out(tf.nn.silu(self.norm_out(h)))
        return self.dense_out(tf.nn.silu(tf.reshape(h, [tf.shape(h)[0], -1])))

    def compute_output_shape(self, f_shape):
        return (f_shape[0], self.latent_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            latent_size=self.latent_size,
            n_layers=self.n_layers,
            n_embd=self.n_embd,
            fourier_features=self.fourier_features,
            fourier_exponents=self.fourier_exponents,
            attention=self.attention,
            dropout=self.dropout,
        )
        return config


# ------------------------------------------------------------------------------------------------
# The per-pixel schedule.


@keras.saving.register_keras_serializable(package="vdm_tf")
class PolynomialSchedule(keras.layers.Layer):
    """MuLAN's per-pixel schedule with fixed ends (`poly_fixedend`, model_mulan_epsilon.py:481-613).

    From the latent [N, L]: h = swish(dense_2(swish(dense_1(latent)))), per pixel a = dense_out_a(h)
    (zero-initialised), b = dense_out_b(h), c = 1e-3 + softplus(dense_out_c(h)), and

        gamma_i(t) = gamma_min + (gamma_max - gamma_min) P_i(t) / P_i(1),
        P(t) = a^2 t^5 / 5 + (b^2 + 2 a c) t^3 / 3 + a b t^4 / 2 + b c t^2 + c^2 t,

    whose derivative P'(t) = (a t^2 + b t + c)^2 is a square: every pixel's gamma increases in t.
    P(0) = 0 and P(1) is its normaliser, so gamma(0) = gamma_min exactly and gamma(1) = gamma_max to
    float32 rounding (a few ulps) for every pixel and latent: the endpoints are the scalars
    `gamma_0`, `gamma_1`, at which the reconstruction and prior terms are computed.

    Args:
        num_dims: D = H * W * C, the pixels (outputs per image, row-major over H, W, C).
        gamma_min, gamma_max: the fixed endpoints.
        n_features: width of the two hidden layers (the official code: D).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments: latent float32 [N, L], t float32 [N] or scalar. Returns gamma [N, D].
    """

    def __init__(self, num_dims, gamma_min=-13.3, gamma_max=5.0, n_features=None, **kwargs):
        super().__init__(**kwargs)
        if not gamma_max > gamma_min:
            raise ValueError(f"gamma_max must exceed gamma_min; got gamma_min={gamma_min}, gamma_max={gamma_max}.")
        self.num_dims = int(num_dims)
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.n_features = self.num_dims if n_features is None else int(n_features)
        self.dense_1 = lecun_dense(self.n_features, "dense_1")
        self.dense_2 = lecun_dense(self.n_features, "dense_2")
        self.dense_out_a = lecun_dense(self.num_dims, "dense_out_a", kernel_initializer="zeros")
        self.dense_out_b = lecun_dense(self.num_dims, "dense_out_b")
        self.dense_out_c = lecun_dense(self.num_dims, "dense_out_c")

    def build(self, latent_shape, t_shape=None):
        hidden = (latent_shape[0], self.n_features)
        self.dense_1.build(latent_shape)
        self.dense_2.build(hidden)
        for layer in (self.dense_out_a, self.dense_out_b, self.dense_out_c):
            layer.build(hidden)

    @property
    def gamma_0(self):
        """gamma(0) of every pixel: gamma_min (a float32 scalar tensor)."""
        return tf.constant(self.gamma_min, tf.float32)

    @property
    def gamma_1(self):
        """gamma(1) of every pixel: gamma_min + (gamma_max - gamma_min) in float32, as `call` computes
        it (4.999999 for -13.3, 5; the official code's number too)."""
        return tf.constant(self.gamma_min, tf.float32) + tf.constant(self.gamma_max - self.gamma_min, tf.float32)

    def coefficients(self, latent):
        """(a, b, c), each [N, D], of the polynomial (a t^2 + b t + c)^2 that is P'."""
        h = tf.nn.silu(self.dense_2(tf.nn.silu(self.dense_1(latent))))
        return self.dense_out_a(h), self.dense_out_b(h), 1e-3 + tf.nn.softplus(self.dense_out_c(h))

    def _times(self, latent, t):
        t = tf.convert_to_tensor(t, tf.float32)
        return tf.reshape(tf.broadcast_to(t, tf.shape(latent)[:1]), [-1, 1])

    def call(self, latent, t):
        return self.gamma_and_derivative(latent, t)[0]

    def gamma_and_derivative(self, latent, t):
        """gamma(t) and d gamma / dt per pixel, [N, D] each (the derivative in closed form)."""
        a, b, c = self.coefficients(latent)
        t = self._times(latent, t)
        polynomial = (
            tf.square(a) * t**5 / 5.0
            + (tf.square(b) + 2 * a * c) * t**3 / 3.0
            + a * b * t**4 / 2.0
            + b * c * t**2
            + tf.square(c) * t
        )
        scale = tf.square(a) / 5.0 + (tf.square(b) + 2 * a * c) / 3.0 + a * b / 2.0 + b * c + tf.square(c)
        gamma_range = self.gamma_max - self.gamma_min
        derivative = gamma_range * tf.square(a * t**2 + b * t + c) / scale
        return self.gamma_min + gamma_range * polynomial / scale, derivative

    def compute_output_shape(self, latent_shape, t_shape=None):
        return (latent_shape[0], self.num_dims)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_dims=self.num_dims, gamma_min=self.gamma_min, gamma_max=self.gamma_max, n_features=self.n_features
        )
        return config


# ------------------------------------------------------------------------------------------------
# The model.


class _GivenLatent:
    """A model's sampler protocol with its latent fixed: what `vdm_tf.samplers.ancestral` runs."""

    def __init__(self, model, latent):
        self.image_shape = model.image_shape
        self.decode = model.decode
        self.ancestral_step = lambda z_t, s, t, seed: model.ancestral_step(z_t, s, t, seed, latent=latent)


@keras.saving.register_keras_serializable(package="vdm_tf")
class MuLAN(DiffusionModel):
    """MuLAN: negative ELBO in bpd with a latent-conditioned per-pixel schedule, training, sampling.

    Args:
        denoiser: a layer `out = denoiser(z_t, gamma_t, training=..., conditioning=latent)` with
            gamma_t [N] (the per-image mean of the per-pixel gamma) and `conditioning_dim` equal
            to the encoder's `latent_size`: `vdm_tf.networks.ScoreUNet(conditioning_dim=L)`, the
            official VDM score network with the latent concatenated to its time embedding.
        schedule: a `PolynomialSchedule` with `num_dims` = H * W * C.
        encoder: a `LatentEncoder`.
        image_shape: (H, W, C) of the uint8 images.
        latent_k: k, the ones of the k-hot latent (< the encoder's `latent_size`).
        parameterization: `"eps"` (`mulan_epsilon`) or `"velocity"` (`mulan_velocity`).
        seed, pixel_values, **kwargs: as `DiffusionModel`'s.

    `elbo` returns per-image `bpd` (the negative ELBO, an upper bound on -log2 p(x) per
    dimension), `diffusion`, `prior`, `reconstruction` and `latent_kl`, the terms of `bpd`; the
    latent is one draw of q(latent | x) per time sample, as the official code evaluates it.
    Samples draw the latent from its prior, uniform over the k-subsets of the L units.

    Example:
    >>> L, k = 50, 15
    >>> model = MuLAN(ScoreUNet(n_layers=4, n_embd=64, conditioning_dim=L),
    ...               PolynomialSchedule(num_dims=8 * 8 * 1), LatentEncoder(latent_size=L, n_embd=64),
    ...               image_shape=(8, 8, 1), latent_k=k, parameterization="velocity")
    >>> model.compile(optimizer=keras.optimizers.AdamW(2e-4))
    >>> terms = model.elbo(images, seed=0)   # {"bpd": [N], ..., "latent_kl": [N]}

    Reference: Sahoo et al. 2024, arXiv:2312.13236; github s-sahoo/MuLAN.
    """

    TERMS = ("bpd", "diffusion", "prior", "reconstruction", "latent_kl")
    LOSS_TERM = "bpd"

    def __init__(
        self,
        denoiser,
        schedule,
        encoder,
        image_shape,
        latent_k=15,
        parameterization="eps",
        seed=0,
        pixel_values=None,
        **kwargs,
    ):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}.")
        if not 1 <= int(latent_k) < encoder.latent_size:
            raise ValueError(f"latent_k must be in 1..latent_size - 1 = {encoder.latent_size - 1}; got {latent_k}.")
        if getattr(denoiser, "conditioning_dim", None) != encoder.latent_size:
            raise ValueError(
                f"The denoiser is conditioned on the latent: build it with conditioning_dim={encoder.latent_size}."
            )
        size = math.prod(int(d) for d in image_shape)
        if schedule.num_dims != size:
            raise ValueError(
                f"The schedule has {schedule.num_dims} outputs; images of shape {image_shape} have {size}."
            )
        self.encoder = encoder
        self.latent_k = int(latent_k)
        self.parameterization = parameterization
        super().__init__(denoiser, schedule, image_shape, seed=seed, pixel_values=pixel_values, **kwargs)

    @property
    def latent_size(self):
        return self.encoder.latent_size

    def build(self, input_shape=None):
        """Creates the weights of the denoiser, the encoder and the schedule."""
        if not self.denoiser.built:
            self.denoiser(tf.zeros((1,) + self.image_shape), tf.zeros((1,)), training=False)
        if not self.encoder.built:
            self.encoder(tf.zeros((1,) + self.image_shape), training=False)
        if not self.schedule.built:
            self.schedule(tf.zeros((1, self.latent_size)), tf.zeros((1,)))
        self.built = True

    # ----------------------------------------------------------------------------------------
    # The latent, the schedule and the denoiser.

    def _per_pixel(self, values):
        """[N, D] -> [N, H, W, C] (row-major, as the official reshape)."""
        return tf.reshape(values, (-1,) + self.image_shape)

    def gamma(self, latent, t):
        """gamma(t; latent) per pixel: float32 [N, H, W, C]."""
        return self._per_pixel(self.schedule(latent, t))

    def encode_latent(self, f, seed, example_index, training=False):
        """(latent [N, L] drawn from q(latent | x) with the straight-through gradient, latent KL [N] in nats).

        The perturbation of example i depends only on (seed, example_index[i]).
        """
        logits = self.encoder(f, training=training)
        seed = seeding.as_seed(seed)
        draws = tf.map_fn(
            lambda index: tf.random.stateless_gamma(
                [GAMMA_NOISE_TERMS, self.latent_size], seeding.fold_in(seed, index), alpha=1.0 / self.latent_k
            ),
            tf.cast(example_index, tf.int64),
            fn_output_signature=tf.float32,
        )  # [N, 10, L]
        noise = sum_of_gamma_noise(tf.transpose(draws, [1, 0, 2]), float(self.latent_k))
        return topk_latent(logits + noise, self.latent_k), categorical_kl(logits)

    def prior_latent(self, num, seed):
        """k-hot latents [num, L] uniform over the k-subsets: the top k of i.i.d. normals (official
        notebook_utils.py:63-72, 548-551)."""
        normals = tf.random.stateless_normal(tf.stack([num, self.latent_size]), seeding.as_seed(seed))
        return k_hot(normals, self.latent_k)

    def fixed_latent(self, num):
        """The first k units on: the official `_get_deterministic_embedding` (its training-time sampler)."""
        ones = tf.ones(tf.stack([num, self.latent_k]))
        return tf.concat([ones, tf.zeros(tf.stack([num, self.latent_size - self.latent_k]))], axis=1)

    def _network_output(self, z_t, gamma_t, training=False, latent=None):
        """The denoiser's output (eps_hat or v_hat) given the per-pixel gamma_t [N, H, W, C] and the
        latent [N, L]: the network sees the per-image mean of gamma_t (official `_get_score_model_gt`)."""
        return super()._denoise(z_t, tf.reduce_mean(gamma_t, axis=[1, 2, 3]), training, conditioning=latent)

    def _denoise(self, z_t, gamma_t, training=False, latent=None):
        """eps_hat(z_t) in float32 given the per-pixel gamma_t [N, H, W, C] and the latent [N, L].

        A velocity output is converted per pixel, eps_hat = alpha v_hat + sigma z_t.
        """
        output = self._network_output(z_t, gamma_t, training, latent)
        if self.parameterization == "eps":
            return output
        return tf.sqrt(tf.sigmoid(-gamma_t)) * output + tf.sqrt(tf.sigmoid(gamma_t)) * z_t

    # ----------------------------------------------------------------------------------------
    # The negative ELBO.

    def _diffusion_loss(self, f, latent, t, eps, training):
        """0.5 sum_pixels gamma'_i(t) (eps_i - eps_hat_i)^2 in nats per example (continuous time)."""
        gamma_t, dgamma_t = (self._per_pixel(v) for v in self.schedule.gamma_and_derivative(latent, t))
        z_t = tf.sqrt(tf.sigmoid(-gamma_t)) * f + tf.sqrt(tf.sigmoid(gamma_t)) * eps
        eps_hat = self._denoise(z_t, gamma_t, training, latent=latent)
        return 0.5 * tf.reduce_sum(dgamma_t * tf.square(eps - eps_hat), axis=[1, 2, 3])

    def _loss_terms(self, x, seed, training, example_index=None, num_examples=None):
        """Per-example bpd terms (dict over TERMS) and None.

        Every draw of example i (latent perturbation, time, diffusion and reconstruction noise)
        depends only on `seed` and its global index `example_index[i]`.
        """
        x = images.check_images(x, self.image_shape)
        if example_index is None:
            example_index = tf.range(tf.shape(x)[0])
            num_examples = tf.shape(x)[0]
        # Split as VDM splits its seed, so that with a constant latent and one schedule for every
        # pixel a MuLAN draws a VDM's times and noise (the reduction test).
        diffusion_seed, reconstruction_seed, latent_seed = seeding.split_seed(seed, 3)
        time_seed, eps_seed = seeding.split_seed(diffusion_seed, 2)
        f = images.encode(x)
        latent, latent_kl = self.encode_latent(f, latent_seed, example_index, training)
        t = self._time_samples(example_index, num_examples, time_seed)
        eps = seeding.per_example_normal(eps_seed, example_index, self.image_shape)
        nats = {
            "diffusion": self._diffusion_loss(f, latent, t, eps, training),
            # With fixed ends gamma_0, gamma_1 are the same for every pixel and latent: VDM's terms
            # (the official code evaluates its per-pixel g_0, g_1, equal to these to float rounding).
            "prior": VDM._prior_loss(self, f),
            "reconstruction": VDM._reconstruction_loss(self, x, f, reconstruction_seed, example_index),
            "latent_kl": latent_kl,
        }
        nats["bpd"] = nats["diffusion"] + nats["prior"] + nats["reconstruction"] + nats["latent_kl"]
        to_bpd = 1.0 / (self.num_dims * math.log(2.0))
        return {name: nats[name] * to_bpd for name in self.TERMS}, None

    # ----------------------------------------------------------------------------------------
    # Sampling and the score.

    @property
    def sde(self):
        """None of it: an AttributeError, as for a model without an SDE (`getattr(model, "sde", None)`)."""
        raise AttributeError(
            "MuLAN's forward process is per pixel and conditioned on the latent: it has no per-example "
            "SDE for vdm_tf.samplers / vdm_tf.likelihood; use model.sample (ancestral), model.elbo and "
            "model.ode_bpd (its exact likelihood)."
        )

    def score(self, z, t, latent=None):
        """grad_z log p_t(z | latent) = -eps_hat / sigma_t per pixel (latent None: `fixed_latent`)."""
        latent = self.fixed_latent(tf.shape(z)[0]) if latent is None else latent
        gamma_t = self.gamma(latent, tf.broadcast_to(tf.cast(t, tf.float32), tf.shape(z)[:1]))
        return -self._denoise(z, gamma_t, latent=latent) / tf.sqrt(tf.sigmoid(gamma_t))

    def ancestral_step(self, z_t, s, t, seed, latent=None):
        """One draw z_s ~ p(z_s | z_t, latent), VDM's update per pixel (official `sample`).

        `latent` None: the official training-time sampler's `fixed_latent`.
        """
        latent = self.fixed_latent(tf.shape(z_t)[0]) if latent is None else latent
        gamma_s, gamma_t = self.gamma(latent, s), self.gamma(latent, t)
        eps_hat = self._denoise(z_t, gamma_t, latent=latent)
        noise = tf.random.stateless_normal(tf.shape(z_t), seed)
        return samplers.ancestral_update(z_t, eps_hat, gamma_s, gamma_t, noise)

    def sample_given_latent(self, latent, num_steps, seed, argmax):
        """uint8 images by ancestral sampling with the latent [N, L] given (tensors, in a graph)."""
        return samplers.ancestral(_GivenLatent(self, latent), tf.shape(latent)[0], num_steps, seed, argmax)

    def _sample(self, num_samples, num_steps, seed, argmax):
        """Ancestral sampling with the latent drawn from its prior (`prior_latent`)."""
        latent = self.prior_latent(num_samples, seeding.fold_in(seed, LATENT_STREAM))
        return self.sample_given_latent(latent, num_steps, seed, argmax)

    # ----------------------------------------------------------------------------------------
    # The exact likelihood: the probability-flow ODE given the latent.

    def probability_flow(self, latent):
        """The probability-flow ODE's drift given the latent [N, L]: (z, t) -> dz/dt, per pixel

            dz/dt = 0.5 (eps_hat - sigma_t z) sigma_t gamma'_t

        (official `reverse_ode`, model_mulan_epsilon.py:459-478). Per pixel the forward process is
        a variance-preserving SDE with beta(t) = d log(1 + e^gamma) / dt = sigma_t^2 gamma'_t, whose
        probability flow (Song et al. 2021, eq. 13) is -0.5 beta (z + score), score = -eps_hat /
        sigma_t. With the velocity parameterisation eps_hat - sigma_t z = alpha_t v_hat exactly, so
        the drift is 0.5 alpha_t sigma_t gamma'_t v_hat (model_mulan_velocity.py:393-421), computed
        that way (no cancellation). t is a scalar; it is clipped to 1 (a solver's step may overshoot).
        """

        def flow(z, t):
            t = tf.fill(tf.shape(z)[:1], tf.minimum(tf.cast(t, tf.float32), 1.0))
            gamma_t, dgamma_t = (self._per_pixel(v) for v in self.schedule.gamma_and_derivative(latent, t))
            sigma = tf.sqrt(tf.sigmoid(gamma_t))
            if self.parameterization == "velocity":
                direction = tf.sqrt(tf.sigmoid(-gamma_t)) * self._network_output(z, gamma_t, latent=latent)
            else:
                direction = self._denoise(z, gamma_t, latent=latent) - sigma * z
            return 0.5 * direction * sigma * dgamma_t

        return flow

    def _ode_log_likelihood(self, z_0, latent, probe, rtol, atol):
        """(log p(z_0 | latent) [N] in nats, evaluations): the flow and its divergence integrated in t
        from 0 to 1 (`vdm_tf.likelihood.integrate`), plus log N(z_1; 0, I). `probe` None: the exact
        divergence; else the Hutchinson probe, one for the whole solve."""
        ode = likelihood.with_divergence(self.probability_flow(latent), probe)
        z_1, integral, nfe = likelihood.integrate(ode, 0.0, 1.0, z_0, rtol, atol)
        prior = tf.reduce_sum(-0.5 * (tf.square(z_1) + math.log(2.0 * math.pi)), axis=[1, 2, 3])
        return prior + integral, nfe

    def ode_log_likelihood(self, z_0, latent, seed=0, exact_divergence=False, probe="rademacher", rtol=1e-5, atol=1e-5):
        """log p_0(z_0 | latent) of the probability-flow ODE in nats (the density of z at t = 0).

        Args:
            z_0: float32 [N, H, W, C]. latent: float32 [N, L].
            seed: the Hutchinson probe's (ignored with `exact_divergence`).
            exact_divergence: the trace of the Jacobian (D backward passes: small images) instead of
                Hutchinson's estimate with one `probe` (`"rademacher"` or `"gaussian"`) per solve.
            rtol, atol: the solver's tolerances (`vdm_tf.likelihood.integrate`).

        Returns: dict, `log_likelihood` float32 [N] and `nfe`, the number of ODE evaluations.
        """
        samplers.check_choice("probe", probe, likelihood.PROBES)
        rtol, atol = float(rtol), float(atol)

        def build():
            @tf.function(
                input_signature=[
                    tf.TensorSpec([None, *self.image_shape], tf.float32),
                    tf.TensorSpec([None, self.latent_size], tf.float32),
                    tf.TensorSpec([2], tf.int64),
                ]
            )
            def run(z_0, latent, seed):
                noise = None if exact_divergence else likelihood.hutchinson_probe(tf.shape(z_0), seed, probe)
                log_p, nfe = self._ode_log_likelihood(z_0, latent, noise, rtol, atol)
                return {"log_likelihood": log_p, "nfe": nfe}

            return run

        key = ("mulan_ode_log_likelihood", bool(exact_divergence), probe, rtol, atol)
        run = traced.compiled(self, key, build)
        z_0, latent = tf.convert_to_tensor(z_0, tf.float32), tf.convert_to_tensor(latent, tf.float32)
        return run(z_0, latent, seeding.as_seed(seed))

    @property
    def _log_sigma_0(self):
        """log sigma_0 = 0.5 log sigmoid(gamma_0) = 0.5 (gamma_0 - softplus(gamma_0)), a Python float
        (so that it is a constant in any graph)."""
        gamma_0 = float(self.schedule.gamma_min)  # the schedule's fixed start gamma_0
        return -0.5 * math.log1p(math.exp(-gamma_0))

    @property
    def ode_bpd_offset(self):
        """The official exact likelihood's offset in bits per dimension (`_get_bpd_offset('tn',
        num_is=1)`, notebook_utils.py:446-458): -(0.5 (1 + log 2 pi) - 0.01522 + log sigma_0) / ln 2,
        log sigma_0 = 0.5 log sigmoid(gamma_0), gamma_0 the schedule's fixed start (-13.3 there).

        It stands for E log q(z_0 | x) / D of the dequantization: minus the entropy of sigma_0 u, u
        ~ N(0, 1) truncated to [-3, 3]. Its 0.01522 is the official constant; the exact entropy of
        that truncated normal is 0.5 (1 + log 2 pi) - 0.01603 (`likelihood.truncated_normal_log_q`),
        so the official bpd is 0.0012 lower than the bound it stands for; and the noise is scaled by
        exp(gamma_0 / 2) = sigma_0 / alpha_0, not sigma_0 (a difference of 1e-6 bpd at -13.3).
        """
        return -(0.5 * (1.0 + math.log(2.0 * math.pi)) - TN_OFFSET_CONSTANT + self._log_sigma_0) / math.log(2.0)

    def ode_bpd_from_draws(self, log_p, u, latent_kl):
        """The official combination of K dequantization draws into bpd per image (`_eval_bpd_ode`,
        notebook_utils.py:505-523).

        Args:
            log_p: float32 [K, N], log p_ODE(z_0 | latent) of draw k of image n, in nats.
            u: float32 [K, N, H, W, C], the truncated-normal noise of each draw (z_0 = f + exp(gamma_0 / 2) u).
            latent_kl: float32 [N], the latent's KL in nats.

        K = 1 (`num_is` = 1): bpd = (-log p + latent KL) / (D ln 2) + `ode_bpd_offset`, the
        dequantization's log q replaced by its expectation. K > 1: the importance-weighted bound

            log p(x) >= log (1/K) sum_k p_ODE(z_0^k) / q(u^k),   q(u) = prod_i N(u_i; 0, 1) / Z,

        Z = `TN_MASS` (the official `log_q_eps`), with bpd = (-that + latent KL) / (D ln 2) - log
        sigma_0 / ln 2, the Jacobian of z_0 = f + sigma_0 u (the official offset without its entropy
        term). By Jensen's inequality it is at most the mean of the K single-draw bounds
        (-log p_k + log q(u^k) + latent KL) / (D ln 2) - log sigma_0 / ln 2, and its expectation
        does not increase with K (Burda et al. 2016, importance-weighted bounds).
        """
        to_bpd = 1.0 / (self.num_dims * math.log(2.0))
        if log_p.shape[0] == 1:
            return (-log_p[0] + latent_kl) * to_bpd + self.ode_bpd_offset
        num_draws = tf.cast(tf.shape(log_p)[0], tf.float32)
        log_q = tf.reduce_sum(-0.5 * tf.square(u), axis=[2, 3, 4]) - self.num_dims * (
            0.5 * math.log(2.0 * math.pi) + math.log(TN_MASS)
        )
        log_p_x = tf.reduce_logsumexp(log_p - log_q, axis=0) - tf.math.log(num_draws)
        return (-log_p_x + latent_kl) * to_bpd - self._log_sigma_0 / math.log(2.0)

    def ode_bpd(self, x, seed=0, rtol=1e-5, atol=1e-5, probe="rademacher", exact_divergence=False, num_importance=1):
        """The official exact likelihood of uint8 images in bits per dimension (eval_bpd.py's ODE
        evaluation, `get_ode_likelihood_fn(dequantization='tn')`, notebook_utils.py:264-371, and
        `_eval_bpd_ode`, notebook_utils.py:484-531, with its `num_is` = `num_importance`).
        `vdm_tf.likelihood.ode_bpd` needs a model with one SDE per example; MuLAN's flow is per
        pixel and given the latent: this method is MuLAN's.

        Per image and draw: f = 2 (x + 0.5) / 256 - 1; the ODE starts at z_0 = f + exp(gamma_0 / 2)
        u, u ~ N(0, 1) truncated to [-3, 3] (official: `data + u * exp(0.5 gt)`, gt = -13.3, the
        model's fixed start gamma_0 here); the latent is the noise-free top k of the encoder's
        logits of x (`logits_to_embeddings`; the official rounds z_0 back to x, the noise being
        under half a pixel); log p = log N(z_1; 0, I) + integral_0^1 div(flow) dt
        (`probability_flow`). The K = `num_importance` draws (each its own u and probe) are
        combined by `ode_bpd_from_draws`: K = 1 is the single-draw estimate with the official
        offset, K > 1 the importance-weighted bound over K dequantizations (the official command's
        default is `--n_is=20`). The latent KL is `categorical_kl` of the logits, as in `elbo` (the
        official code's, which is not the KL of the k-hot latent used here). The official code
        averages the bpd over the batch.

        The official Hutchinson estimate draws a new probe at every evaluation of the ODE function
        (its flag deterministic_noise=False); vdm_tf keeps one probe per solve, as
        `vdm_tf.likelihood` does (unbiased either way; the solver then sees a smooth function). The
        official solver is scipy's RK45 and solves the K draws one after another; vdm_tf's is
        `vdm_tf.likelihood.integrate`, same tolerances, all K N solves in one batch. The solve is
        `ode_log_likelihood`'s traced function (one per options, shared by both).

        Args:
            x: uint8 images [N, H, W, C].
            seed: seeds the dequantization noise and the probes.
            rtol, atol, probe, exact_divergence: as `ode_log_likelihood`'s.
            num_importance: K >= 1, dequantization draws per image.

        Returns: dict, `bpd` float32 [N] and `nfe`, the number of ODE evaluations.
        """
        samplers.check_choice("probe", probe, likelihood.PROBES)
        if isinstance(num_importance, bool) or not isinstance(num_importance, numbers.Integral) or num_importance < 1:
            raise ValueError(f"num_importance must be an integer >= 1; got {num_importance!r}.")
        x = images.check_images(x, self.image_shape)
        num_importance = int(num_importance)
        noise_seed, probe_seed = seeding.split_seed(seed, 2)
        f = images.encode(x)
        # Draw k of image n is row k N + n: with K = 1 the noise and probe of a single solve of x.
        shape = tf.concat([[num_importance * tf.shape(f)[0]], self.image_shape], axis=0)
        u = tf.random.stateless_parameterized_truncated_normal(shape, noise_seed, 0.0, 1.0, -TN_BOUND, TN_BOUND)
        z_0 = tf.tile(f, [num_importance, 1, 1, 1]) + tf.exp(0.5 * self.schedule.gamma_0) * u
        logits = self.encoder(f, training=False)
        latent = tf.tile(k_hot(logits, self.latent_k), [num_importance, 1])
        out = self.ode_log_likelihood(z_0, latent, probe_seed, exact_divergence, probe, rtol, atol)
        draws = tf.concat([[num_importance, -1], self.image_shape], axis=0)
        log_p = tf.reshape(out["log_likelihood"], [num_importance, -1])
        bpd = self.ode_bpd_from_draws(log_p, tf.reshape(u, draws), categorical_kl(logits))
        return {"bpd": bpd, "nfe": out["nfe"]}

    # ----------------------------------------------------------------------------------------
    # Serialisation.

    def get_config(self):
        config = super().get_config()
        config.update(serialized(encoder=self.encoder))
        config.update(latent_k=self.latent_k, parameterization=self.parameterization, pixel_values=self.pixel_values)
        return config

    @classmethod
    def from_config(cls, config):
        return super().from_config(deserialized(config, "encoder"))
