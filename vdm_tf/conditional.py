"""Conditional generation with an unconditional model: inpainting, colorization, class guidance.

    x = vdm_tf.conditional.inpaint(model, images_uint8, known_mask, num_steps=250, seed=0, resample=1)
    x = vdm_tf.conditional.colorize(model, grey_uint8, num_steps=250, seed=0, resample=1)
    x = vdm_tf.conditional.class_conditional_sample(model, classifier, label=3, num_samples=16, scale=1.0)

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

import numpy as np
import tensorflow as tf

from vdm_tf import images, samplers, seeding

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

    run = samplers.compiled(model, ("inpaint",), build)
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
            noisy inputs at every noise level (gamma_t as in the denoiser protocol).
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

    def score(self, z, t):
        gamma_t = self.sde.gamma(tf.broadcast_to(tf.cast(t, tf.float32), tf.shape(z)[:1]))
        with tf.GradientTape() as tape:
            tape.watch(z)
            log_probability = tf.nn.log_softmax(self.classifier(z, gamma_t))[:, self.label]
        # Examples are independent, so the gradient of the sum is each example's gradient.
        return self.model.score(z, t) + self.scale * tape.gradient(log_probability, z)


def class_conditional_sample(model, classifier, label, num_samples, scale=1.0, sampler="pc", seed=0, **options):
    """uint8 images of class `label`: `vdm_tf.samplers.sample` on a `ClassGuidedModel`."""
    guided = ClassGuidedModel(model, classifier, label, scale)
    return samplers.sample(guided, num_samples, sampler=sampler, seed=seed, **options)

