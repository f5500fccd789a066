"""Conditional generation with an unconditional model: inpainting, colorization, class guidance.

    x = vdm_tf.conditional.inpaint(model, images_uint8, known_mask, num_steps=250, seed=0, resample=1)
    x = vdm_tf.conditional.colorize(model, grey_uint8, num_steps=250, seed=0, resample=1)
    x = vdm_tf.conditional.class_conditional_sample(model, classifier, label=3, num_samples=16, scale=1.0)

The classifier of class guidance is any layer `logits = classifier(z_t, gamma_t)`; `NoisyClassifier`
trains one (a `vdm_tf.networks.NoiseConditionalClassifier`, say) on labelled images with
`model.fit`, and is itself such a layer.

Both run the ancestral sampler (`vdm_tf.samplers.posterior_step`) and, after every step, replace
the known part of z_s by a fresh draw from q(z_s | x_known) (Song et al. 2021, appendix I.2).
Plain replacement is biased on correlated data: the unknown part never sees the known part's
*future* noise, so on a 2-D Gaussian with correlation 0.8 the fill lands only about halfway
from the marginal to the conditional mean. `resample=U` is RePaint's fix (Lugmayr et al.
2022): each step is done U times; after each of the first U - 1, z_s jumps back to t with
q(z_t | z_s) and the step is redone, which lets the two parts harmonise. Each redo also repeats
the ancestral step's discretisation error, so RePaint wants many steps: on that Gaussian with
U = 20 the fill's std is 27% too small at 100 steps and 8% at 1000.

Colorization is inpainting in Song et al.'s decoupled colour space: an orthogonal 3 x 3 matrix
whose first column is (1, 1, 1) / sqrt(3). Because it is orthogonal, the forward diffusion is
the same in either space, and in that space the grey image is one known channel.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from vdm_tf import images, samplers, seeding, traced
from vdm_tf import sde as sdes
from vdm_tf.models.base import deserialized, serialized

# Columns: grey (1, 1, 1) / sqrt(3), then (-2, 1, 1) / sqrt(6) and (0, 1, -1) / sqrt(2).
DECOUPLED_COLOUR_BASIS = np.array(
    [
        [1 / math.sqrt(3), -2 / math.sqrt(6), 0.0],
        [1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)],
        [1 / math.sqrt(3), 1 / math.sqrt(6), -1 / math.sqrt(2)],
    ],
    np.float32,
)


def _replacement_sampler(model, known, mask, basis, num_steps, seed, resample):
    """The ancestral sampler with replacement (and RePaint resampling), in `basis` coordinates.

    `known` and `mask` are in basis coordinates; returns the denoised x_hat in pixel space.
    """
    sde = model.sde
    to_basis = lambda z: tf.einsum("nhwc,cd->nhwd", z, basis)  # noqa: E731
    from_basis = lambda y: tf.einsum("nhwd,cd->nhwc", y, basis)  # noqa: E731
    shape = tf.shape(known)
    dt = (1.0 - sde.t_min) / tf.cast(num_steps, tf.float32)
    prior_seed, loop_seed = seeding.split_seed(seed, 2)

    def replace(z, t, noise):
        mean, std = sde.marginal(t)
        y = to_basis(z)
        return from_basis(mask * (mean * known + std * noise) + (1.0 - mask) * y)

    def step(i, z):
        t = 1.0 - tf.cast(i, tf.float32) * dt
        s = t - dt
        a, v = sde.transition(t, s)

        def attempt(u, z_t, z_s):
            draw_seed = seeding.fold_in(seeding.fold_in(loop_seed, i), u)
            step_seed, known_seed, jump_seed = seeding.split_seed(draw_seed, 3)
            z_s, _ = samplers.posterior_step(model, z_t, t, s, tf.random.stateless_normal(shape, step_seed))
            z_s = replace(z_s, s, tf.random.stateless_normal(shape, known_seed))
            jump = a * z_s + tf.sqrt(v) * tf.random.stateless_normal(shape, jump_seed)  # z_t ~ q(z_t | z_s)
            return u + 1, jump, z_s

        _, _, z_s = tf.while_loop(lambda u, z_t, z_s: u < resample, attempt, (0, z, z))
        return i + 1, z_s

    z = sde.prior_sample(shape, prior_seed)
    _, z = tf.while_loop(lambda i, z: i < num_steps, step, (0, z))
    x_hat = to_basis(samplers.denoised_mean(model, z, sde.t_min))
    return from_basis(mask * known + (1.0 - mask) * x_hat)


def _run(model, known, mask, basis, num_steps, seed, resample):
    for name, value in (("num_steps", num_steps), ("resample", resample)):
        if not tf.is_tensor(value) and int(value) < 1:  # tensors: checked by the caller's graph
            raise ValueError(f"{name} must be >= 1; got {value}.")

    def build():
        spec = tf.TensorSpec([None, *model.image_shape], tf.float32)
        scalar = tf.TensorSpec([], tf.int32)
        basis_spec = tf.TensorSpec([model.image_shape[-1]] * 2, tf.float32)
        signature = [spec, spec, basis_spec, scalar, tf.TensorSpec([2], tf.int64), scalar]
        return tf.function(lambda *args: _replacement_sampler(model, *args), input_signature=signature)

    run = traced.compiled(model, ("inpaint",), build)
    x_hat = run(known, mask, basis, tf.cast(num_steps, tf.int32), seeding.as_seed(seed), tf.cast(resample, tf.int32))
    return images.decode(x_hat)


def inpaint(model, images_uint8, known_mask, num_steps=250, seed=0, resample=1):
    """Fills the unknown pixels of uint8 images; the known ones come back unchanged.

    Args:
        model: has `.sde`, `.score(z, t)` and `.image_shape` (a `vdm_tf.VDM`, ...).
        images_uint8: uint8 [N, H, W, C]; the values of unknown pixels are ignored.
        known_mask: [N, H, W, C], [H, W, C] or [N, H, W, 1] (broadcast over channels):
            true / 1 where the pixel is known.
        num_steps: ancestral steps.
        seed: int or shape-[2] seed.
        resample: U, RePaint's number of tries per step (1: plain replacement).

    Returns:
        uint8 images [N, H, W, C].
    """
    x = images.check_images(images_uint8, tuple(model.image_shape))
    mask = tf.broadcast_to(tf.cast(known_mask, tf.float32), tf.shape(x))
    identity = tf.eye(model.image_shape[-1])
    return _run(model, images.encode(x), mask, identity, num_steps, seed, resample)


def colorize(model, grey_uint8, num_steps=250, seed=0, resample=1):
    """Colour images whose channel mean equals the grey input (to within rounding).

    Args:
        model: an RGB model (C = 3) with `.sde`, `.score(z, t)` and `.image_shape`.
        grey_uint8: uint8 [N, H, W, 1] (or [N, H, W, 3] with equal channels).
        num_steps, seed, resample: as in `inpaint`.

    Returns:
        uint8 images [N, H, W, 3].
    """
    if model.image_shape[-1] != 3:
        raise ValueError(f"colorize needs an RGB model; this one makes images of shape {model.image_shape}.")
    grey = tf.convert_to_tensor(grey_uint8)
    grey = images.check_images(grey[..., :1], tuple(model.image_shape[:2]) + (1,), name="grey images")
    grey_coordinate = math.sqrt(3.0) * images.encode(grey)  # (f, f, f) . (1, 1, 1) / sqrt(3)
    known = tf.concat([grey_coordinate, tf.zeros_like(grey_coordinate), tf.zeros_like(grey_coordinate)], -1)
    mask = tf.broadcast_to(tf.constant([1.0, 0.0, 0.0]), tf.shape(known))
    return _run(model, known, mask, tf.constant(DECOUPLED_COLOUR_BASIS), num_steps, seed, resample)


class ClassGuidedModel:
    """A score model for p_t(z | y) from an unconditional one and a noise-conditional classifier.

    grad log p_t(z | y) = grad log p_t(z) + grad log p_t(y | z) (Song et al. 2021, eq. 14 and
    appendix I.4); `scale` = w samples from p_t(z) p_t(y | z)^w instead (w = 1: the exact
    conditional, w > 1: sharper classes). It has `.sde`, `.score` and `.image_shape`, so every
    sampler of `vdm_tf.samplers` runs on it. Samplers are traced once per guided model: keep the
    object to sample the same class again.

    Args:
        model: the unconditional model (`.sde`, `.score(z, t)`, `.image_shape`).
        classifier: a Keras layer, `logits = classifier(z_t, gamma_t)` [N, num_classes], trained on
            noisy inputs at every noise level (gamma_t and the variance-preserving z_t as in the
            denoiser protocol; z of other SDEs is rescaled by 1 / sqrt(m_t^2 + s_t^2) for it).
        label: the class to sample.
        scale: the guidance weight w.
    """

    def __init__(self, model, classifier, label, scale=1.0):
        self.model = model
        self.classifier = classifier
        self.label = int(label)
        self.scale = float(scale)
        self.sde = model.sde
        self.image_shape = model.image_shape
        classes = num_classes(classifier, self.image_shape)
        if not 0 <= self.label < classes:
            raise ValueError(f"label must be a class of the classifier, 0..{classes - 1}; got {label}.")

    def score(self, z, t):
        t = tf.broadcast_to(tf.cast(t, tf.float32), tf.shape(z)[:1])
        mean, std = self.sde.marginal(t)
        scale = sdes.per_example(tf.sqrt(tf.square(mean) + tf.square(std)), z)
        with tf.GradientTape() as tape:
            tape.watch(z)
            logits = self.classifier(z / scale, self.sde.gamma(t))
            log_probability = tf.nn.log_softmax(logits)[:, self.label]
        # Examples are independent, so the gradient of the sum is each example's gradient.
        return self.model.score(z, t) + self.scale * tape.gradient(log_probability, z)


def num_classes(classifier, image_shape):
    """The number of classes of a classifier layer (the size of its logits), from one call on zeros."""
    return int(classifier(tf.zeros((1, *image_shape)), tf.zeros((1,))).shape[-1])


def class_conditional_sample(model, classifier, label, num_samples, scale=1.0, sampler="pc", seed=0, **options):
    """uint8 images of class `label`: `vdm_tf.samplers.sample` on a `ClassGuidedModel`.

    The guided model of each (classifier, label, scale) is kept with `model`, like the samplers'
    traced functions (`vdm_tf.traced`), so a second call with the same setting runs the
    sampler traced by the first instead of tracing it again. The cache holds the classifier as
    long as `model` lives.
    """
    guided = traced.compiled(
        model,
        ("class_guided", id(classifier), int(label), float(scale)),
        lambda: ClassGuidedModel(model, classifier, label, scale),
    )
    return samplers.sample(guided, num_samples, sampler=sampler, seed=seed, **options)



@keras.saving.register_keras_serializable(package="vdm_tf")
class NoisyClassifier(keras.Model):
    """Trains a noise-conditional classifier for `ClassGuidedModel` with `model.fit`.

    Each training example is noised to z = alpha f + sigma eps at gamma ~ U[gamma_min, gamma_max]
    (uniform in log-SNR, the range of the diffusion model to guide), and the loss is the cross
    entropy of its label: the classifier learns p_t(y | z_t) at every noise level. Randomness is
    per example and step (`vdm_tf.seeding`), so replicas under tf.distribute draw what one
    device would. Calling it returns the classifier's logits, so the trained object is itself the
    `classifier` argument of `ClassGuidedModel`.

    Args:
        classifier: a layer `logits = classifier(z_t, gamma_t)`.
        image_shape: (H, W, C) of the uint8 images.
        gamma_min, gamma_max: the noise levels trained on.
        seed: base seed of the noise.
        **kwargs: forwarded to `keras.Model`.

    Example:
    >>> noisy = NoisyClassifier(vdm_tf.networks.NoiseConditionalClassifier(10), image_shape=(8, 8, 1))
    >>> noisy.compile(optimizer="adam")
    >>> noisy.fit(vdm_tf.datasets.load("digits", "train", 128, with_labels=True), steps_per_epoch=500)
    >>> x = class_conditional_sample(vdm_model, noisy, label=3, num_samples=16, scale=2.0)
    """

    def __init__(self, classifier, image_shape, gamma_min=-13.3, gamma_max=5.0, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.image_shape = tuple(int(d) for d in image_shape)
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.seed = int(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.classifier(tf.zeros((1,) + self.image_shape), tf.zeros((1,)))  # creates the weights
        self.built = True

    def call(self, z_t, gamma_t, training=False):
        return self.classifier(z_t, gamma_t, training=training)

    def noisy_batch(self, x, seed):
        """(z_t, gamma_t) for uint8 images x, each example's draw fixed by (seed, its global index)."""
        context = tf.distribute.get_replica_context()
        local_size = tf.shape(x)[0]
        example_index = tf.cast(context.replica_id_in_sync_group, tf.int32) * local_size + tf.range(local_size)
        gamma_seed, eps_seed = seeding.split_seed(seed, 2)
        u = tf.map_fn(
            lambda i: tf.random.stateless_uniform([], seeding.fold_in(gamma_seed, i)),
            tf.cast(example_index, tf.int64),
            fn_output_signature=tf.float32,
        )
        gamma_t = self.gamma_min + (self.gamma_max - self.gamma_min) * u
        eps = seeding.per_example_normal(eps_seed, example_index, self.image_shape)
        gamma = images.per_example(gamma_t, 4)
        z_t = tf.sqrt(tf.sigmoid(-gamma)) * images.encode(x) + tf.sqrt(tf.sigmoid(gamma)) * eps
        return z_t, gamma_t

    def _step(self, data, training):
        x, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        z_t, gamma_t = self.noisy_batch(x, seeding.fold_in(self.seed, self.optimizer.iterations))
        logits = self.classifier(z_t, gamma_t, training=training)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits)
        self.loss_tracker.update_state(per_example)
        self.accuracy_tracker.update_state(labels, logits)
        return tf.reduce_mean(per_example) / tf.distribute.get_strategy().num_replicas_in_sync

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = self._step(data, training=True)
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.trainable_variables), self.trainable_variables))
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        self._step(data, training=False)
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def get_config(self):
        config = super().get_config()
        config.update(serialized(classifier=self.classifier))
        config.update(
            image_shape=self.image_shape,
            gamma_min=self.gamma_min,
            gamma_max=self.gamma_max,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**deserialized(config, "classifier"))
