"""Mixed precision: a ScoreUNet computing in bfloat16 inside a float32 likelihood.

`--config.mixed_precision=bfloat16` (`runs.build_model`) gives the denoiser Keras's
"mixed_bfloat16" policy. The likelihood needs float32 where bfloat16's 8 significant bits are not
enough: z_t = alpha f + sigma eps near gamma_min = -13.3 (sigma = 1.3e-3, while bfloat16 rounds a
z of 0.3 to 2e-3), the Fourier features sin(2^8 pi z) of z_t, the time embedding of gamma, the
schedule, the loss sums and the decoder. These tests check the dtypes and, on the Gaussian data of
tests/gaussian.py, the numbers.
"""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf
from gaussian import GaussianData, PosteriorDenoiser

import vdm_tf
from vdm_tf import VDM, networks, runs, schedules
from vdm_tf.networks.normalization import group_norm

IMAGE_SHAPE = (4, 4, 1)
MIXED = "mixed_bfloat16"
# The layers of a mixed ScoreUNet that keep float32: their inputs need its precision.
FLOAT32_LAYERS = ("fourier", "time_embedding", "conv_in")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return GaussianData(rng.uniform(-0.3, 0.3, IMAGE_SHAPE), rng.uniform(0.05, 0.2, IMAGE_SHAPE))


def randomized_networks(n_embd=64, output_scale=0.3, seed=1):
    """A float32 and a mixed-bfloat16 ScoreUNet with the same random weights.

    Every kernel is LeCun-normal, the zero-initialized ones included (so every block, the time
    conditioning and attention change the output), and the output convolution's is scaled by
    `output_scale`: the network's correction to z_t has an rms of about output_scale / 2.
    """
    pair = [networks.ScoreUNet(n_layers=1, n_embd=n_embd, dropout=0.0, dtype=dtype) for dtype in ("float32", MIXED)]
    for net in pair:
        net(tf.zeros((1, *IMAGE_SHAPE)), tf.zeros([1]))
    rng = np.random.default_rng(seed)
    weights = []
    for variable in pair[0].weights:
        value = variable.numpy()
        if "kernel" in variable.path:
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(value.shape[:-1])), value.shape)
            value *= output_scale if "conv_out" in variable.path else 1.0
        weights.append(value.astype(np.float32))
    for net in pair:
        net.set_weights(weights)
    return pair


@pytest.fixture(scope="module")
def network_pair():
    return randomized_networks()


def relative_error(got, expected):
    return float(tf.norm(got - expected) / tf.norm(expected))


def test_config_accepts_float32_and_bfloat16_only():
    assert runs.Config().network.mixed_precision == "float32"
    with pytest.raises(ValueError, match="^Unknown network.mixed_precision 'float16'; expected float32 or bfloat16.$"):
        runs.NetworkConfig(mixed_precision="float16")
    with pytest.raises(ValueError, match="a CDM runs in float32"):
        runs.Config().replace(model="cdm", mixed_precision="bfloat16")


def test_mixed_network_keeps_float32_where_the_input_needs_it(network_pair):
    _, net = network_pair
    policies = {layer.name: layer.dtype_policy.name for layer in net._flatten_layers(include_self=False)}
    assert {name: policies.pop(name) for name in FLOAT32_LAYERS} == dict.fromkeys(FLOAT32_LAYERS, "float32")
    # The rest, the blocks' sub-layers included, share the network's policy.
    assert set(policies.values()) == {MIXED}
    assert {variable.dtype for variable in net.weights} == {"float32"}


def test_bfloat16_network_matches_the_float32_network(network_pair):
    """The correction to z_t (output - z_t) of the bfloat16 network is within 3% of the float32 one's
    (1.3% measured), but not equal to it: the trunk does compute in bfloat16. Fourier features of a
    bfloat16 z_t change it by 54%, a bfloat16 time embedding by 6.5%."""
    rng = np.random.default_rng(2)
    z = tf.constant(rng.normal(0.0, 0.5, (256, *IMAGE_SHAPE)), tf.float32)
    gamma = tf.constant(rng.uniform(-13.3, 5.0, 256), tf.float32)
    full, mixed = (net(z, gamma) for net in network_pair)
    assert mixed.dtype == tf.float32
    error = relative_error(mixed - z, full - z)
    assert 1e-4 < error < 0.03, error


class AroundNetwork(keras.layers.Layer):
    """A denoiser around a ScoreUNet with its dtype policy and, like it, float32 inputs."""

    def __init__(self, network, **kwargs):
        super().__init__(dtype=network.dtype_policy, **kwargs)
        self.network = network

    @property
    def input_dtype(self):
        return self.variable_dtype


class PosteriorPlusNetwork(AroundNetwork):
    """The data's exact denoiser plus a ScoreUNet's correction `network(z, gamma) - z`.

    A near-optimal denoiser (its ELBO is close to the data's NLL, and as sensitive as it to the
    precision of z_t) whose output goes through the network.
    """

    def __init__(self, data, network, **kwargs):
        super().__init__(network, **kwargs)
        self.posterior = PosteriorDenoiser(data)

    def call(self, z_t, gamma_t, training=None):
        return self.posterior(z_t, gamma_t) + (self.network(z_t, gamma_t, training=training) - z_t)


