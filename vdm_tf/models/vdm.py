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

Training the i-DODE way (Zheng et al. 2023, "Improved Techniques for Maximum Likelihood
Estimation for Diffusion ODEs"; github thu-ml/i-DODE `model_vdm.py`), options of the same model:

- `parameterization="velocity"`: the network predicts the velocity v of the schedule's path
  (`NoiseSchedule.velocity_coefficients`); `_denoise` converts it to eps_hat, the one place where
  the network's output is read, so the loss, `score`, the samplers, the likelihoods and the
  export see eps_hat. The loss stays 0.5 gamma' ||eps - eps_hat||^2: i-DODE's likelihood
  weighting of the velocity error is that (its weight 0.5 gamma' alpha^2 on ||v - v_hat||^2,
  model_vdm.py:212, times eps - eps_hat = alpha (v - v_hat)).
- `time_sampling="importance"`: the antithetic u_i become gammas with density alpha_path^2 / Z
  (`NoiseSchedule.importance_sample`), the loss weight 0.5 / p(gamma): the same VLB, lower variance.
- `flow_matching_weight` = lambda > 0: i-DODE's error-bounded second-order flow matching
  (model_vdm.py:188-206, 223-236), `w lambda / D (sigma tr(d eps_hat / dz) - D + ||eps - eps_hat||^2)^2`
  with the diffusion loss's weight w, the trace by Hutchinson's estimator with a Rademacher probe
  and the squared error under stop_gradient; added to the training loss, reported as
  `flow_matching`, not part of the bound.

The shared machinery (training step, traced entry points, ancestral sampling, the sampler
protocol) is `vdm_tf.models.base.DiffusionModel`'s; this file is the VLB.
"""

import math

import keras
import tensorflow as tf

from vdm_tf import images, seeding
from vdm_tf.augmentation import Augmentation
from vdm_tf.models.base import DiffusionModel
from vdm_tf.schedules import NoiseSchedule

PARAMETERIZATIONS = ("eps", "velocity")
TIME_SAMPLINGS = ("antithetic", "importance")
PROBE_STREAM = 11  # folded into the diffusion noise's seed for the flow-matching term's Hutchinson probes


def hutchinson_trace(function, z, probe):
    """function(z) and probe^T (d function / dz) probe per example: Hutchinson's estimate of the
    Jacobian's trace, unbiased for a probe of zero mean and identity covariance (Rademacher: exact
    for a diagonal Jacobian). Differentiable (a second tape differentiates through it)."""
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = function(z)
    probe_jacobian = tape.gradient(value, z, output_gradients=probe)  # probe^T J, one backward pass
    return value, tf.reduce_sum(probe_jacobian * probe, axis=list(range(1, len(z.shape))))


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
        parameterization: what the denoiser predicts: `"eps"` (the noise) or `"velocity"` (the
            velocity of the schedule's path, i-DODE; eps_hat derived in `_denoise`).
        time_sampling: `"antithetic"` (times t_i, weight 0.5 gamma'(t)) or `"importance"`
            (continuous time: gamma_i from the antithetic u_i by the schedule's inverse CDF,
            weight 0.5 / p(gamma); the schedule's shape must not be learned).
        flow_matching_weight: lambda >= 0 of the second-order flow-matching term (continuous
            time; 0: off). i-DODE fine-tunes with 0.1.
        **kwargs: forwarded to `keras.Model`.

    Training uses the mean bpd over the global batch as its loss, and reports `bpd`,
    `diffusion`, `prior` and `reconstruction` (all in bits per dimension) as metrics (with
    flow matching on, also `flow_matching` and the loss, `loss` = bpd + flow_matching). For an
    exponential moving average of the weights, compile with an optimizer built with
    `use_ema=True`: Keras writes the averaged weights into the model at the end of `fit`, so
    `elbo` and `sample` use them afterwards (`keras.callbacks.SwapEMAWeights` evaluates with
    them during training).

    Example:
    >>> model = vdm_tf.VDM(vdm_tf.networks.ScoreUNet(n_layers=4, n_embd=64),
    ...                    vdm_tf.schedules.LearnedLinear(), image_shape=(8, 8, 1))
    >>> model.compile(optimizer=vdm_tf.optimizers.AdamW(2e-4, use_ema=True, ema_momentum=0.999))
    >>> model.fit(vdm_tf.datasets.load("digits", "train", batch_size=64), steps_per_epoch=100)
    >>> terms = model.elbo(test_images, seed=0)   # {"bpd": [N], "diffusion": [N], ...}
    >>> samples = model.sample(16, num_steps=256, seed=0)   # uint8 [16, 8, 8, 1]

    i-DODE's training (velocity, importance-sampled gammas, its VP schedule):
    >>> model = vdm_tf.VDM(denoiser, vdm_tf.schedules.VariancePreserving(), image_shape=(8, 8, 1),
    ...                    parameterization="velocity", time_sampling="importance")

    Reference: Kingma et al. 2021, "Variational Diffusion Models", arXiv:2107.00630;
    google-research/vdm. Zheng et al. 2023, "Improved Techniques for Maximum Likelihood
    Estimation for Diffusion ODEs", arXiv:2305.03935; thu-ml/i-DODE.
    """

    TERMS = ("bpd", "diffusion", "prior", "reconstruction")
    LOSS_TERM = "bpd"

    def __init__(
        self,
        denoiser,
        schedule,
        image_shape,
        timesteps=0,
        seed=0,
        augmentation=None,
        pixel_values=None,
        parameterization="eps",
        time_sampling="antithetic",
        flow_matching_weight=0.0,
        **kwargs,
    ):
        if int(timesteps) < 0:
            raise ValueError(f"timesteps must be 0 (continuous time) or a positive step count; got {timesteps}.")
        if augmentation is not None and getattr(denoiser, "conditioning_dim", 0) != augmentation.conditioning_dim:
            raise ValueError(
                f"Training with augmentation conditions the denoiser on it: build the denoiser with "
                f"conditioning_dim={augmentation.conditioning_dim}."
            )
        self._check_idode_options(schedule, int(timesteps), parameterization, time_sampling, flow_matching_weight)
        self.parameterization = parameterization
        self.time_sampling = time_sampling
        self.flow_matching_weight = float(flow_matching_weight)
        if self.flow_matching_weight:  # the term and the loss it joins become metrics (base: one per TERMS)
            self.TERMS = type(self).TERMS + ("flow_matching", "loss")
            self.LOSS_TERM = "loss"
        super().__init__(denoiser, schedule, image_shape, seed=seed, pixel_values=pixel_values, **kwargs)
        self.timesteps = int(timesteps)
        self.augmentation = augmentation

    def _check_idode_options(self, schedule, timesteps, parameterization, time_sampling, flow_matching_weight):
        """Raises a ValueError for a combination of the i-DODE options that this model cannot train."""
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}.")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}; got {time_sampling!r}.")
        if not float(flow_matching_weight) >= 0.0:
            raise ValueError(f"flow_matching_weight must be >= 0; got {flow_matching_weight}.")
        flow_matching = float(flow_matching_weight) > 0.0
        idode = parameterization != "eps" or time_sampling != "antithetic" or flow_matching
        if (idode or type(schedule).to_path is not NoiseSchedule.to_path) and (
            type(self)._diffusion_loss is not VDM._diffusion_loss or type(self).score is not DiffusionModel.score
        ):
            raise ValueError(
                f"{type(self).__name__} runs its denoiser outside VDM's loss and score: it takes "
                "parameterization='eps', time_sampling='antithetic', flow_matching_weight=0 and a "
                "variance-preserving schedule."
            )
        if parameterization != "velocity" and (time_sampling == "importance" or flow_matching):
            # i-DODE model_vdm.py:88-93: the weight Z / alpha^2 (and the flow-matching term) suit a
            # velocity error, for which eps - eps_hat = alpha (v - v_hat) is small where alpha is.
            raise ValueError("time_sampling='importance' and flow matching take parameterization='velocity'.")
        if timesteps and (time_sampling == "importance" or flow_matching):
            raise ValueError("time_sampling='importance' and flow matching are continuous-time: set timesteps=0.")
        if time_sampling == "importance" and schedule.learns_shape:
            raise ValueError(
                "time_sampling='importance' draws gamma directly, so a learned schedule shape would not "
                "train: use a schedule with a fixed shape (VariancePreserving, StraightPath, FixedLinear, "
                "LearnedLinear)."
            )
        if flow_matching and schedule.trainable_variables:
            raise ValueError(
                "flow matching regularises the network of a fixed schedule (i-DODE's): use a schedule "
                "without trainable weights (VariancePreserving, StraightPath, FixedLinear)."
            )

    # ----------------------------------------------------------------------------------------
    # The network's output as eps_hat.

    def _denoise(self, z_t, gamma_t, training=False, **conditioning):
        """eps_hat(z_t, gamma_t) in float32, whatever the network predicts and on whatever path.

        The network gets the schedule's path latent (`to_path`: z_t itself for a
        variance-preserving schedule, z_t / (alpha + sigma) for `StraightPath`) and gamma_t; its
        output is eps_hat, or with the velocity parameterisation v_hat, converted by
        eps_hat = a v_hat + b z_path (`velocity_coefficients`; i-DODE model_vdm.py:267-277).
        """
        z_path = self.schedule.to_path(z_t, gamma_t)
        output = super()._denoise(z_path, gamma_t, training, **conditioning)
        if self.parameterization == "eps":
            return output
        a, b = self.schedule.velocity_coefficients(gamma_t)
        return images.per_example(a, 4) * output + images.per_example(b, 4) * z_path

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

        gamma'_t is None in discrete time and with importance-sampled gammas.
        """
        (loss, _), gammas = self._diffusion_terms(f, seed, training, example_index, num_examples, conditioning)
        return loss, gammas

    def _diffusion_terms(self, f, seed, training, example_index, num_examples, conditioning=None, flow_matching=False):
        """((diffusion loss, flow-matching term or None) in nats per example, (gamma_t, gamma'_t)).

        Draws the noise levels and the noise of each example, and a Rademacher probe with flow
        matching, for `_weighted_errors`. The weight w of the squared error is 0.5 gamma'(t) (VDM
        eq. 17), 0.5 T expm1(gamma_t - gamma_s) in discrete time (eq. 16), or 0.5 / p(gamma) for
        gammas drawn with density p (`time_sampling="importance"`): i-DODE's weights 0.5 Z on
        ||v - v_hat||^2 (model_vdm.py:212) and Z on the straight path (:215) are this w times
        a^2, where eps - eps_hat = a (v - v_hat).
        """
        t_seed, eps_seed = seeding.split_seed(seed, 2)
        t = self._time_samples(example_index, num_examples, t_seed)
        inverse_density = None
        if self.time_sampling == "importance":
            gamma_t, inverse_density = self.schedule.importance_sample(t)
            dgamma_t = None
        elif self.timesteps:
            gamma_t, dgamma_t = self.schedule(t), None
        else:
            gamma_t, dgamma_t = self.schedule.gamma_and_derivative(t)
        eps = seeding.per_example_normal(eps_seed, example_index, self.image_shape)
        if inverse_density is not None:
            weight = 0.5 * inverse_density  # E_p[h / p] = integral h d gamma
        elif self.timesteps:
            gamma_s = self.schedule(t - 1.0 / self.timesteps)
            weight = 0.5 * self.timesteps * tf.math.expm1(gamma_t - gamma_s)  # VDM eq. (16)
        else:
            weight = 0.5 * dgamma_t  # VDM eq. (17)
        probe = None
        if flow_matching:
            probe_seed = seeding.fold_in(eps_seed, PROBE_STREAM)
            probe = tf.where(seeding.per_example_normal(probe_seed, example_index, self.image_shape) < 0.0, -1.0, 1.0)
        condition = {} if conditioning is None else {"conditioning": conditioning}
        return self._weighted_errors(f, eps, gamma_t, weight, training, condition, probe), (gamma_t, dgamma_t)

    def _weighted_errors(self, f, eps, gamma_t, weight, training, condition, probe=None):
        """(w ||eps - eps_hat(z_t)||^2, flow-matching term or None) per example, z_t = alpha f + sigma eps.

        The flow-matching term (i-DODE model_vdm.py:188-206, 223-236) with the same w:
        w lambda / D r^2, r = sigma tr(d eps_hat / d z_t) - (D - ||eps - eps_hat||^2), the squared
        error under stop_gradient and sigma = sqrt(sigmoid(gamma_t)); the trace is Hutchinson's
        estimate with `probe` (`hutchinson_trace`), from the same network call as eps_hat. For
        the MSE-optimal denoiser E[r | z_t] = 0 (sigma d eps* / dz = I - Cov[eps | z]). r is a times
        i-DODE's residual in the velocity's units (VP: sigma tr(dv/dz) - alpha (D - ||v - v_hat||^2);
        SP: sigma tr(dv/dz) - D / sqrt 2 + sqrt 2 alpha ||v - v_hat||^2), so w r^2 is its weight
        times its r^2 on either path.
        """
        gamma = images.per_example(gamma_t, 4)
        z_t = tf.sqrt(tf.sigmoid(-gamma)) * f + tf.sqrt(tf.sigmoid(gamma)) * eps

        def denoise(z):
            return self._denoise(z, gamma_t, training, **condition)

        if probe is None:
            eps_hat = denoise(z_t)
        else:
            eps_hat, trace = hutchinson_trace(denoise, z_t, probe)
        squared_error = tf.reduce_sum(tf.square(eps - eps_hat), axis=[1, 2, 3])
        if probe is None:
            return weight * squared_error, None
        residual = tf.sqrt(tf.sigmoid(gamma_t)) * trace - (self.num_dims - tf.stop_gradient(squared_error))
        return weight * squared_error, weight * (self.flow_matching_weight / self.num_dims) * tf.square(residual)

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
        return self._terms(x, seed, training, example_index, num_examples, self.flow_matching_weight > 0.0)

    def _bpd_terms(self, x, seed):
        """The bound's terms, which `elbo` averages: without the flow-matching term (not part of it)."""
        return self._terms(x, seed, False, flow_matching=False)[0]

    def _terms(self, x, seed, training, example_index=None, num_examples=None, flow_matching=False):
        """`_loss_terms`, with the flow-matching term and the loss it joins or without."""
        x = images.check_images(x, self.image_shape)
        if example_index is None:
            example_index = tf.range(tf.shape(x)[0])
            num_examples = tf.shape(x)[0]
        diffusion_seed, reconstruction_seed, augmentation_seed = seeding.split_seed(seed, 3)
        conditioning = None
        if training and self.augmentation is not None:
            x, conditioning = self.augmentation(x, augmentation_seed, example_index)
        f = images.encode(x)
        randomness = (f, diffusion_seed, training, example_index, num_examples, conditioning)
        if flow_matching:
            (diffusion, flow), gammas = self._diffusion_terms(*randomness, flow_matching=True)
        else:  # through `_diffusion_loss`, which a subclass may define
            (diffusion, gammas), flow = self._diffusion_loss(*randomness), None
        nats = {
            "diffusion": diffusion,
            "prior": self._prior_loss(f),
            "reconstruction": self._reconstruction_loss(x, f, reconstruction_seed, example_index),
        }
        nats["bpd"] = nats["diffusion"] + nats["prior"] + nats["reconstruction"]
        if flow is not None:
            nats["flow_matching"] = flow
            nats["loss"] = nats["bpd"] + flow
        to_bpd = 1.0 / (self.num_dims * math.log(2.0))
        return {name: nats[name] * to_bpd for name in self.TERMS if name in nats}, gammas

    # ----------------------------------------------------------------------------------------
    # Training.

    def compute_gradients(self, x, seed, example_index=None, num_examples=None):
        """Gradients of the global-batch mean bpd (+ flow_matching: `LOSS_TERM`), the variance
        objective for the schedule shape.

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
            loss = tf.reduce_mean(terms[self.LOSS_TERM]) / tf.distribute.get_strategy().num_replicas_in_sync
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
            parameterization=self.parameterization,
            time_sampling=self.time_sampling,
            flow_matching_weight=self.flow_matching_weight,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("augmentation") is not None:
            config["augmentation"] = Augmentation.from_config(config["augmentation"])
        return super().from_config(config)
