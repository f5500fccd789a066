"""How many images to sample: 0 gives an empty uint8 batch, as NumPy would; a count that is not
an integer >= 0 is a one-line ValueError naming the expected form.

Every model kind (`VDM`, `ScoreSDEModel`, `CDM`, `MultiScaleVDM`) through its own `sample`, and
every sampler of `vdm_tf.samplers` (with the class-guided sampler of `vdm_tf.conditional`) on the
kinds that have an SDE. None of these runs the network for 0 images or for a refused count, so
the tests are cheap.
"""

import numpy as np
import pytest
import tensorflow as tf
from exported_model import IMAGE_SHAPE, SMALL_NETWORK, tiny_cdm, tiny_model, tiny_score_sde_model

import vdm_tf
from vdm_tf import conditional, samplers
from vdm_tf.multiscale import MultiScaleVDM


def tiny_multiscale():
    denoiser = vdm_tf.networks.ScoreUNet(dropout=0.0, **SMALL_NETWORK)
    model = MultiScaleVDM(denoiser, vdm_tf.schedules.FixedLinear(-13.3, 5.0), IMAGE_SHAPE, levels=1)
    model.build()
    return model


MODEL_KINDS = {"vdm": tiny_model, "score_sde": tiny_score_sde_model, "cdm": tiny_cdm, "multiscale": tiny_multiscale}
SDE_KINDS = ("vdm", "score_sde", "cdm")  # a MultiScaleVDM has no single SDE for vdm_tf.samplers
# Not integers >= 0: a negative count, a float (even a whole one), a string, None, a bool.
BAD_COUNTS = (-1, 2.5, np.float32(2.0), "3", None, True)
EXPECTED_COUNT = r"^expected an integer num_samples >= 0; got .+\.$"
EMPTY = (0, *IMAGE_SHAPE)


@pytest.fixture(scope="module")
def models():
    return {kind: build() for kind, build in MODEL_KINDS.items()}


@pytest.fixture(scope="module")
def classifier():
    return vdm_tf.networks.NoiseConditionalClassifier(10, 1, 16)


def assert_empty_images(samples):
    assert samples.dtype == tf.uint8 and tuple(samples.shape) == EMPTY


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_sample_of_zero_images_is_an_empty_uint8_batch(models, kind):
    assert_empty_images(models[kind].sample(0, num_steps=2))
    assert_empty_images(models[kind].sample(np.int64(0), num_steps=2, argmax=True))


def test_sample_takes_python_numpy_and_tensor_integers():
    model = tiny_model()
    for count in (np.int32(1), tf.constant(1, tf.int64)):
        samples = model.sample(count, num_steps=1)
        assert samples.dtype == tf.uint8 and tuple(samples.shape) == (1, *IMAGE_SHAPE)
    assert_empty_images(model.sample(tf.constant(0), num_steps=1))


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("count", BAD_COUNTS, ids=repr)
def test_sample_refuses_a_count_that_is_not_an_integer_from_zero(models, kind, count):
    with pytest.raises(ValueError, match=EXPECTED_COUNT):
        models[kind].sample(count, num_steps=2)


@pytest.mark.parametrize("num_steps", (0, 1.5), ids=repr)
def test_sample_refuses_a_step_count_that_is_not_a_positive_integer(models, num_steps):
    with pytest.raises(ValueError, match=r"^expected an integer num_steps >= 1; got .+\.$"):
        models["vdm"].sample(2, num_steps=num_steps)


@pytest.mark.parametrize("kind", SDE_KINDS)
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_every_sampler_gives_an_empty_uint8_batch_for_zero(models, kind, sampler):
    assert_empty_images(samplers.sample(models[kind], 0, sampler=sampler, num_steps=2))


def test_the_latent_samplers_give_an_empty_float_batch_for_zero(models):
    latents = samplers.pc_sample_latents(models["vdm"], 0, num_steps=2)
    assert latents.dtype == tf.float32 and tuple(latents.shape) == EMPTY
    latents, nfe = samplers.ode_sample_latents(models["vdm"], 0)
    assert latents.dtype == tf.float32 and tuple(latents.shape) == EMPTY
    assert int(nfe) == 0


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("count", BAD_COUNTS, ids=repr)
def test_every_sampler_refuses_a_count_that_is_not_an_integer_from_zero(models, sampler, count):
    with pytest.raises(ValueError, match=EXPECTED_COUNT):
        samplers.sample(models["vdm"], count, sampler=sampler, num_steps=2)


def test_class_guided_sampling_of_zero_images_and_bad_counts(models, classifier):
    assert_empty_images(conditional.class_conditional_sample(models["vdm"], classifier, 3, 0, num_steps=2))
    with pytest.raises(ValueError, match=EXPECTED_COUNT):
        conditional.class_conditional_sample(models["vdm"], classifier, 3, -1, num_steps=2)