def test_elbo_with_a_bfloat16_network_matches_float32_within_its_monte_carlo_error(data, network_pair):
    """Same weights, images and seeds: the bfloat16 network's ELBO (6.384 bpd; NLL 6.072) differs
    from the float32 one's by 4e-4 bpd, against a Monte-Carlo standard error of 0.036. Rounding
    z_t to bfloat16 before the denoiser costs about 0.08 bpd."""
    models = [VDM(PosteriorPlusNetwork(data, net), schedules.FixedLinear(), IMAGE_SHAPE) for net in network_pair]
    means = np.array(
        [
            [model.elbo(data.sample(1024, seed=1000 + i), seed=i)["bpd"].numpy().mean() for model in models]
            for i in range(8)
        ]
    )
    (full, mixed), (stderr, _) = means.mean(0), means.std(0, ddof=1) / np.sqrt(len(means))
    assert abs(mixed - full) < stderr, (mixed, full, stderr)
    # An ELBO: above the data's NLL (the network's correction costs about 0.3 bpd here).
    assert full > data.nll_bpd() - 3 * stderr and stderr < 0.05, (full, stderr, data.nll_bpd())


class Spy(AroundNetwork):
    """Passes its inputs to the network and records them (call it eagerly)."""

    def __init__(self, network, **kwargs):
        super().__init__(network, **kwargs)
        self.inputs = []

    def call(self, z_t, gamma_t, training=None):
        self.inputs.append((z_t, gamma_t))
        return self.network(z_t, gamma_t, training=training)


def bfloat16_representable(x):
    return np.asarray(tf.cast(tf.cast(x, tf.bfloat16), tf.float32) == x)


def test_z_t_gamma_and_the_loss_terms_stay_float32(data, network_pair):
    """The denoiser receives float32 z_t and gamma_t at full precision (a float32 z_t is almost
    never a bfloat16 number; one computed in bfloat16 always is). The prior and reconstruction
    terms, which do not involve the denoiser, are those of the float32 model bit for bit."""
    x = data.sample(64, seed=3)
    spies = [Spy(net) for net in network_pair]
    terms = [VDM(spy, schedules.FixedLinear(), IMAGE_SHAPE)(x) for spy in spies]  # eager
    ((z_t, gamma_t),) = spies[1].inputs[-1:]
    assert z_t.dtype == gamma_t.dtype == tf.float32
    assert bfloat16_representable(z_t).mean() < 0.01 and not bfloat16_representable(gamma_t).any()
    np.testing.assert_array_equal(z_t, spies[0].inputs[-1][0])
    full, mixed = terms
    assert {value.dtype for value in mixed.values()} == {tf.float32}
    for name in ("prior", "reconstruction"):
        np.testing.assert_array_equal(mixed[name], full[name])
    np.testing.assert_allclose(mixed["diffusion"], full["diffusion"], rtol=0.05)


class BFloat16Output(keras.layers.Layer):
    """A denoiser whose output is bfloat16, as a user's mixed-precision layer may return."""

    def __init__(self, data, **kwargs):
        super().__init__(**kwargs)
        self.posterior = PosteriorDenoiser(data)

    def call(self, z_t, gamma_t, training=None):
        return tf.cast(self.posterior(z_t, gamma_t), tf.bfloat16)


def test_a_bfloat16_denoiser_output_is_cast_to_float32_before_the_loss(data):
    model = VDM(BFloat16Output(data), schedules.FixedLinear(), IMAGE_SHAPE)
    x = data.sample(16, seed=4)
    terms = model.elbo(x, seed=0)
    assert {value.dtype for value in terms.values()} == {tf.float32}
    model.sample(2, num_steps=2, seed=0)
    assert model.score(tf.zeros((2, *IMAGE_SHAPE)), 0.5).dtype == tf.float32


def test_group_norm_of_bfloat16_activations_takes_float32_statistics():
    """Activations of mean 3 and spread 0.05: a bfloat16 mean is 0.008 off (its spacing at 3 is
    0.016), 0.16 standard deviations; in float32 only the output's rounding remains."""
    x = tf.cast(3.0 + 0.05 * tf.random.stateless_normal([4, 8, 8, 32], seed=[0, 5]), tf.bfloat16)
    scale, bias = tf.ones([32], tf.bfloat16), tf.zeros([32], tf.bfloat16)
    out = group_norm(x, scale, bias)
    assert out.dtype == tf.bfloat16
    expected = group_norm(tf.cast(x, tf.float32), tf.ones([32]), tf.zeros([32]))
    np.testing.assert_allclose(tf.cast(out, tf.float32), expected, atol=0.03)


# --------------------------------------------------------------------------------------------
# A network of the paper's width (n_embd = 128), built by `runs.build_model`, trained by `fit`.

