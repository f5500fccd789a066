"""Tests for vdm_tf.networks: the VDM score network and its layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from vdm_tf.networks import AttentionBlock, FourierFeatures, GroupNorm, ResnetBlock, ScoreUNet, TimestepEmbedding
from vdm_tf.networks.normalization import num_groups

TINY = dict(n_layers=1, n_embd=32)


def latents(shape=(2, 8, 8, 3), seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def gammas(n, seed=1):
    return tf.constant(np.random.default_rng(seed).uniform(-13.3, 5.0, size=n).astype(np.float32))


def perturb(layer, seed=0, std=0.1):
    """Adds noise to every weight, so zero-initialized projections no longer hide anything."""
    rng = np.random.default_rng(seed)
    layer.set_weights([w + rng.normal(0.0, std, w.shape).astype(np.float32) for w in layer.get_weights()])


def weights_with_a_gradient(net):
    """All but the attention key biases: logits do not depend on them (each adds q.b to a whole row)."""
    return [w for w in net.trainable_weights if not w.path.endswith("k/bias")]


def assert_equal_up_to_rounding(got, expected):
    """Graphs fuse ops, and XLA more, which changes the rounding: the former inline blocks differed by 3e-5."""
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=2e-4 * np.abs(b.numpy()).max())


def built_net(z, **kwargs):
    net = ScoreUNet(**{**TINY, **kwargs})
    net(z, gammas(z.shape[0]))
    return net


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fourier_features", [True, False])
def test_output_shape_matches_input(channels, fourier_features):
    z = latents((2, 8, 8, channels))
    net = ScoreUNet(**TINY, fourier_features=fourier_features, attention=True)
    assert net(z, gammas(2)).shape == z.shape


def test_output_is_z_at_init_and_not_after_changing_conv_out():
    z = latents()
    net = built_net(z)
    np.testing.assert_array_equal(net(z, gammas(2)).numpy(), z.numpy())
    net.conv_out.kernel.assign(tf.random.stateless_normal(net.conv_out.kernel.shape, seed=[0, 1]))
    assert np.abs(net(z, gammas(2)).numpy() - z.numpy()).max() > 1e-3


def test_parameter_count_matches_official_tiny_model():
    # The official count, 223,557, also holds a 2-parameter noise schedule and 128 weights for
    # the class-conditioning input that this unconditional network does not have.
    net = ScoreUNet(n_layers=2, n_embd=32)
    net.build((None, 32, 32, 3))
    assert sum(int(np.prod(w.shape)) for w in net.trainable_weights) == 223_557 - 2 - 128


def test_fourier_features_match_formula():
    exponents = (7, 8)
    z = np.random.default_rng(0).uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)
    features = FourierFeatures(exponents)(tf.constant(z)).numpy()
    assert features.shape == (2, 4, 4, 12)
    z64 = z.astype(np.float64)
    for c in range(3):
        for i, n in enumerate(exponents):
            angle = 2.0**n * np.pi * z64[..., c]
            np.testing.assert_allclose(features[..., c * 2 + i], np.sin(angle), atol=2e-4)
            np.testing.assert_allclose(features[..., 6 + c * 2 + i], np.cos(angle), atol=2e-4)


def test_timestep_embedding_matches_formula():
    dim = 16
    t = np.array([0.0, 0.1, 0.5, 1.0], np.float32)
    half = dim // 2
    angles = 1000.0 * t.astype(np.float64)[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    np.testing.assert_allclose(TimestepEmbedding(dim)(tf.constant(t)).numpy(), expected, atol=5e-4)


def test_timestep_embedding_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        TimestepEmbedding(7)


def test_num_groups_rule():
    assert [num_groups(c) for c in (128, 64, 32, 48, 40, 3, 1)] == [32, 32, 32, 24, 20, 3, 1]


def test_group_norm_matches_formula():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(2, 4, 4, 8)).astype(np.float32)
    norm = GroupNorm(max_groups=4)
    norm.build(x.shape)
    perturb(norm, std=0.5)
    scale, bias = norm.get_weights()
    grouped = x.astype(np.float64).reshape(2, 4, 4, 4, 2)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    expected = ((grouped - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    np.testing.assert_allclose(norm(tf.constant(x)).numpy(), expected, atol=1e-5)


def test_resnet_block_is_identity_at_init_and_projects_when_channels_change():
    x, cond = latents((2, 8, 8, 16)), latents((2, 64), seed=1)
    same = ResnetBlock(16)
    np.testing.assert_array_equal(same(x, cond).numpy(), x.numpy())
    assert same.shortcut is None
    wider = ResnetBlock(32)
    assert wider(x, cond).shape == (2, 8, 8, 32)
    assert wider.shortcut is not None


def reference_resnet_block(block, x, cond, training):
    """The ResNet block computed with its sub-layers' own Keras calls (its original implementation)."""
    h = block.conv1(tf.nn.silu(block.norm1(x)))
    h += block.cond_proj(cond)[:, None, None, :]
    h = tf.nn.silu(block.norm2(h))
    h = block.conv2(block.dropout_layer(h, training=training))
    return (x if block.shortcut is None else block.shortcut(x)) + h


