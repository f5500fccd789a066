"""`DiffusionModel`: what every diffusion model of vdm_tf shares (ARCHITECTURE.md, "The model family").

A model pairs a denoiser, a layer `eps_hat = denoiser(z_t, gamma_t, training=...)`, with a noise
schedule gamma(t) (`vdm_tf.schedules`) on uint8 images of one shape. The base class holds:

- the per-example randomness of a training step: one seed per optimizer step and the global
  index of every example, so a batch split over the replicas of a `tf.distribute` strategy draws
  what one device given the whole batch would, and a resumed run draws what the uninterrupted
  run drew (dropout masks included, `_seed_dropout`);
- `train_step` / `test_step` and the metrics: the model's per-example terms (`TERMS`, returned by
  its `_loss_terms`) are averaged into one `keras.metrics.Mean` each, and the mean of `LOSS_TERM`
  over the global batch is the loss;
- the traced functions `elbo_graph` and `sample_graph` that `elbo`, `sample` and the SavedModel
  export run, and the checks of those entry points' arguments;
- the protocol of `vdm_tf.samplers`, `vdm_tf.likelihood`, `vdm_tf.conditional` and the
  compression codec: `.image_shape`, `.sde` (by default the schedule's variance-preserving SDE)
  and `.score(z, t)` (by default -eps_hat / sigma_t), the ancestral step
  `ancestral_step(z_t, s, t, seed)` and the decoder `decode(z_0, seed, argmax)`;
- serialisation of the shared fields.

A model subclasses it and overrides what differs: `_loss_terms` (its objective), `_bpd_terms`
(what `elbo` averages), and where its process differs `sde`, `score`, `ancestral_step` and
`_sample`.
"""

import math

import keras
import tensorflow as tf

from vdm_tf import images, samplers, seeding
from vdm_tf.sde import ScheduleSDE

DROPOUT_STREAM = 7  # folded into a step's seed for its dropout masks (`DiffusionModel._seed_dropout`)


def serialized(**objects):
    """{name: its Keras config} of a layer's nested Keras objects, for its `get_config`."""
    return {name: keras.saving.serialize_keras_object(value) for name, value in objects.items()}


def deserialized(config, *names):
    """A copy of `config` with the nested Keras objects `names` rebuilt, for a `from_config`."""
    config = dict(config)
    for name in names:
        config[name] = keras.saving.deserialize_keras_object(config[name])
    return config


def antithetic_times(seed, example_index, num_examples):
    """t_i = (u + i / N) mod 1 over a global batch of N, u ~ U[0, 1) from `seed` (i: global index).

    The low-discrepancy time sampler of VDM (appendix I.1): one time in each N-th of [0, 1].
    """
    u = tf.random.stateless_uniform([], seed)
    return tf.math.floormod(u + tf.cast(example_index, tf.float32) / tf.cast(num_examples, tf.float32), 1.0)


