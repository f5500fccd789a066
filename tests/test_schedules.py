"""Noise schedules: endpoints, monotonicity, forward-mode derivatives, serialisation."""

import numpy as np
import pytest
import tensorflow as tf

from vdm_tf import schedules


def randomised_monotonic(seed=0, **kwargs):
    """A LearnedMonotonic whose shape is far from linear."""
    schedule = schedules.LearnedMonotonic(gamma_min=-10.0, gamma_max=6.0, n_features=64, **kwargs)
    rng = np.random.default_rng(seed)
    schedule.linear_weight.assign(0.2)
    schedule.hidden_weight.assign(rng.normal(0, 8, 64))
    schedule.hidden_bias.assign(rng.normal(0, 4, 64))
    schedule.output_weight.assign(rng.normal(0, 60, 64))
    return schedule


def test_fixed_linear_values_and_derivative():
    schedule = schedules.FixedLinear(gamma_min=-13.3, gamma_max=5.0)
    t = tf.constant([0.0, 0.3, 1.0])
    gamma, dgamma = schedule.gamma_and_derivative(t)
    np.testing.assert_allclose(gamma.numpy(), -13.3 + 18.3 * t.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dgamma.numpy(), [18.3] * 3, rtol=1e-6)
    assert schedule.trainable_variables == []


def test_learned_linear_trains_its_endpoints():
    schedule = schedules.LearnedLinear(gamma_min=-13.3, gamma_max=5.0)
    assert {v.name for v in schedule.trainable_variables} == {"gamma_0", "gamma_range"}
    schedule._gamma_range.assign(-4.0)  # a negative raw range still gives an increasing schedule
    assert float(schedule.gamma_1) == pytest.approx(-9.3)


def test_learned_monotonic_is_monotone_and_hits_its_endpoints():
    schedule = randomised_monotonic()
    t = tf.linspace(0.0, 1.0, 2001)
    gamma, dgamma = schedule.gamma_and_derivative(t)
    assert float(gamma[0]) == pytest.approx(-10.0, abs=1e-5)
    assert float(gamma[-1]) == pytest.approx(6.0, abs=1e-5)
    assert np.all(np.diff(gamma.numpy()) > 0) and np.all(dgamma.numpy() > 0)
    linear = -10.0 + 16.0 * t.numpy()
    assert np.max(np.abs(gamma.numpy() - linear)) > 1.0  # a genuinely non-linear shape


def test_forward_mode_derivative_matches_finite_differences():
    schedule = randomised_monotonic(seed=3)
    t = np.linspace(0.01, 0.99, 50)
    _, dgamma = schedule.gamma_and_derivative(tf.constant(t, tf.float32))
    h = 1e-3
    numeric = (schedule(tf.constant(t + h, tf.float32)) - schedule(tf.constant(t - h, tf.float32))) / (2 * h)
    np.testing.assert_allclose(dgamma.numpy(), numeric.numpy(), rtol=2e-2, atol=1e-2)


def test_derivative_is_differentiable_in_the_weights():
    """The gradient of sum_t gamma'(t) (what the continuous-time loss's weight 0.5 gamma'(t) needs)
    with respect to each weight, against central finite differences along a random direction."""
    schedule = randomised_monotonic()
    t = tf.constant([0.1, 0.4, 0.7, 0.95])

    def total():
        return float(tf.reduce_sum(schedule.gamma_and_derivative(t)[1]))

    with tf.GradientTape() as tape:
        value = tf.reduce_sum(schedule.gamma_and_derivative(t)[1])
    grads = tape.gradient(value, schedule.trainable_variables)
    rng = np.random.default_rng(1)
    for variable, grad in zip(schedule.trainable_variables, grads):
        direction = rng.standard_normal(variable.shape).astype(np.float32)
        h = 1e-2 * max(1.0, float(tf.reduce_max(tf.abs(variable)))) / np.sqrt(direction.size)
        start = variable.numpy()
        variable.assign(start + h * direction)
        plus = total()
        variable.assign(start - h * direction)
        minus = total()
        variable.assign(start)
        numeric, analytic = (plus - minus) / (2 * h), float(np.sum(grad.numpy() * direction))
        assert abs(analytic - numeric) < 2e-3 * abs(numeric) + 2e-4, (variable.name, analytic, numeric)


@pytest.mark.parametrize("cls", [schedules.FixedLinear, schedules.LearnedLinear, schedules.LearnedMonotonic])
def test_config_round_trip(cls):
    schedule = randomised_monotonic() if cls is schedules.LearnedMonotonic else cls(gamma_min=-7.0, gamma_max=3.0)
    clone = cls.from_config(schedule.get_config())
    assert clone.get_config() == schedule.get_config()
    clone.set_weights(schedule.get_weights())
    t = tf.constant([0.0, 0.25, 0.9])
    np.testing.assert_array_equal(clone(t).numpy(), schedule(t).numpy())


def test_endpoints_must_be_ordered():
    with pytest.raises(ValueError, match="gamma_max must exceed gamma_min"):
        schedules.FixedLinear(gamma_min=5.0, gamma_max=-13.3)
