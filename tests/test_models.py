"""The model family (ARCHITECTURE.md, "The model family"): one base, siblings, the ancestral step hook."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import vdm_tf
from vdm_tf import networks, samplers, schedules, seeding, traced
from vdm_tf.models import CDM, VDM, DiffusionModel, MultiScaleVDM, ScoreSDEModel

SHAPE = (8, 8, 1)


def tiny_vdm(**kwargs):
    return VDM(networks.ScoreUNet(n_layers=1, n_embd=8), schedules.FixedLinear(-6.0, 6.0), SHAPE, **kwargs)


def digits(n=4):
    return np.random.default_rng(0).integers(0, 256, (n, *SHAPE)).astype(np.uint8)


def test_every_model_is_a_diffusion_model_and_the_old_paths_name_the_same_classes():
    assert vdm_tf.VDM is VDM and vdm_tf.vdm.VDM is VDM
    assert vdm_tf.cdm.CDM is CDM and vdm_tf.multiscale.MultiScaleVDM is MultiScaleVDM
    assert vdm_tf.score_model.ScoreSDEModel is ScoreSDEModel
    for model_class in (VDM, CDM, MultiScaleVDM, ScoreSDEModel):
        assert issubclass(model_class, DiffusionModel)
    assert not issubclass(CDM, VDM)  # CDM's bpd is a one-step density estimate, not VDM's bound


def test_bpd_is_the_elbo_total():
    model = tiny_vdm()
    x = digits()
    np.testing.assert_array_equal(model.bpd(x, seed=3, num_time_samples=2), model.elbo(x, 3, 2)["bpd"])


class _Shift(DiffusionModel):
    """A model whose chain is a known function of the times: z_s = z_t + (t + 2 s), decoded as is."""

    def ancestral_step(self, z_t, s, t, seed):
        return z_t + (t + 2.0 * s)

    def decode(self, z_0, seed, argmax):
        return z_0


def test_ancestral_sampling_calls_the_step_hook_at_equal_steps_from_one_to_zero():
    """Steps i = T .. 1 from t = i / T to s = (i - 1) / T: z_0 = z_1 + sum_i (3 i - 2) / T."""
    model = _Shift(networks.ScoreUNet(n_layers=1, n_embd=8), schedules.FixedLinear(-6.0, 6.0), SHAPE)
    num_steps = 5
    z_0 = samplers.ancestral(model, tf.constant(2), tf.constant(num_steps), seeding.as_seed(0), tf.constant(False))
    prior_seed, _, _ = seeding.split_seed(seeding.as_seed(0), 3)
    z_1 = tf.random.stateless_normal((2, *SHAPE), prior_seed)
    shift = sum(3 * i - 2 for i in range(1, num_steps + 1)) / num_steps
    np.testing.assert_allclose(z_0, z_1 + shift, rtol=1e-6)


def test_ancestral_loop_gives_each_step_its_own_seed():
    seeds = []

    def step(z, s, t, seed):
        seeds.append(seed)
        return z + tf.cast(seed[1], tf.float32)

    loop_seed = seeding.as_seed(9)
    z = samplers.ancestral_loop(step, tf.zeros([]), 0, 3, lambda i: (0.0, 1.0), loop_seed)
    expected = sum(float(seeding.fold_in(loop_seed, i)[1]) for i in (1, 2, 3))
    assert float(z) == pytest.approx(expected)


def test_a_sibling_needs_only_its_loss_terms_to_train_and_score():
    """The extension point of new model families: `_loss_terms` alone gives fit, elbo and sample."""

    class MeanSquare(DiffusionModel):
        TERMS = ("bpd", "square")

        def _loss_terms(self, x, seed, training, example_index=None, num_examples=None):
            f = vdm_tf.images.encode(x)
            square = tf.reduce_mean(tf.square(self._denoise(f, tf.zeros(tf.shape(f)[:1]), training)), [1, 2, 3])
            return {"bpd": square + 1.0, "square": square}, None

    model = MeanSquare(networks.ScoreUNet(n_layers=1, n_embd=8), schedules.FixedLinear(-6.0, 6.0), SHAPE)
    model.compile(optimizer=keras.optimizers.SGD(1e-2))
    history = model.fit(tf.data.Dataset.from_tensor_slices(digits(8)).batch(4), epochs=1, verbose=0).history
    assert set(history) == {"bpd", "square"}
    terms = model.elbo(digits(), seed=0)
    np.testing.assert_allclose(terms["bpd"], terms["square"] + 1.0, rtol=1e-6)
    assert model.sample(2, num_steps=2, seed=0).shape == (2, *SHAPE)


def test_traced_functions_are_built_once_per_model_and_key():
    model, built = tiny_vdm(), []

    def build():
        built.append(1)
        return len(built)

    assert traced.compiled(model, ("k",), build) == traced.compiled(model, ("k",), build) == 1
    assert traced.compiled(tiny_vdm(), ("k",), build) == 2