CONFIG = runs.Config().replace(
    dataset="digits",
    n_layers=1,
    n_embd=128,
    attention=True,
    mixed_precision="bfloat16",
    batch_size=4,
    warmup_steps=0,
    jit_compile=False,
    ema_momentum=0.9,
)


@pytest.fixture(scope="module")
def trained():
    """(model, initial weights, fit history) after 3 steps: the learned monotone schedule with its
    variance objective (a second gradient), AdamW, EMA and dropout."""
    keras.utils.set_random_seed(0)
    model = runs.compiled_model(CONFIG)
    initial = [variable.numpy() for variable in model.trainable_variables]
    images = np.random.default_rng(0).integers(0, 256, (12, *model.image_shape), dtype=np.uint8)
    history = model.fit(tf.data.Dataset.from_tensor_slices(images).batch(4), epochs=1, verbose=0)
    return model, initial, history


def test_train_step_at_paper_width_runs_with_float32_variables(trained):
    model, initial, history = trained
    assert model.denoiser.dtype_policy.name == MIXED and model.denoiser.n_embd == 128
    assert np.all(np.isfinite(history.history["bpd"]))
    variables = model.variables + model.optimizer.variables
    assert {v.dtype for v in variables if tf.as_dtype(v.dtype).is_floating} == {"float32"}
    changed = [
        not np.array_equal(variable.numpy(), value) for variable, value in zip(model.trainable_variables, initial)
    ]
    assert np.mean(changed) > 0.9


def ops_by_function(concrete_function):
    """{function name ("" for the outer graph): Counter of (op type, dtype)} of a traced graph."""
    graph_def = concrete_function.graph.as_graph_def()

    def dtype(node):
        for key in ("T", "dtype"):
            if key in node.attr and node.attr[key].type:
                return tf.dtypes.as_dtype(node.attr[key].type).name

    functions = {"": graph_def.node} | {f.signature.name: f.node_def for f in graph_def.library.function}
    return {name: collections.Counter((node.op, dtype(node)) for node in nodes) for name, nodes in functions.items()}


def test_elbo_graph_runs_the_trunk_in_bfloat16_and_the_rest_in_float32(trained):
    model, _, _ = trained
    concrete = model.elbo_graph.get_concrete_function()
    ops = ops_by_function(concrete)
    everywhere = sum(ops.values(), collections.Counter())
    # Time embedding and Fourier features; the decoder's cross-entropy.
    for op in ("Sin", "Cos", "SparseSoftmaxCrossEntropyWithLogits"):
        assert {dtype for kind, dtype in everywhere if kind == op} == {"float32"}, op
    # The input convolution in float32, the blocks' and the output's in bfloat16.
    assert everywhere["Conv2D", "float32"] == 1 and everywhere["Conv2D", "bfloat16"] >= 5
    blocks = [
        function for function in concrete.graph.as_graph_def().library.function if "_block" in function.signature.name
    ]
    names = " ".join(function.signature.name for function in blocks)
    assert "resnet_block" in names and "attention_block" in names, names
    for function in blocks:
        # Activations and weights (autocast when the block reads them) arrive in bfloat16 ...
        assert {tf.dtypes.as_dtype(arg.type).name for arg in function.signature.input_arg} == {"bfloat16"}
        # ... and group normalization takes its statistics in float32.
        counts = ops[function.signature.name]
        assert counts["Mean", "float32"] >= 4 and counts["Mean", "bfloat16"] == 0
    outputs = concrete.structured_outputs
    assert {value.dtype for value in outputs.values()} == {tf.float32}


def layer_policies(model):
    """[(name, policy name)] of the denoiser and its layers, all levels, in order."""
    return [(layer.name, layer.dtype_policy.name) for layer in model.denoiser._flatten_layers(include_self=False)]


def test_keras_file_and_run_directory_keep_the_policy(trained, tmp_path):
    model, _, _ = trained
    x = np.random.default_rng(1).integers(0, 256, (4, *model.image_shape), dtype=np.uint8)
    expected = model.elbo(x, seed=0)["bpd"].numpy()
    model.save(tmp_path / "model.keras")
    runs.save_run(tmp_path / "run", CONFIG, model)
    for path in (tmp_path / "model.keras", tmp_path / "run"):
        loaded = vdm_tf.load(path)
        assert loaded.denoiser.dtype_policy.name == MIXED
        assert layer_policies(loaded) == layer_policies(model), path
        np.testing.assert_array_equal(loaded.elbo(x, seed=0)["bpd"], expected)


def test_exported_signatures_keep_their_dtypes(trained):
    from export.saved_model import ServingModule

    module = ServingModule(trained[0], time_samples=2)
    likelihood = module.likelihood.get_concrete_function()
    assert [spec.dtype for spec in likelihood.structured_input_signature[0]] == [tf.uint8, tf.int64]
    assert {value.dtype for value in likelihood.structured_outputs.values()} == {tf.float32}
