"""Traced graphs are traced once: the train step, `elbo`, the sampler, and the U-Net's blocks inside them.

Tracing a graph runs its Python code again and hands TensorFlow a new graph to optimize (minutes for
the paper's network), so each of these must be traced on its first call only.
"""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

import vdm_tf

IMAGE_SHAPE = (8, 8, 1)


def tiny_model(schedule=None, n_layers=1):
    keras.utils.set_random_seed(0)
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=n_layers, n_embd=32, dropout=0.1)
    return vdm_tf.VDM(denoiser, schedule or vdm_tf.schedules.LearnedLinear(), IMAGE_SHAPE)


def compiled(model):
    optimizer = keras.optimizers.AdamW(1e-3, use_ema=True, ema_momentum=0.9)
    model.compile(optimizer=optimizer, jit_compile=False)
    # Created by the first step instead, the optimizer's variables would make tf.function trace
    # that step twice (once creating them, once using them).
    model.optimizer.build(model.trainable_variables)
    return model


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


def count_traces(model):
    """Replaces `model.train_step` by a wrapper counting its Python runs: in a graph, one per trace."""
    traces = []
    train_step = model.train_step

    def counted(data):
        traces.append(1)
        return train_step(data)

    model.train_step = counted
    return traces


def test_fit_traces_the_train_step_once():
    model = compiled(tiny_model())
    traces = count_traces(model)
    # 12 images in batches of 8: the last batch holds 4, and the dataset's batch size is unknown.
    data = tf.data.Dataset.from_tensor_slices(images(12)).batch(8)
    history = model.fit(data, epochs=2, verbose=0)
    model.fit(data, epochs=1, verbose=0)
    assert len(traces) == 1
    assert int(model.optimizer.iterations) == 6
    assert np.all(np.isfinite(history.history["bpd"]))


def test_trainer_loop_with_the_variance_objective_traces_once():
    """`trainers.train.Trainer`'s function: a while loop of `strategy.run(train_step)` over a chunk of batches."""
    # The learned monotone schedule's variance objective takes a second (persistent-tape) gradient.
    model = compiled(tiny_model(vdm_tf.schedules.LearnedMonotonic()))
    strategy = tf.distribute.get_strategy()

    @tf.function
    def run_steps(chunk):
        def body(i, _):
            strategy.run(lambda batches: model.train_step(batches[i]), args=(chunk,))
            return i + 1, 0

        tf.while_loop(lambda i, _: i < tf.shape(chunk)[0], body, (tf.constant(0), 0))

    weights = []
    for seed in range(3):
        run_steps(tf.constant(images(16, seed).reshape(2, 8, *IMAGE_SHAPE)))
        weights.append(model.denoiser.conv_out.kernel.numpy())
    assert run_steps.experimental_get_tracing_count() == 1
    assert int(model.optimizer.iterations) == 6
    assert np.all(np.isfinite(weights)) and np.abs(weights[2] - weights[1]).max() > 0


def test_elbo_and_sampler_trace_once_for_every_batch_size():
    model = tiny_model()
    for n, seed in ((3, 0), (5, 1), (3, 2)):
        model.elbo(images(n), seed=seed, num_time_samples=n - 1)
    for n, steps, argmax in ((2, 3, False), (4, 2, True), (1, 3, False)):
        assert model.sample(n, num_steps=steps, seed=n, argmax=argmax).shape == (n, *IMAGE_SHAPE)
    assert model.elbo_graph.experimental_get_tracing_count() == 1
    assert model.sample_graph.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("n_layers", [1, 3])
def test_the_train_step_holds_one_copy_of_each_distinct_block(n_layers):
    """Its 2 n_layers + 3 ResNet blocks call two traced functions (same-width and widening input)."""
    model = compiled(tiny_model(n_layers=n_layers))
    graph = tf.function(model.train_step).get_concrete_function(tf.constant(images(8))).graph
    called = collections.Counter(
        op.get_attr("f").name for op in graph.get_operations() if op.type.endswith("PartitionedCall")
    )
    resnet_calls = {name: count for name, count in called.items() if "resnet_block" in name}
    attention_calls = {name: count for name, count in called.items() if "attention_block" in name}
    # A forward and a backward function per distinct block: down and middle blocks, up blocks, attention.
    assert len(resnet_calls) == 4 and len(attention_calls) == 2
    assert sum(resnet_calls.values()) == 2 * (2 * n_layers + 3)