@pytest.mark.parametrize("in_channels", [64, 128], ids=["same_width", "widening"])
def test_resnet_block_in_a_graph_matches_its_sublayers_with_gradients(in_channels):
    # 64 channels: 32 groups of two, so that the output depends on the conditioning vector.
    x, cond = latents((2, 8, 8, in_channels)), latents((2, 16), seed=1)
    block = ResnetBlock(64, dropout=0.3)
    block.build(x.shape, cond.shape)
    perturb(block)
    generator = block.dropout_layer.seed_generator

    def value_and_gradients(compute):
        generator.state.assign([3, 4])
        with tf.GradientTape() as tape:
            tape.watch([x, cond])
            y = compute(x, cond)
            loss = tf.reduce_sum(tf.sin(y))
        return [y, *tape.gradient(loss, [x, cond, *block.trainable_weights])]

    # In a graph the block runs as a shared traced function, given its weights as arguments.
    traced = tf.function(lambda x, cond: value_and_gradients(lambda x, c: block(x, c, training=True)))(x, cond)
    reference = value_and_gradients(lambda x, c: reference_resnet_block(block, x, c, training=True))
    assert len(traced) == 3 + len(block.trainable_weights) == 3 + (11 if in_channels == 128 else 9)
    for got, expected in zip(traced, reference):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_attention_block_matches_formula():
    x = latents((2, 4, 4, 8))
    block = AttentionBlock()
    np.testing.assert_array_equal(block(x).numpy(), x.numpy())  # zero-initialized output projection
    perturb(block, std=0.3)
    h = block.norm(x).numpy().reshape(2, 16, 8).astype(np.float64)
    projections = ("q", "k", "v", "proj_out")
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (getattr(block, name).get_weights() for name in projections)
    q, k, v = h @ wq + bq, h @ wk + bk, h @ wv + bv
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = x.numpy() + ((weights @ v) @ wo + bo).reshape(2, 4, 4, 8)
    np.testing.assert_allclose(block(x).numpy(), expected, atol=1e-5)


def test_get_config_round_trip():
    z = latents()
    net = built_net(z, fourier_exponents=(6, 7, 8), attention=True, dropout=0.2, gamma_min=-10.0, gamma_max=4.0)
    perturb(net)
    clone = ScoreUNet.from_config(net.get_config())
    assert clone.get_config() == net.get_config()
    clone(z, gammas(2))
    clone.set_weights(net.get_weights())
    np.testing.assert_array_equal(clone(z, gammas(2)).numpy(), net(z, gammas(2)).numpy())


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_dropout_only_when_training(graph):
    z = latents()
    net = built_net(z, dropout=0.5)
    perturb(net)
    g = gammas(2)
    run = tf.function(lambda training: net(z, g, training=training)) if graph else lambda t: net(z, g, training=t)
    np.testing.assert_array_equal(run(False).numpy(), run(False).numpy())
    assert np.abs(run(True).numpy() - run(True).numpy()).max() > 1e-4
    assert np.abs(run(True).numpy() - run(False).numpy()).max() > 1e-4


def test_graph_matches_eager_with_gradients():
    """Eager calls run each block's ops directly; a graph calls one traced function per distinct block."""
    z = latents()
    # Without Fourier features, whose frequencies up to 256 pi would amplify rounding in d/dz.
    net = built_net(z, n_layers=2, n_embd=64, attention=True, dropout=0.3, fourier_features=False)
    perturb(net)
    g = gammas(2)
    weights = weights_with_a_gradient(net)

    def value_and_gradients(z):
        generators = [generator for layer in net._flatten_layers() for generator in layer._seed_generators]
        for index, generator in enumerate(generators):
            generator.state.assign([5, index])
        with tf.GradientTape() as tape:
            tape.watch(z)
            y = net(z, g, training=True)
            loss = tf.reduce_sum(tf.sin(y))
        return [y, *tape.gradient(loss, [z, *weights])]

    assert_equal_up_to_rounding(tf.function(value_and_gradients)(z), value_and_gradients(z))


@pytest.mark.parametrize("scalar", [-3.0, np.float32(-3.0), tf.constant(-3.0)], ids=["float", "numpy", "tensor"])
def test_scalar_gamma_broadcasts(scalar):
    z = latents()
    net = built_net(z)
    perturb(net)
    np.testing.assert_array_equal(net(z, scalar).numpy(), net(z, tf.fill([2], -3.0)).numpy())


def test_conditioning_on_gamma_matters():
    # n_embd=64: with 32 channels, 32 groups of one channel each would let the GroupNorm after
    # the conditioning subtract it away entirely (as in the official code).
    z = latents()
    net = built_net(z, n_embd=64)
    perturb(net)
    assert np.abs(net(z, -10.0).numpy() - net(z, 2.0).numpy()).max() > 1e-3


def test_xla_matches_eager_with_dynamic_batch():
    z = latents((3, 8, 8, 3))
    net = built_net(z)
    perturb(net)

    @tf.function(
        jit_compile=True,
        input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32), tf.TensorSpec([None], tf.float32)],
    )
    def compiled(z_t, gamma_t):
        return net(z_t, gamma_t, training=False)

    for n in (3, 2):
        np.testing.assert_allclose(compiled(z[:n], gammas(n)).numpy(), net(z[:n], gammas(n)).numpy(), atol=1e-5)


def test_xla_gradients_match_graph_gradients():
    z = latents()
    net = built_net(z, n_embd=64, fourier_features=False)
    perturb(net)
    g = gammas(2)

    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(net(z, g, training=False)))
        return tape.gradient(loss, weights_with_a_gradient(net))

    assert_equal_up_to_rounding(tf.function(gradients, jit_compile=True)(), tf.function(gradients)())


def test_keras_file_round_trip(tmp_path):
    z_in = keras.Input((8, 8, 3))
    gamma_in = keras.Input(())
    model = keras.Model([z_in, gamma_in], ScoreUNet(**TINY, attention=True)(z_in, gamma_in))
    perturb(model)
    path = str(tmp_path / "score_unet.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    z, g = latents(), gammas(2)
    np.testing.assert_array_equal(restored([z, g]).numpy(), model([z, g]).numpy())
