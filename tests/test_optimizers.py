"""vdm_tf.optimizers.AdamW: Keras's AdamW, step for step, in a fraction of the graph."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from vdm_tf import optimizers

# Warm-up then cosine decay, decay on the kernels only, EMA with a momentum small enough that
# the average, the weights and the initial weights all differ after a few steps, and clipping
# by the global norm that binds.
SETTINGS = dict(beta_2=0.99, weight_decay=0.1, use_ema=True, ema_momentum=0.7, global_clipnorm=0.5)


def learning_rate():
    return keras.optimizers.schedules.CosineDecay(0.0, 10, alpha=0.1, warmup_target=0.05, warmup_steps=3)


def train(optimizer_class, steps=12, jit_compile=False, run_eagerly=False, strategy=None, **overrides):
    """Weights and EMA weights after `steps` steps of a small regression (its kernels decayed)."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((5,)), keras.layers.Dense(7), keras.layers.LayerNormalization(), keras.layers.Dense(3),
        ])
        optimizer = optimizer_class(learning_rate(), **{**SETTINGS, **overrides})
        optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
        model.compile(optimizer, loss="mse", jit_compile=jit_compile, run_eagerly=run_eagerly)
        optimizer.build(model.trainable_variables)
    x = np.random.default_rng(1).normal(size=(16 * steps, 5)).astype("float32")
    y = np.random.default_rng(2).normal(size=(16 * steps, 3)).astype("float32")
    for i in range(steps):  # not `fit`, which ends by copying the averages into the weights
        model.train_on_batch(x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)])
    averages = optimizer._model_variables_moving_average if optimizer.use_ema else []
    return [v.numpy() for v in model.trainable_variables], [a.numpy() for a in averages]


@pytest.fixture(scope="module")
def keras_result():
    return train(keras.optimizers.AdamW)


def assert_same(result, expected, atol=1e-6):
    for got, want in zip(result[0] + result[1], expected[0] + expected[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("mode", ["graph", "xla", "eager"])
def test_the_fused_step_is_keras_adamw(keras_result, mode):
    """Weights and EMA weights after 12 steps agree with Keras's AdamW to float32 rounding.

    The updates are ~1e-2 per step, so a missing or misplaced weight decay (lr * wd * w ~ 5e-3),
    a bias correction off by one step, a wrong EMA start or an unclipped gradient differ by far
    more than the 1e-6 allowed.
    """
    result = train(optimizers.AdamW, jit_compile=mode == "xla", run_eagerly=mode == "eager")
    initial = train(keras.optimizers.AdamW, steps=0)
    # The test means something: the weights moved, and the average is neither them nor the start.
    assert max(np.abs(a - b).max() for a, b in zip(keras_result[0], initial[0])) > 0.05
    assert max(np.abs(a - b).max() for a, b in zip(keras_result[0], keras_result[1])) > 1e-2
    assert_same(result, keras_result)


def test_keras_paths_the_fused_step_does_not_cover_still_train_as_keras():
    """AMSGrad (no fused kernel here) runs Keras's own step."""
    assert_same(train(optimizers.AdamW, amsgrad=True), train(keras.optimizers.AdamW, amsgrad=True))


def test_without_ema_or_weight_decay():
    plain = dict(use_ema=False, weight_decay=0.0)
    assert_same(train(optimizers.AdamW, **plain), train(keras.optimizers.AdamW, **plain))


def optimizer_ops(optimizer_class):
    """Ops of the optimizer's part of a train step graph, and the number of variables it updates."""
    model = keras.Sequential([keras.Input((5,))] + [keras.layers.Dense(4) for _ in range(10)])
    model.compile(optimizer_class(learning_rate(), **SETTINGS), loss="mse")
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step)
    graph = step.get_concrete_function((tf.zeros([2, 5]), tf.zeros([2, 4]))).graph
    ops = [op for op in graph.get_operations() if op.name.startswith(model.optimizer.name)]
    return len(ops), len(model.trainable_variables)


def test_the_step_holds_a_few_ops_per_variable():
    """About 20 ops per variable (5 of them the clipping's), where Keras's AdamW writes about 80.

    The graph's size is what tracing and grappler spend the time to the first step on.
    """
    fused, variables = optimizer_ops(optimizers.AdamW)
    plain, _ = optimizer_ops(keras.optimizers.AdamW)
    assert fused < 20 * variables + 60, (fused, variables)
    assert plain > 3 * fused, (plain, fused)


def test_serializes_as_itself():
    optimizer = optimizers.AdamW(2e-4, beta_2=0.99, weight_decay=0.01, use_ema=True, ema_momentum=0.9999)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is optimizers.AdamW
    assert restored.get_config() == optimizer.get_config()


MIRRORED = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import keras, test_optimizers
from vdm_tf import optimizers
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
weights, averages = test_optimizers.train(optimizers.AdamW, strategy=strategy)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "weights": [w.tolist() for w in weights + averages]}))
"""


def test_mirrored_replicas_update_like_one_device(keras_result):
    """Under MirroredStrategy each replica's copy takes the fused update of the summed gradient.

    The gradient is clipped after the replicas' shares are summed, as on one device (Keras's
    AdamW clips each share by its own norm: 4e-3 away from the one-device weights here).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", MIRRORED, here], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["replicas"] == 2
    n = len(keras_result[0])
    weights = [np.array(w) for w in output["weights"]]
    assert_same((weights[:n], weights[n:]), keras_result, atol=2e-6)


@pytest.mark.parametrize("optimizer_class", [optimizers.AdamW, keras.optimizers.AdamW])
def test_a_diffusion_model_builds_its_optimizer_when_compiled(optimizer_class):
    """`compile` builds the optimizer (slots and EMA copies of every trainable variable) outside
    any graph, so the first traced train step creates no variable; `fit` then trains as before."""
    from exported_model import random_images, tiny_cdm, tiny_model

    for model in (tiny_model(), tiny_cdm()):
        model.compile(optimizer=optimizer_class(1e-3, use_ema=True))
        assert model.optimizer.built
        built = {id(v) for v in model.optimizer.variables}
        averages = model.optimizer._model_variables_moving_average
        assert len(averages) == len(model.trainable_variables)
        history = model.fit(random_images(4), epochs=1, batch_size=2, verbose=0)
        assert np.isfinite(history.history["loss" if "loss" in history.history else "bpd"][-1])
        assert {id(v) for v in model.optimizer.variables} == built


def test_a_saved_diffusion_model_loads_compiled_with_its_optimizer_state(tmp_path):
    """`keras.saving.load_model` compiles a vdm_tf model as saved (its `compile` is its own, so it
    has its own `compile_from_config`): the step count and every moment and EMA variable return."""
    from exported_model import random_images, tiny_model

    model = tiny_model()
    model.compile(optimizer=optimizers.AdamW(1e-3, use_ema=True))
    model.fit(random_images(4), epochs=1, batch_size=2, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.compiled and int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(restored.numpy(), saved.numpy())