class DiffusionModel(keras.Model):
    """The base of the diffusion models of vdm_tf: training, traced entry points, the sampler protocol.

    Not a model by itself: a subclass defines `_loss_terms` (and, when `elbo` is not the mean of
    its evaluation-mode terms, `_bpd_terms`).

    Args:
        denoiser: a Keras layer `eps_hat = denoiser(z_t, gamma_t, training=...)`, z_t float32
            [N, H, W, C], gamma_t float32 [N], output of z_t's shape.
        schedule: a `vdm_tf.schedules.NoiseSchedule`.
        image_shape: (H, W, C) of the uint8 images.
        seed: base seed of the training randomness.
        pixel_values: the data's alphabet, when its pixels take fewer than 256 values: the
            decoder p(x | z_0) puts its mass on them (`vdm_tf.images.decoder_logits`). None:
            all 256 values.
        **kwargs: forwarded to `keras.Model`.

    Subclasses set `TERMS`, the names of the per-example terms (the first is `bpd`), and
    `LOSS_TERM`, the term whose mean is the training loss.
    """

    TERMS = ("bpd",)
    LOSS_TERM = "bpd"

    def __init__(self, denoiser, schedule, image_shape, seed=0, pixel_values=None, **kwargs):
        super().__init__(**kwargs)
        self.denoiser = denoiser
        self.schedule = schedule
        self.image_shape = tuple(int(d) for d in image_shape)
        self.seed = int(seed)
        values = None if pixel_values is None else sorted({int(v) for v in pixel_values})
        if values is not None and not (values and values[0] >= 0 and values[-1] <= 255):
            raise ValueError(f"pixel_values must be values in 0..255; got {pixel_values}.")
        self.pixel_values = None if values is None else tuple(values)
        self.num_dims = math.prod(self.image_shape)
        self.term_trackers = {name: keras.metrics.Mean(name=name) for name in self.TERMS}
        self.build()
        self._make_graphs()

    def build(self, input_shape=None):
        """Creates the denoiser's weights by calling it once on zeros."""
        if not self.denoiser.built:
            self.denoiser(tf.zeros((1,) + self.image_shape), tf.zeros((1,)), training=False)
        self.built = True

    def _denoise(self, z_t, gamma_t, training=False, **conditioning):
        """The denoiser's eps_hat(z_t, gamma_t) in float32, whatever its dtype policy."""
        return tf.cast(self.denoiser(z_t, gamma_t, training=training, **conditioning), tf.float32)

    # ----------------------------------------------------------------------------------------
    # What a model defines.

    def _loss_terms(self, x, seed, training, example_index=None, num_examples=None):
        """Per-example terms of a batch of uint8 images: (dict over `TERMS` of float32 [N], extra).

        Every random draw of example i depends only on `seed` and its global index
        `example_index[i]` among the `num_examples` of the global batch (defaults: this batch
        alone). `extra` is whatever the model's `compute_gradients` needs besides the terms.
        """
        raise NotImplementedError(f"{type(self).__name__} must define _loss_terms.")

    def _bpd_terms(self, x, seed):
        """The per-example terms that `elbo` averages: by default `_loss_terms` in inference mode."""
        return self._loss_terms(x, seed, training=False)[0]

    # ----------------------------------------------------------------------------------------
    # Scoring images.

    def elbo(self, x, seed=0, num_time_samples=1):
        """Per-example terms of uint8 images in bits per dimension, `bpd` their total.

        What `bpd` is, each model says (a VDM: its negative ELBO). Each image's figure is the
        mean of `num_time_samples` = K estimates: the batch is tiled K times and the times are
        antithetic over the K N copies, so image n is scored at t = (u + n / (K N) + k / K) mod 1
        for k = 0..K-1, one time in each K-th of [0, 1]; each copy draws its own noise. The
        denoiser runs in inference mode (no dropout).

        Args:
            x: uint8 images [N, H, W, C] (tensor or array), N >= 1.
            seed: int or shape-[2] seed; the same seed gives the same numbers.
            num_time_samples: K >= 1; memory grows like K N.

        Returns:
            dict of float32 [N] tensors, one per name in `TERMS`.
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

    def bpd(self, x, seed=0, num_time_samples=1):
        """`elbo(x, seed, num_time_samples)["bpd"]`: float32 [N], the model's bits per dimension."""
        return self.elbo(x, seed, num_time_samples)["bpd"]

    def _elbo(self, x, seed, num_time_samples):
        num_images = tf.shape(x)[0]
        copies = tf.tile(x, [num_time_samples, 1, 1, 1])  # copy k of image n at index k N + n
        terms = self._bpd_terms(copies, seed)
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
        """The per-example terms of a batch with seed 0 (so `model.predict` scores images)."""
        return self._loss_terms(x, seeding.as_seed(0), training)[0]

    # ----------------------------------------------------------------------------------------
    # Training.

    def compile(self, optimizer="rmsprop", **kwargs):
        """`keras.Model.compile`, then the optimizer's variables built at once, outside any graph.

        Keras builds an optimizer inside the first traced train step when no distribution
        strategy is set, and a variable created while tracing pays for a lifted initializer and
        a `tf.cond` each: for the paper-size U-Net's 2,073 slot and EMA variables, about 36 s of
        its first step. The model's own variables exist from construction (`build`), so the
        optimizer can be built here, in the model's strategy scope, as
        `vdm_tf.runs.compiled_model` always did.
        """
        super().compile(optimizer=optimizer, **kwargs)
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config):
        """Compiles a loaded model as it was saved (`keras.Model.compile_from_config`, which skips
        models whose `compile` is their own): the optimizer, then its saved variables, come back."""
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def metrics(self):
        return list(self.term_trackers.values())

    def _time_samples(self, example_index, num_examples, seed):
        """Antithetic times over the global batch (`antithetic_times`)."""
        return antithetic_times(seed, example_index, num_examples)

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
        """Gradients of the global-batch mean of `LOSS_TERM` (aligned with `trainable_variables`), terms.

        The loss on each replica is its mean divided by the replica count, so the optimizer's
        sum over replicas is the gradient of the global-batch mean under any tf.distribute
        strategy. `example_index` / `num_examples`: see `_loss_terms`.
        """
        with tf.GradientTape() as tape:
            terms, _ = self._loss_terms(x, seed, True, example_index, num_examples)
            loss = tf.reduce_mean(terms[self.LOSS_TERM]) / tf.distribute.get_strategy().num_replicas_in_sync
        return tape.gradient(loss, self.trainable_variables), terms

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
    # The sampler protocol and ancestral sampling.

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
        """One draw z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)) for s < t (VDM eq. 32-34).

        The step hook of `vdm_tf.samplers.ancestral`; s and t are float32 scalars.
        """
        gamma_s, gamma_t = self.schedule(s), self.schedule(t)
        eps_hat = self._denoise(z_t, tf.fill(tf.shape(z_t)[:1], gamma_t))
        noise = tf.random.stateless_normal(tf.shape(z_t), seed)
        return samplers.ancestral_update(z_t, eps_hat, gamma_s, gamma_t, noise)

    def decode(self, z_0, seed, argmax):
        """uint8 images from z_0: a draw of p(x | z_0) or, with `argmax` (a bool tensor), its mode."""
        gamma_0 = self.schedule.gamma_0
        return tf.cond(
            argmax,
            lambda: images.decoder_argmax(z_0, gamma_0, self.pixel_values),
            lambda: images.decoder_sample(z_0, gamma_0, seed, self.pixel_values),
        )

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
        num_samples = samplers.check_count("num_samples", num_samples)
        num_steps = samplers.check_count("num_steps", num_steps, minimum=1)
        seed = seeding.as_seed(seed)
        if num_samples == 0:
            return tf.zeros((0, *self.image_shape), tf.uint8)
        return self.sample_graph(
            tf.constant(num_samples, tf.int32), tf.constant(num_steps, tf.int32), seed, bool(argmax)
        )

    def _sample(self, num_samples, num_steps, seed, argmax):
        return samplers.ancestral(self, num_samples, num_steps, seed, argmax)

    # ----------------------------------------------------------------------------------------
    # Serialisation.

    def get_config(self):
        config = super().get_config()
        config.update(serialized(denoiser=self.denoiser, schedule=self.schedule))
        config.update(image_shape=self.image_shape, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**deserialized(config, "denoiser", "schedule"))
