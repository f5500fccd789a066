"""Official VDM checkpoints (google-research/vdm): the converted model computes what the official code does.

The fixtures in tests/fixtures/official_vdm/ were written by the official JAX/Flax code
(make_fixtures.py there): two checkpoints whose EMA weights differ from the raw ones, and the
official outputs under the EMA weights (oracle.npz).
"""

import json
import os
import shutil
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import tensorflow as tf

import vdm_tf
from export import saved_model
from vdm_tf import cli, convert, runs
from vdm_tf.compression import BitsBackCodec

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "official_vdm")
CASES = ("dev_scalar", "dev_nnet_attention")
NUM_DIMS = 32 * 32 * 3


def case_path(case, *parts):
    return os.path.join(FIXTURES, case, *parts)


def checkpoint_of(case):
    return case_path(case, "checkpoint", "checkpoints-0.flax")


@pytest.fixture(scope="module")
def converted():
    """{case: (converted model, oracle)}: each checkpoint converted once for the whole module."""
    out = {}
    for case in CASES:
        model = convert.from_checkpoint(checkpoint_of(case), case_path(case, "official_config.json"))
        out[case] = model, dict(np.load(case_path(case, "oracle.npz")))
    return out


@pytest.fixture(params=CASES)
def case(request, converted):
    return converted[request.param]


def network_error(model, oracle):
    """max |eps_hat - official eps_hat| over the scale of the network's own output, eps_hat - z."""
    eps_hat = model.denoiser(tf.constant(oracle["z"]), tf.constant(oracle["g_t"]), training=False).numpy()
    return np.abs(eps_hat - oracle["eps_hat"]).max() / np.std(oracle["eps_hat"] - oracle["z"])


# --------------------------------------------------------------------------------------------
# The converted model against the official outputs.


def test_eps_hat_equals_the_official_network(case):
    model, oracle = case
    assert network_error(model, oracle) < 1e-4


def test_schedule_and_its_derivative_equal_the_official_ones(case):
    model, oracle = case
    gamma, dgamma = model.schedule.gamma_and_derivative(tf.constant(oracle["t_grid"]))
    np.testing.assert_allclose(gamma.numpy(), oracle["gamma_grid"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(dgamma.numpy(), oracle["dgamma_grid"], rtol=1e-4, atol=0)


def test_loss_terms_with_the_official_time_and_noise(case, monkeypatch):
    """VDM's own loss code, fed the oracle's t, eps_0 (reconstruction) and eps (diffusion)."""
    model, oracle = case
    noise = {"_diffusion_terms": oracle["eps"], "_reconstruction_loss": oracle["eps0"]}

    def given_noise(seed, example_index, shape):
        return tf.constant(noise[sys._getframe(1).f_code.co_name])  # which loss term asks

    monkeypatch.setattr(vdm_tf.seeding, "per_example_normal", given_noise)
    monkeypatch.setattr(model, "_time_samples", lambda *args: tf.constant(oracle["t"]))
    terms, _ = model._loss_terms(tf.constant(oracle["images"]), vdm_tf.seeding.as_seed(0), training=False)
    nats = NUM_DIMS * np.log(2.0)
    for term, key in (("reconstruction", "loss_recon"), ("prior", "loss_klz"), ("diffusion", "loss_diff")):
        np.testing.assert_allclose(terms[term].numpy() * nats, oracle[key], rtol=1e-4, atol=1e-4, err_msg=term)
    np.testing.assert_allclose(terms["bpd"].numpy(), oracle["bpd"], rtol=1e-4)


def test_monte_carlo_bpd_terms_match_the_official_estimates(case):
    """model.elbo's per-image means within 4 standard errors of the official ones; the prior exactly.

    Both sides stratify each image's times the same way (K copies of the image, antithetic over
    the batch); the standard error of the difference combines both estimates' errors.
    """
    model, oracle = case
    draws = [model.elbo(oracle["images"], seed=seed, num_time_samples=16) for seed in range(4)]
    for term in ("bpd", "diffusion", "reconstruction"):
        values = np.stack([draw[term].numpy() for draw in draws])
        mean, se = values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values))
        official, official_se = oracle[f"{term}_mc_mean"], oracle[f"{term}_mc_se"]
        bound = 4 * np.sqrt(se**2 + official_se**2) + 1e-6  # reconstruction is ~0 for the nnet case
        assert np.all(np.abs(mean - official) < bound), (term, mean, official, bound)
    # The prior term is deterministic: equal up to float32 rounding. Each of its 3072 terms is a
    # difference of numbers near 1 (var_1 - log var_1 - 1 with var_1 ~ 0.998), so float32 leaves
    # about 1e-7 bpd of rounding in either implementation (the official value is 4e-8 bpd off the
    # float64 one for these images).
    np.testing.assert_allclose(draws[0]["prior"].numpy(), oracle["prior_bpd"], rtol=1e-5, atol=2e-7)


