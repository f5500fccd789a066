"""The noise-conditional classifier for class guidance: its training run and its use."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainers import classifier, train
from vdm_tf import VDM, conditional, networks, schedules


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("classifier"))
    config = dataclasses.replace(classifier.PRESETS["digits"], train_steps=160, steps_per_epoch=80)
    accuracy = classifier.train_classifier(config, model_dir, verbose=0)
    return model_dir, config, accuracy


def test_classifier_learns_the_classes_and_knows_the_noise_level(trained):
    _, _, accuracy = trained
    assert accuracy[-10.0] > 0.85, accuracy  # nearly clean digits are easy
    assert accuracy[5.0] < 0.3, accuracy  # at SNR e^-5 little of the digit is left: near chance (0.1)
    assert accuracy[-10.0] > accuracy[0.0] > accuracy[5.0], accuracy


def test_saved_classifier_reloads_and_guides_a_diffusion_model(trained):
    model_dir, config, accuracy = trained
    noisy = keras.saving.load_model(f"{model_dir}/classifier.keras")
    assert isinstance(noisy, conditional.NoisyClassifier)
    assert classifier.accuracy_by_noise_level(noisy, config, gammas=(-10.0,)) == {-10.0: accuracy[-10.0]}
    model = VDM(networks.ScoreUNet(n_layers=1, n_embd=16), schedules.FixedLinear(), (8, 8, 1))
    guided = conditional.ClassGuidedModel(model, noisy, label=3, scale=2.0)
    unguided = conditional.ClassGuidedModel(model, noisy, label=3, scale=0.0)
    z, t = tf.random.stateless_normal((4, 8, 8, 1), [0, 3]), tf.fill([4], 0.5)
    difference = guided.score(z, t) - unguided.score(z, t)
    assert difference.shape == (4, 8, 8, 1) and float(tf.reduce_max(tf.abs(difference))) > 0.0
    # The guidance term is w * grad log p(y | z): its direction raises the class-3 probability.
    gamma = model.sde.gamma(t)
    before = tf.nn.softmax(noisy(z, gamma))[:, 3]
    after = tf.nn.softmax(noisy(z + 1e-2 * difference, gamma))[:, 3]
    assert np.all(after.numpy() > before.numpy())


def test_non_finite_loss_stops_before_the_backup():
    with pytest.raises(train.NonFiniteLossError, match="the loss is nan"):
        classifier.StopOnNonFiniteLoss().on_train_batch_end(7, {"loss": float("nan")})


def test_train_steps_is_the_number_of_optimizer_steps(tmp_path):
    """5 steps with 4 per epoch: a whole epoch, then one step of the next (not 8)."""
    config = dataclasses.replace(classifier.PRESETS["digits"], train_steps=5, steps_per_epoch=4, batch_size=16)
    classifier.train_classifier(config, str(tmp_path), verbose=0)
    saved = keras.saving.load_model(tmp_path / "classifier.keras")
    assert int(saved.optimizer.iterations) == 5
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2  # header and two epochs


@pytest.fixture(scope="module")
def guidance_pair():
    """An untrained tiny diffusion model and classifier: enough to count traces."""
    model = VDM(networks.ScoreUNet(n_layers=1, n_embd=16), schedules.FixedLinear(), (8, 8, 1))
    noisy = conditional.NoisyClassifier(networks.NoiseConditionalClassifier(10, 1, 16), (8, 8, 1))
    return model, noisy


def test_guided_sampling_traces_once_per_model_and_setting(guidance_pair, monkeypatch):
    model, noisy = guidance_pair
    traces = []
    score = conditional.ClassGuidedModel.score
    monkeypatch.setattr(conditional.ClassGuidedModel, "score", lambda self, z, t: traces.append(1) or score(self, z, t))

    def sample(seed=0):
        return conditional.class_conditional_sample(
            model, noisy, 3, 2, scale=2.0, sampler="ancestral", num_steps=2, seed=seed
        ).numpy()

    first = sample()
    traced = len(traces)
    assert traced > 0
    np.testing.assert_array_equal(sample(), first)  # the same graph, the same images
    sample(seed=1)  # another seed is an input of the graph, not a new trace
    assert len(traces) == traced


@pytest.mark.parametrize("label", [-1, 10, 12])
def test_labels_outside_the_classifiers_classes_are_refused(guidance_pair, label):
    model, noisy = guidance_pair
    with pytest.raises(ValueError, match=rf"label must be a class of the classifier, 0..9; got {label}"):
        conditional.ClassGuidedModel(model, noisy, label=label)


@pytest.mark.parametrize(
    "field, value, message",
    [("batch_size", 0, "batch_size must be >= 1"), ("train_steps", -1, "train_steps must be >= 1"),
     ("dataset", "imagenet32", "no labels"), ("dataset", "foo", "Unknown data set 'foo'")],
)
def test_classifier_config_rejects_values_no_run_can_use(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(classifier.PRESETS["digits"], **{field: value})
