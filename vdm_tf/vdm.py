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
"""

import math
import operator

import keras
import tensorflow as tf

from vdm_tf import images, seeding
from vdm_tf.augmentation import Augmentation
from vdm_tf.sde import ScheduleSDE

TERMS = ("bpd", "diffusion", "prior", "reconstruction")
DROPOUT_STREAM = 7  # folded into a step's seed for its dropout masks (`VDM._seed_dropout`)


def check_count(name, value, minimum=0):
    """A count argument (`num_samples`, `num_steps`) as a Python int >= `minimum`.

    Takes what `operator.index` takes (Python and NumPy integers, integer scalar tensors); not
    bools, floats or strings, so 2.5 images are an error rather than 2.

    Raises:
        ValueError: for anything else, naming the expected form ("expected an integer
            num_samples >= 0; got 2.5.").
    """
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        raise ValueError(f"expected an integer {name} >= {minimum}; got {value!r}.")
    return count


def ancestral_update(z_t, eps_hat, gamma_s, gamma_t, noise):
    """z_s = mean + std * noise, a draw of q(z_s | z_t, x = x_hat(z_t)) for gamma_s <= gamma_t.

    VDM eq. 32-34. With c = -expm1(gamma_s - gamma_t) = 1 - SNR(t) / SNR(s):
    mean = alpha_s / alpha_t (z_t - sigma_t c eps_hat), variance = sigma_s^2 c.
    """
    c = -tf.math.expm1(gamma_s - gamma_t)
    mean = tf.sqrt(tf.sigmoid(-gamma_s) / tf.sigmoid(-gamma_t)) * (z_t - tf.sqrt(tf.sigmoid(gamma_t)) * c * eps_hat)
    return mean + tf.sqrt(tf.sigmoid(gamma_s) * c) * noise


@keras.saving.register_keras_serializable(package="vdm_tf")
class VDM(keras.Model):
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

    def __init__(
        self, denoiser, schedule, image_shape, timesteps=0, seed=0, augmentation=None, pixel_values=None, **kwargs
    ):
        super().__init__(**kwargs)
        if int(timesteps) < 0:
            raise ValueError(f"timesteps must be 0 (continuous time) or a positive step count; got {timesteps}.")
        self.denoiser = denoiser
        self.schedule = schedule
        self.image_shape = tuple(int(d) for d in image_shape)
        self.timesteps = int(timesteps)
        self.seed = int(seed)
        if augmentation is not None and getattr(denoiser, "conditioning_dim", 0) != augmentation.conditioning_dim:
            raise ValueError(
                f"Training with augmentation conditions the denoiser on it: build the denoiser with "
                f"conditioning_dim={augmentation.conditioning_dim}."
            )
        self.augmentation = augmentation
        values = None if pixel_values is None else sorted({int(v) for v in pixel_values})
        if values is not None and not (values and values[0] >= 0 and values[-1] <= 255):
            raise ValueError(f"pixel_values must be values in 0..255; got {pixel_values}.")
        self.pixel_values = None if values is None else tuple(values)
        self.num_dims = math.prod(self.image_shape)
        self.term_trackers = {name: keras.metrics.Mean(name=name) for name in TERMS}
        self.build()
        self._make_graphs()

    def build(self, input_shape=None):
        """Creates the denoiser's weights by calling it once on zeros."""
        if not self.denoiser.built:
            self.denoiser(tf.zeros((1,) + self.image_shape), tf.zeros((1,)), training=False)
        self.built = True

    # ----------------------------------------------------------------------------------------
    # The negative ELBO.

    def _time_samples(self, example_index, num_examples, seed):
        """Antithetic times t_i = (u + i / N) mod 1 over the global batch (i: global index).

        In discrete time, t is moved to the grid {1/T, ..., 1}.
        """
        u = tf.random.stateless_uniform([], seed)
        t = tf.math.floormod(u + tf.cast(example_index, tf.float32) / tf.cast(num_examples, tf.float32), 1.0)
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

    def _denoise(self, z_t, gamma_t, training=False, **conditioning):
        """The denoiser's eps_hat(z_t, gamma_t) in float32, whatever its dtype policy."""
        return tf.cast(self.denoiser(z_t, gamma_t, training=training, **conditioning), tf.float32)

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
        return {name: nats[name] * to_bpd for name in TERMS}, gammas

    def elbo(self, x, seed=0, num_time_samples=1):
        """Negative ELBO of uint8 images, per example, in bits per dimension.

        Each image's estimate is the mean of `num_time_samples` = K estimates. The batch is
        tiled K times and the times are antithetic over the K N copies, so image n is scored at
        t = (u + n / (K N) + k / K) mod 1 for k = 0..K-1: one time in each K-th of [0, 1]. Each
        copy also draws its own noise and z_0. The denoiser runs in inference mode (no dropout).

        Args:
            x: uint8 images [N, H, W, C] (tensor or array).
            seed: int or shape-[2] seed; the same seed gives the same numbers.
            num_time_samples: K >= 1; memory grows like K N.

        Returns:
            dict with float32 [N] tensors `bpd` (the total), `diffusion`, `prior`, `reconstruction`.
        """
        x = images.check_images(x, self.image_shape)
        if x.shape[0] == 0:
            raise ValueError(
                f"images must be uint8 with shape [N, {', '.join(map(str, self.image_shape))}] and N >= 1; "
                "got an empty batch."
            )
        if int(num_time_samples) < 1:
            raise ValueError(f"num_time_samples must be >= 1; got {num_time_samples}.")
        return self.elbo_graph(x, seeding.as_seed(seed), tf.constant(num_time_samples, tf.int32))

    def _elbo(self, x, seed, num_time_samples):
        num_images = tf.shape(x)[0]
        copies = tf.tile(x, [num_time_samples, 1, 1, 1])  # copy k of image n at index k N + n
        terms = self._loss_terms(copies, seed, training=False)[0]
        per_copy = {name: tf.reshape(value, [num_time_samples, num_images]) for name, value in terms.items()}
        return {name: tf.reduce_mean(value, axis=0) for name, value in per_copy.items()}

    def _make_graphs(self):
        """The traced functions behind `elbo` and `sample`, which other graphs embed (export).

        `elbo_graph(x, seed, num_time_samples)` and `sample_graph(num_samples, num_steps, seed,
        argmax)` take tensors: uint8 [N, H, W, C], int64 [2] seeds, int32 and bool scalars.
        Fixed input signatures (batch size unknown) make every call run one and the same graph,
        so the numbers do not depend on the batch size of the first call (TensorFlow picks
        different kernels for static and dynamic shapes, which changes the last bits).
        """
        images_spec = tf.TensorSpec((None,) + self.image_shape, tf.uint8)
        seed_spec = tf.TensorSpec([2], tf.int64)
        scalar_spec = tf.TensorSpec([], tf.int32)
        self.elbo_graph = tf.function(self._elbo, input_signature=[images_spec, seed_spec, scalar_spec])
        self.sample_graph = tf.function(
            self._sample, input_signature=[scalar_spec, scalar_spec, seed_spec, tf.TensorSpec([], tf.bool)]
        )

    def call(self, x, training=False):
        """The per-example bpd terms of `elbo` with seed 0 (so `model.predict` scores images)."""
        return self._loss_terms(x, seeding.as_seed(0), training)[0]

    # ----------------------------------------------------------------------------------------
    # Training.

    @property
    def metrics(self):
        return list(self.term_trackers.values())

    def _step_randomness(self, x):
        """The seed of this optimizer step and the global indices of this replica's examples.

        Replica r of R holds examples r * n .. (r + 1) * n - 1 of the global batch (tf.distribute
        splits a batch in order), so every replica draws its own time and noise samples, and
        the same as one device given the whole batch would draw.
        """
        context = tf.distribute.get_replica_context()
        local_size = tf.shape(x)[0]
        first = tf.cast(context.replica_id_in_sync_group, tf.int32) * local_size
        example_index = first + tf.range(local_size)
        num_examples = local_size * context.num_replicas_in_sync
        return seeding.fold_in(self.seed, self.optimizer.iterations), example_index, num_examples

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

    def _update_metrics(self, terms):
        for name, tracker in self.term_trackers.items():
            tracker.update_state(terms[name])
        return {name: tracker.result() for name, tracker in self.term_trackers.items()}

    def _seed_dropout(self, seed):
        """Restarts every Keras seed generator of the model (dropout's) from the step's seed.

        A `keras.random.SeedGenerator` keeps its state in a variable that advances with every
        training call and is not part of a `tf.train.Checkpoint` of the model, so a run resumed
        from a checkpoint would draw other dropout masks than the uninterrupted run. Setting
        generator k to `fold_in(fold_in(seed, DROPOUT_STREAM), k)` at each step makes the masks,
        like the time and noise samples, a function of (base seed, step) only.
        """
        dropout_seed = seeding.fold_in(seed, DROPOUT_STREAM)
        generators = [generator for layer in self._flatten_layers() for generator in layer._seed_generators]
        for index, generator in enumerate(generators):
            generator.state.assign(seeding.fold_in(dropout_seed, index))

    def train_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        seed, example_index, num_examples = self._step_randomness(x)
        self._seed_dropout(seed)
        grads, terms = self.compute_gradients(x, seed, example_index, num_examples)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return self._update_metrics(terms)

    def test_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        seed, example_index, num_examples = self._step_randomness(x)
        terms, _ = self._loss_terms(x, seed, False, example_index, num_examples)
        return self._update_metrics(terms)

    # ----------------------------------------------------------------------------------------
    # Sampling.

    @property
    def sde(self):
        """The schedule's variance-preserving SDE (`vdm_tf.sde.ScheduleSDE`), for `vdm_tf.samplers`."""
        return ScheduleSDE(self.schedule)

    def score(self, z, t):
        """grad_z log p_t(z) = -eps_hat(z, gamma(t)) / sigma_t, the score of the denoiser.

        Args:
            z: float32 [N, H, W, C].
            t: float32 scalar or [N], times in [0, 1].
        """
        gamma_t = self.schedule(tf.broadcast_to(tf.cast(t, tf.float32), tf.shape(z)[:1]))
        eps_hat = self._denoise(z, gamma_t)
        return -eps_hat / images.per_example(tf.sqrt(tf.sigmoid(gamma_t)), 4)

    def ancestral_step(self, z_t, s, t, seed):
        """One draw z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)) for s < t (`ancestral_update`)."""
        gamma_s, gamma_t = self.schedule(s), self.schedule(t)
        eps_hat = self._denoise(z_t, tf.fill(tf.shape(z_t)[:1], gamma_t))
        return ancestral_update(z_t, eps_hat, gamma_s, gamma_t, tf.random.stateless_normal(tf.shape(z_t), seed))

    def sample(self, num_samples, num_steps=256, seed=0, argmax=False):
        """Ancestral sampling with `num_steps` equal time steps from z_1 ~ N(0, I) to x.

        Args:
            num_samples: how many images, an integer >= 0.
            num_steps: T >= 1, the number of denoiser evaluations.
            seed: int or shape-[2] seed.
            argmax: decode z_0 to the most likely pixel values instead of sampling p(x | z_0).

        Returns:
            uint8 images [num_samples, H, W, C]; for 0 an empty batch, as NumPy gives, without
            running the network (on an empty batch TensorFlow's oneDNN convolution returns its
            input's shape, [0, 8, 8, 5] where [0, 8, 8, 32] is due, and the next op fails).

        Raises:
            ValueError: a count that is not an integer, num_samples < 0 or num_steps < 1.
        """
        num_samples = check_count("num_samples", num_samples)
        num_steps = check_count("num_steps", num_steps, minimum=1)
        seed = seeding.as_seed(seed)
        if num_samples == 0:
            return tf.zeros((0, *self.image_shape), tf.uint8)
        return self.sample_graph(
            tf.constant(num_samples, tf.int32), tf.constant(num_steps, tf.int32), seed, bool(argmax)
        )

    def _sample(self, num_samples, num_steps, seed, argmax):
        prior_seed, loop_seed, decoder_seed = seeding.split_seed(seed, 3)
        z = tf.random.stateless_normal(tf.concat([[num_samples], self.image_shape], 0), prior_seed)
        steps = tf.cast(num_steps, tf.float32)

        def step(i, z):
            t = tf.cast(i, tf.float32) / steps
            s = tf.cast(i - 1, tf.float32) / steps
            return i - 1, self.ancestral_step(z, s, t, seeding.fold_in(loop_seed, i))

        _, z_0 = tf.while_loop(lambda i, z: i > 0, step, (num_steps, z))
        gamma_0 = self.schedule.gamma_0
        return tf.cond(
            argmax,
            lambda: images.decoder_argmax(z_0, gamma_0, self.pixel_values),
            lambda: images.decoder_sample(z_0, gamma_0, decoder_seed, self.pixel_values),
        )

    # ----------------------------------------------------------------------------------------
    # Serialisation.

    def get_config(self):
        config = super().get_config()
        config.update(
            denoiser=keras.saving.serialize_keras_object(self.denoiser),
            schedule=keras.saving.serialize_keras_object(self.schedule),
            image_shape=self.image_shape,
            timesteps=self.timesteps,
            seed=self.seed,
            augmentation=None if self.augmentation is None else self.augmentation.get_config(),
            pixel_values=self.pixel_values,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["denoiser"] = keras.saving.deserialize_keras_object(config["denoiser"])
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        if config.get("augmentation") is not None:
            config["augmentation"] = Augmentation.from_config(config["augmentation"])
        return cls(**config)