def test_raw_params_are_not_the_evaluated_model(converted):
    """The oracle tells the weights apart: the raw `params` miss it, `ema_params` (default) hit it."""
    model, oracle = converted["dev_scalar"]
    config = case_path("dev_scalar", "official_config.json")
    raw = convert.from_checkpoint(checkpoint_of("dev_scalar"), config, weights="params")
    assert network_error(raw, oracle) > 1e-2
    assert network_error(model, oracle) < 1e-4


# --------------------------------------------------------------------------------------------
# The converted model in every vdm_tf tool.


def test_exported_likelihood_equals_model_elbo(converted, tmp_path):
    model, oracle = converted["dev_scalar"]
    path = saved_model.export_model(model, str(tmp_path), score_sde=False, warmup=False, time_samples=2)
    loaded = tf.saved_model.load(path)
    images = oracle["images"]
    served = loaded.signatures["likelihood"](images=tf.constant(images), seed=tf.constant(5, tf.int64))
    expected = model.elbo(images, seed=5, num_time_samples=2)
    np.testing.assert_allclose(served["bpd"].numpy(), expected["bpd"].numpy(), rtol=1e-6)


def test_bits_back_codes_an_image_losslessly(converted):
    model, oracle = converted["dev_scalar"]
    image = oracle["images"][1:2]  # the smooth one
    codec = BitsBackCodec(model, num_steps=4, batch_size=1)
    np.testing.assert_array_equal(codec.decode(codec.encode(image)), image)


# --------------------------------------------------------------------------------------------
# The checkpoint reader.


def _flax_ext(value):
    """flax.serialization's msgpack encoding of arrays (ext 1) and NumPy scalars (ext 3)."""
    code = 1 if isinstance(value, np.ndarray) else 3
    array = np.asarray(value)
    return msgpack.ExtType(code, msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True))


def flax_bytes(state):
    """What `flax.serialization.msgpack_serialize` writes for a state dict of NumPy values."""
    return msgpack.packb(state, default=_flax_ext, strict_types=True)


def test_reader_decodes_every_byte_of_an_official_checkpoint():
    """Re-encoding what the reader decoded (opt_state included) gives the official file back."""
    with open(checkpoint_of("dev_scalar"), "rb") as f:
        original = f.read()
    state = convert.read_checkpoint(checkpoint_of("dev_scalar"), keys=("step", "params", "ema_params", "opt_state"))
    assert list(state) == ["step", "params", "ema_params", "opt_state"] and state["step"] == 123456
    assert flax_bytes(state) == original


def test_reader_joins_chunked_arrays_and_reads_numpy_scalars(tmp_path):
    """Arrays over 2 GB are stored by flax as {"__msgpack_chunked_array__", shape, chunks}."""
    state = convert.read_checkpoint(checkpoint_of("dev_scalar"), keys=("step", "params", "ema_params"))
    kernel = state["ema_params"]["score_model"]["conv_in"]["kernel"]
    flat = kernel.reshape(-1)
    chunked = {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): n for i, n in enumerate(kernel.shape)},
        "chunks": {str(i): flat[start : start + 1000] for i, start in enumerate(range(0, flat.size, 1000))},
    }
    state["ema_params"]["score_model"]["conv_in"]["kernel"] = chunked
    state["step"] = np.int64(7)
    path = tmp_path / "chunked.flax"
    path.write_bytes(flax_bytes(state))
    read = convert.read_checkpoint(str(path))
    assert read["step"] == 7 and isinstance(read["step"], np.int64)
    np.testing.assert_array_equal(read["ema_params"]["score_model"]["conv_in"]["kernel"], kernel)


def test_checkpoint_given_as_file_prefix_or_clu_directory(tmp_path):
    flax_file = checkpoint_of("dev_scalar")
    assert convert.checkpoint_file(flax_file) == flax_file
    assert convert.checkpoint_file(flax_file[: -len(".flax")]) == flax_file  # the clu prefix
    assert convert.checkpoint_file(os.path.dirname(flax_file)) == flax_file
    # A clu directory: ckpt-<n>.flax files and TensorFlow's `checkpoint` index naming the latest.
    for number in (2, 10):
        shutil.copy(flax_file, tmp_path / f"ckpt-{number}.flax")
    assert convert.checkpoint_file(str(tmp_path)) == str(tmp_path / "ckpt-10.flax")
    index = f'model_checkpoint_path: "{tmp_path}/ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n'
    (tmp_path / "checkpoint").write_text(index)
    assert convert.checkpoint_file(str(tmp_path)) == str(tmp_path / "ckpt-2.flax")


