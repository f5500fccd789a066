"""Inpainting and colorization with an unconditional model, checked against Gaussian posteriors."""

import numpy as np
import pytest
import tensorflow as tf
from gaussian import CorrelatedGaussianScoreModel, GaussianDenoiser

from vdm_tf import VDM, conditional, images, samplers, schedules, sde


def test_inpainting_keeps_known_pixels_exactly():
    shape = (4, 4, 1)
    model = VDM(GaussianDenoiser(np.zeros(shape), np.full(shape, 0.3)), schedules.FixedLinear(-10.0, 8.0), shape)
    model.build()
    x = np.random.default_rng(0).integers(0, 256, (6, *shape), dtype=np.uint8)
    mask = np.random.default_rng(1).random((6, *shape)) < 0.5
    out = conditional.inpaint(model, x, mask, num_steps=20, seed=3, resample=2).numpy()
    np.testing.assert_array_equal(out[mask], x[mask])
    assert (out[~mask] != x[~mask]).mean() > 0.9, "unknown pixels are generated, not copied"


def correlated_inpainting(resample, num, num_steps):
    """Two pixels with correlation 0.8; pixel 0 known at +2 std; returns pixel 1's fills (f units)."""
    std, rho, known_value = 0.3, 0.8, 0.6
    cov = std**2 * np.array([[1.0, rho], [rho, 1.0]])
    model = CorrelatedGaussianScoreModel(sde.VPSDE(), np.zeros(2), cov, (1, 2, 1))
    x = np.zeros((num, 1, 2, 1), np.uint8)
    x[:, 0, 0, 0] = images.decode(tf.constant(known_value)).numpy()
    mask = np.zeros((num, 1, 2, 1), bool)
    mask[:, 0, 0, 0] = True
    out = conditional.inpaint(model, x, mask, num_steps=num_steps, seed=resample, resample=resample)
    known = images.encode(x[0, 0, 0, 0]).numpy()
    conditional_mean, conditional_std = rho * known, std * np.sqrt(1 - rho**2)
    return images.encode(out).numpy()[:, 0, 1, 0], conditional_mean, conditional_std


def test_replacement_alone_is_biased_and_repaint_resampling_removes_the_bias():
    """Replacement's fill falls 36% short of the conditional mean (Song et al.). RePaint's resampling leaves
    two biases (measured with 12000 samples): too few resamples U leave some of the mean's
    (4% at U = 10, 2% at U = 20), and each resampled step repeats the ancestral step's own
    discretisation error, which shrinks the std by O(U / num_steps) (U = 10: 3% at 1500 steps,
    1.3% at 2000; U = 20: 9.5% at 1000). With U = 10, 2000 steps and 2000 samples the standard
    errors of the mean and std are 0.8% and 1.6%: both biases stay 5 or more of them inside 10%."""
    plain, conditional_mean, conditional_std = correlated_inpainting(resample=1, num=1500, num_steps=1000)
    assert plain.mean() < 0.75 * conditional_mean, (plain.mean(), conditional_mean)  # 10 standard errors
    repainted, _, _ = correlated_inpainting(resample=10, num=2000, num_steps=2000)
    assert abs(repainted.mean() - conditional_mean) < 0.1 * conditional_mean, (repainted.mean(), conditional_mean)
    assert abs(repainted.std() - conditional_std) < 0.1 * conditional_std, (repainted.std(), conditional_std)


