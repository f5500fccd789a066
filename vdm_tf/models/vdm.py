"""The Variational Diffusion Model as a `keras.Model`.

Kingma, Salimans, Poole, Ho (2021), "Variational Diffusion Models". A VDM pairs a noise
schedule gamma(t) (`vdm_tf.schedules`) with a denoiser `eps_hat = denoiser(z_t, gamma_t)`
(`vdm_tf.networks`, or any layer with that call signature). Its negative ELBO, per example and
in nats, is the sum of three terms (VDM eq. 11):

- reconstruction `-E_q[log p(x | z_0)]`, the discretized decoder of `vdm_tf.images`;
- prior `KL(q(z_1 | x) || N(0, I))`;
- diffusion: continuous time (eq. 17) `0.5 E_t[gamma'(t) ||eps - eps_hat(z_t; t)||^2]`,
  discrete time with T steps (eq. 15-16) `0.5 T E_i[expm1(gamma(t_i) - gamma(s_i)) ||eps - eps_hat||^2]`,
  with `z_t = alpha_t f + sigma_t eps`.

They are reported in bits per dimension: nats / (D ln 2), D = H * W * C. Time samples are
antithetic over the batch, `t_i = (u + i / N) mod 1` (low-discrepancy sampler, VDM appendix I.1).

The shared machinery (training step, traced entry points, ancestral sampling, the sampler
protocol) is `vdm_tf.models.base.DiffusionModel`'s; this file is the VLB.
"""

import math

import keras
import tensorflow as tf

from vdm_tf import images, seeding
from vdm_tf.augmentation import Augmentation
from vdm_tf.models.base import DiffusionModel