# --------------------------------------------------------------------------------------------
# The command line.


def run_cli(capsys, *args):
    """(exit status, its line) of `convert.main` as `cli.run` ends it: a Failure is status 1."""
    try:
        convert.main(list(args))
    except cli.Failure as failure:
        return 1, str(failure)
    return 0, capsys.readouterr().err.strip()


def test_command_line_writes_a_keras_file_and_a_run_directory(converted, tmp_path, capsys):
    """The converted model round-trips through both: same schedule class, same numbers."""
    model, oracle = converted["dev_nnet_attention"]
    output, run_dir = str(tmp_path / "m.keras"), str(tmp_path / "run")
    status, err = run_cli(
        capsys,
        f"--checkpoint={FIXTURES}/dev_nnet_attention/checkpoint",
        f"--output={output}",
        f"--model_dir={run_dir}",
        f"--official_config={case_path('dev_nnet_attention', 'official_config.json')}",
    )
    assert status == 0, err
    expected = model.elbo(oracle["images"], seed=1)["bpd"].numpy()
    for loaded in (vdm_tf.load(output), vdm_tf.load(run_dir)):
        assert type(loaded.schedule) is type(model.schedule)
        np.testing.assert_array_equal(loaded.elbo(oracle["images"], seed=1)["bpd"].numpy(), expected)
    assert runs.saved_config(run_dir).schedule.kind == "learned_monotonic"


def test_command_line_errors_are_one_line(tmp_path, capsys):
    scalar_config = case_path("dev_scalar", "official_config.json")
    truncated, text, bad_gamma = tmp_path / "half.flax", tmp_path / "notes.flax", tmp_path / "gamma.json"
    no_attention = tmp_path / "no_attention.json"
    fields = convert.official_config(case_path("dev_nnet_attention", "official_config.json"))
    no_attention.write_text(json.dumps(fields | {"with_attention": False}))
    with open(checkpoint_of("dev_scalar"), "rb") as f:
        truncated.write_bytes(f.read()[:1_000_000])
    text.write_text("these are not the weights you are looking for\n")
    bad_gamma.write_text(json.dumps(convert.official_config(scalar_config) | {"gamma_type": "cosine"}))
    output = f"--output={tmp_path / 'm.keras'}"
    cases = {
        "truncated flax checkpoint": (f"--checkpoint={truncated}", f"--official_config={scalar_config}"),
        "not a flax checkpoint": (f"--checkpoint={text}", f"--official_config={scalar_config}"),
        # The preset has 32 layers of width 128; the checkpoint 1 layer of width 32.
        "sm_n_embd=128 in the config, but score_model/conv_in/kernel has shape (3, 3, 15, 32)": (
            f"--checkpoint={checkpoint_of('dev_scalar')}",
            "--preset=cifar10",
        ),
        "with_attention=False in the config, but the checkpoint has attention blocks": (
            f"--checkpoint={checkpoint_of('dev_nnet_attention')}",
            f"--official_config={no_attention}",
        ),
        "unknown gamma_type 'cosine'": (
            f"--checkpoint={checkpoint_of('dev_scalar')}",
            f"--official_config={bad_gamma}",
        ),
        "no such file": (f"--checkpoint={tmp_path / 'missing'}", "--preset=cifar10"),
    }
    for expected, args in cases.items():
        status, err = run_cli(capsys, *args, output)
        assert status == 1 and expected in err and "\n" not in err, (expected, err)
    assert not (tmp_path / "m.keras").exists()


def test_shape_mismatch_names_the_layer_and_both_shapes(converted):
    params = convert.read_weights(checkpoint_of("dev_scalar"))
    config = convert.official_config(case_path("dev_scalar", "official_config.json"))
    params["score_model"]["up.block_1"]["conv2"]["kernel"] = np.zeros((3, 3, 32, 16), np.float32)
    expected = r"up\.block_1/conv2/kernel has shape \(3, 3, 32, 16\); the config needs \(3, 3, 32, 32\)"
    with pytest.raises(convert.ConversionError, match=expected):
        convert.check_params(params, config)


def test_command_line_fails_without_a_traceback(tmp_path):
    truncated = tmp_path / "half.flax"
    with open(checkpoint_of("dev_scalar"), "rb") as f:
        truncated.write_bytes(f.read()[:5000])
    result = subprocess.run(
        [sys.executable, "-m", "vdm_tf.convert", f"--checkpoint={truncated}", "--preset=cifar10", "--output=x.keras"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "vdm_tf.convert" in line or "Traceback" in line]
    message = f"{truncated}: a truncated flax checkpoint (it ends inside 'params')."
    assert lines == [f"python -m vdm_tf.convert: error: {message}"]