def test_colorization_keeps_the_grey_level():
    shape = (4, 4, 3)
    mean = np.stack([np.full((4, 4), v) for v in (0.3, -0.1, -0.4)], -1)
    model = VDM(GaussianDenoiser(mean, np.full(shape, 0.1)), schedules.FixedLinear(-10.0, 8.0), shape)
    model.build()
    grey = np.random.default_rng(2).integers(80, 170, (256, 4, 4, 1), dtype=np.uint8)  # no channel clips
    colour = conditional.colorize(model, grey, num_steps=400, seed=0).numpy().astype(np.float64)
    assert colour.shape == (256, 4, 4, 3)
    np.testing.assert_allclose(colour.mean(-1), grey[..., 0], atol=1.0)  # rounding of three channels
    # Channels independent with equal variances s^2: given their mean, each channel's offset
    # from it is N(mu_c - mean(mu), s^2 (1 - 1/3)), 128 pixel values per unit of f; so red - blue
    # is N(128 * 0.7, 2 s^2 128^2), 89.6 +- 0.28 over the 4096 pixels.
    offsets = (colour - grey).reshape(-1, 3)
    offset_std = 0.1 * np.sqrt(2 / 3) * 128
    expected = 128 * (mean[0, 0] - mean[0, 0].mean())
    np.testing.assert_array_less(np.abs(offsets.mean(0) - expected), 4 * offset_std / np.sqrt(len(offsets)))
    red_minus_blue = offsets[:, 0] - offsets[:, 2]
    assert abs(red_minus_blue.mean() - 89.6) < 4 * np.sqrt(2) * 0.1 * 128 / np.sqrt(len(offsets)), red_minus_blue.mean()
    # 400 ancestral steps are about 1.5% too narrow; each std estimate has 1.1% noise.
    np.testing.assert_array_less(np.abs(offsets.std(0) / offset_std - 1), 0.06)
    with pytest.raises(ValueError, match="colorize needs an RGB model"):
        conditional.colorize(VDM(GaussianDenoiser(mean[..., :1], 0.2), schedules.FixedLinear(), (4, 4, 1)), grey)


class TwoClassMixture:
    """f ~ 0.5 N(-0.5, 0.5^2) + 0.5 N(+0.5, 0.5^2), one pixel, under an SDE: exact score and classifier.

    The classifier takes variance-preserving inputs (z / sqrt(m^2 + s^2)) and gamma, as trained
    classifiers do; the score is in the SDE's own coordinates.
    """

    means = tf.constant([-0.5, 0.5])
    std = 0.5

    def __init__(self, process=None):
        self.sde = process or sde.VPSDE()
        self.image_shape = (1, 1, 1)

    def log_joint(self, z, m, s):
        """log p_t(z, y) for y = 0, 1: [N, 2]."""
        variance = tf.square(m) * self.std**2 + tf.square(s)
        return (
            -0.5 * tf.square(tf.reshape(z, [-1, 1]) - m[:, None] * self.means) / variance[:, None]
            - 0.5 * tf.math.log(variance)[:, None]
        )

    def score(self, z, t):
        m, s = self.sde.marginal(tf.broadcast_to(tf.cast(t, tf.float32), tf.shape(z)[:1]))
        with tf.GradientTape() as tape:
            tape.watch(z)
            log_density = tf.reduce_logsumexp(self.log_joint(z, m, s), axis=-1)
        return tape.gradient(log_density, z)

    def classifier(self, z, gamma):
        """The Bayes classifier p_t(y | z) as logits, from the noise level gamma = log(s^2 / m^2)."""
        return self.log_joint(z, tf.sqrt(tf.sigmoid(-gamma)), tf.sqrt(tf.sigmoid(gamma)))


@pytest.mark.parametrize(
    "scale, rate, process", [(0.0, 0.5, sde.VPSDE()), (1.0, 0.8413, sde.VPSDE()), (1.0, 0.8413, sde.VESDE(0.01, 5.0))]
)
def test_class_guidance_gives_the_requested_class_at_the_implied_rate(scale, rate, process):
    """With w = 1 the samples come from the class's own Gaussian, which the Bayes classifier
    labels correctly with probability Phi(0.5 / 0.5) = 0.841; with w = 0 from the mixture (0.5).
    Under the VE SDE the classifier sees rescaled inputs."""
    data = TwoClassMixture(process)
    guided = conditional.ClassGuidedModel(data, data.classifier, label=1, scale=scale)
    x = samplers.pc_sample_latents(guided, 4000, num_steps=300, seed=11, corrector="none").numpy().reshape(-1)
    assert abs((x > 0).mean() - rate) < 0.03, ((x > 0).mean(), rate)
    if scale == 1.0:
        assert abs(x.mean() - 0.5) < 0.03 and abs(x.std() - 0.5) < 0.03, (x.mean(), x.std())