@keras.saving.register_keras_serializable(package="vdm_tf")
class VDM(DiffusionModel):
    """Variational Diffusion Model: negative ELBO in bpd, training, ancestral sampling.

    Args:
        denoiser: a Keras layer `eps_hat = denoiser(z_t, gamma_t, training=...)`, z_t float32
            [N, H, W, C], gamma_t float32 [N], output of z_t's shape. It may compute in lower
            precision (e.g. a `ScoreUNet(..., dtype="mixed_bfloat16")`): the model passes it
            float32 inputs and casts its output to float32, and keeps everything else, to
            which the likelihood is sensitive, in float32 (schedule, z_t, losses, decoder).
        schedule: a `vdm_tf.schedules.NoiseSchedule`.
        image_shape: (H, W, C) of the uint8 images.
        timesteps: 0 for the continuous-time VLB, T > 0 for the discrete-time one with T steps.
        seed: base seed of the training randomness (time and noise samples per step and replica).
        augmentation: optional `vdm_tf.augmentation.Augmentation` applied in training only, with
            the denoiser conditioned on it (its `conditioning_dim` must match); the ELBO and the
            samples are those of the un-augmented data.
        pixel_values: the data's alphabet, when its pixels take fewer than 256 values (e.g. the
            17 of the embedded digits): the decoder p(x | z_0) puts its mass on them, with a
            floor for the others (`vdm_tf.images.decoder_logits`). None: all 256 values.
        **kwargs: forwarded to `keras.Model`.

    Training uses the mean bpd over the global batch as its loss, and reports `bpd`,
    `diffusion`, `prior` and `reconstruction` (all in bits per dimension) as metrics. For an
    exponential moving average of the weights, compile with an optimizer built with
    `use_ema=True`: Keras writes the averaged weights into the model at the end of `fit`, so
    `elbo` and `sample` use them afterwards (`keras.callbacks.SwapEMAWeights` evaluates with
    them during training).

    Example:
    >>> model = vdm_tf.VDM(vdm_tf.networks.ScoreUNet(n_layers=4, n_embd=64),
    ...                    vdm_tf.schedules.LearnedLinear(), image_shape=(8, 8, 1))
    >>> model.compile(optimizer=keras.optimizers.AdamW(2e-4, use_ema=True, ema_momentum=0.999))
    >>> model.fit(vdm_tf.datasets.load("digits", "train", batch_size=64), steps_per_epoch=100)
    >>> terms = model.elbo(test_images, seed=0)   # {"bpd": [N], "diffusion": [N], ...}
    >>> samples = model.sample(16, num_steps=256, seed=0)   # uint8 [16, 8, 8, 1]

    Reference: Kingma et al. 2021, "Variational Diffusion Models", arXiv:2107.00630;
    google-research/vdm.
    """

    TERMS = ("bpd", "diffusion", "prior", "reconstruction")
    LOSS_TERM = "bpd"

    def __init__(
        self, denoiser, schedule, image_shape, timesteps=0, seed=0, augmentation=None, pixel_values=None, **kwargs
    ):
        if int(timesteps) < 0:
            raise ValueError(f"timesteps must be 0 (continuous time) or a positive step count; got {timesteps}.")
        if augmentation is not None and getattr(denoiser, "conditioning_dim", 0) != augmentation.conditioning_dim:
            raise ValueError(
                f"Training with augmentation conditions the denoiser on it: build the denoiser with "
                f"conditioning_dim={augmentation.conditioning_dim}."
            )
        super().__init__(denoiser, schedule, image_shape, seed=seed, pixel_values=pixel_values, **kwargs)
        self.timesteps = int(timesteps)
        self.augmentation = augmentation

    # ----------------------------------------------------------------------------------------
    # The negative ELBO.

    def _time_samples(self, example_index, num_examples, seed):
        """Antithetic times over the global batch; in discrete time moved to the grid {1/T, ..., 1}."""
        t = super()._time_samples(example_index, num_examples, seed)
        if self.timesteps:
            t = (tf.floor(t * self.timesteps) + 1.0) / self.timesteps
        return t

    def _diffusion_loss(self, f, seed, training, example_index, num_examples, conditioning=None):
        """Per-example diffusion loss in nats, and the (gamma_t, gamma'_t) it used.

        gamma'_t is None in discrete time.
        """
        t_seed, eps_seed = seeding.split_seed(seed, 2)
        t = self._time_samples(example_index, num_examples, t_seed)
        if self.timesteps:
            gamma_t, dgamma_t = self.schedule(t), None
        else:
            gamma_t, dgamma_t = self.schedule.gamma_and_derivative(t)
        eps = seeding.per_example_normal(eps_seed, example_index, self.image_shape)
        gamma = images.per_example(gamma_t, 4)
        z_t = tf.sqrt(tf.sigmoid(-gamma)) * f + tf.sqrt(tf.sigmoid(gamma)) * eps
        condition = {} if conditioning is None else {"conditioning": conditioning}
        eps_hat = self._denoise(z_t, gamma_t, training, **condition)
        squared_error = tf.reduce_sum(tf.square(eps - eps_hat), axis=[1, 2, 3])
        if self.timesteps:
            gamma_s = self.schedule(t - 1.0 / self.timesteps)
            weight = 0.5 * self.timesteps * tf.math.expm1(gamma_t - gamma_s)  # VDM eq. (16)
        else:
            weight = 0.5 * dgamma_t  # VDM eq. (17)
        return weight * squared_error, (gamma_t, dgamma_t)

    def _prior_loss(self, f):
        """KL(q(z_1 | x) || N(0, I)) in nats per example.

        Per pixel 0.5 (alpha_1^2 f^2 + e) with e = sigma_1^2 - log sigma_1^2 - 1
        = -log(1 - a) - a, a = alpha_1^2. Written that way e cancels in float32 when a is small
        (gamma_1 = 5: relative error 4e-4; gamma_1 = 10: 100%), so for a < 0.1 it is summed as
        its series a^2/2 + a^3/3 + ... (truncation error below 3e-7 relative). Float32 throughout,
        so the same code runs on TPUs.
        """
        a = tf.sigmoid(-self.schedule.gamma_1)  # alpha_1^2
        series = tf.square(a) * (1 / 2 + a * (1 / 3 + a * (1 / 4 + a * (1 / 5 + a * (1 / 6 + a / 7)))))
        excess = tf.where(a < 0.1, series, -tf.math.log1p(-a) - a)
        kl = 0.5 * (a * tf.square(f) + excess)
        return tf.reduce_sum(kl, axis=[1, 2, 3])

    def _reconstruction_loss(self, x, f, seed, example_index):
        """-log p(x | z_0) in nats per example, one sample z_0 ~ q(z_0 | x)."""
        gamma_0 = self.schedule.gamma_0
        eps_0 = seeding.per_example_normal(seed, example_index, self.image_shape)
        z_0 = tf.sqrt(tf.sigmoid(-gamma_0)) * f + tf.sqrt(tf.sigmoid(gamma_0)) * eps_0
        return images.reconstruction_nll(x, z_0, gamma_0, self.pixel_values)

    def _loss_terms(self, x, seed, training, example_index=None, num_examples=None):
        """Per-example bpd terms (dict over TERMS) and the diffusion loss's (gamma_t, gamma'_t).

        Every random draw of example i depends only on `seed` and its global index
        `example_index[i]` among the `num_examples` of the global batch (defaults: this batch
        alone), so a batch split over replicas draws what it would draw on one device.
        """
        x = images.check_images(x, self.image_shape)
        if example_index is None:
            example_index = tf.range(tf.shape(x)[0])
            num_examples = tf.shape(x)[0]
        diffusion_seed, reconstruction_seed, augmentation_seed = seeding.split_seed(seed, 3)
        conditioning = None
        if training and self.augmentation is not None:
            x, conditioning = self.augmentation(x, augmentation_seed, example_index)
        f = images.encode(x)
        diffusion, gammas = self._diffusion_loss(f, diffusion_seed, training, example_index, num_examples, conditioning)
        nats = {
            "diffusion": diffusion,
            "prior": self._prior_loss(f),
            "reconstruction": self._reconstruction_loss(x, f, reconstruction_seed, example_index),
        }
        nats["bpd"] = nats["diffusion"] + nats["prior"] + nats["reconstruction"]
        to_bpd = 1.0 / (self.num_dims * math.log(2.0))
        return {name: nats[name] * to_bpd for name in self.TERMS}, gammas

    # ----------------------------------------------------------------------------------------
    # Training.

    def compute_gradients(self, x, seed, example_index=None, num_examples=None):
        """Gradients of the global-batch mean bpd, the variance objective for the schedule shape.

        Returns (gradients aligned with `self.trainable_variables`, per-example bpd terms).
        `example_index` / `num_examples`: see `_loss_terms`.

        The loss on each replica is its mean bpd divided by the replica count, so the optimizer's
        sum over replicas is the gradient of the global-batch mean under any tf.distribute
        strategy. In continuous time, the schedule's `variance_variables` (the shape of a
        `LearnedMonotonic`) receive instead the gradient of the mean squared diffusion loss
        (VDM appendix I.2): d/d eta E[L^2] = E[2 L dL/d eta]. Only the diffusion loss of
        example i depends on gamma_t[i] and gamma'_t[i], so one backward pass through the
        denoiser gives dL_i/d gamma_t[i]; scaling it by 2 L_i and back-propagating through the
        (small) schedule network gives the variance gradient without a second denoiser pass.
        """
        variance_variables = self.schedule.variance_variables if not self.timesteps else []
        variance_ids = {id(v) for v in variance_variables}
        vlb_variables = [v for v in self.trainable_variables if id(v) not in variance_ids]
        with tf.GradientTape(persistent=bool(variance_variables)) as tape:
            terms, (gamma_t, dgamma_t) = self._loss_terms(x, seed, True, example_index, num_examples)
            loss = tf.reduce_mean(terms["bpd"]) / tf.distribute.get_strategy().num_replicas_in_sync
        if not variance_variables:
            return tape.gradient(loss, self.trainable_variables), terms
        *vlb_grads, grad_gamma_t, grad_dgamma_t = tape.gradient(loss, vlb_variables + [gamma_t, dgamma_t])
        scale = 2.0 * tf.stop_gradient(terms["diffusion"])
        variance_grads = tape.gradient(
            [gamma_t, dgamma_t], variance_variables, output_gradients=[scale * grad_gamma_t, scale * grad_dgamma_t]
        )
        del tape
        by_id = dict(zip(map(id, vlb_variables), vlb_grads)) | dict(zip(map(id, variance_variables), variance_grads))
        return [by_id[id(v)] for v in self.trainable_variables], terms

    # ----------------------------------------------------------------------------------------
    # Serialisation.

    def get_config(self):
        config = super().get_config()
        config.update(
            timesteps=self.timesteps,
            augmentation=None if self.augmentation is None else self.augmentation.get_config(),
            pixel_values=self.pixel_values,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("augmentation") is not None:
            config["augmentation"] = Augmentation.from_config(config["augmentation"])
        return super().from_config(config)
