"""vdm_tf.load and run directories (vdm_tf.runs): the library's own reader of trainer runs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import vdm_tf
from vdm_tf import runs

TINY = runs.Config(
    data=runs.DataConfig(dataset="digits"),
    network=runs.NetworkConfig(n_layers=1, n_embd=16, dropout=0.0),
    optimizer=runs.OptimizerConfig(ema_momentum=0.9),
)


def _perturbed(config, seed):
    """A model of `config` whose weights are moved off their initial values."""
    model = runs.compiled_model(config)
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        variable.assign(variable + 0.01 * rng.standard_normal(variable.shape).astype(np.float32))
    return model


def _assert_same_weights(a, b):
    assert len(a.weights) == len(b.weights)
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.path)


def test_save_run_then_load_gives_the_same_model(tmp_path):
    model = _perturbed(TINY, seed=1)
    run = str(tmp_path / "run")
    runs.save_run(run, TINY, model)
    assert runs.saved_config(run) == TINY
    loaded = vdm_tf.load(run)
    _assert_same_weights(model, loaded)
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    np.testing.assert_array_equal(model.elbo(x, seed=3)["bpd"].numpy(), loaded.elbo(x, seed=3)["bpd"].numpy())
    with pytest.raises(FileExistsError, match="already holds a run"):
        runs.save_run(run, TINY, model)


def test_load_takes_the_ema_weights_of_a_run(tmp_path):
    """A run's checkpoint holds raw and EMA weights; load gives the EMA ones, not the raw."""
    run = str(tmp_path / "run")
    model = _perturbed(TINY, seed=2)
    runs.save_config(run, TINY)
    ema = model.optimizer._model_variables_moving_average
    for average, variable in zip(ema, model.trainable_variables):
        average.assign(variable + 1.0)  # EMA weights differ from the raw ones by exactly 1
    tf.train.CheckpointManager(runs.model_checkpoint(model), runs.checkpoint_dir(run), max_to_keep=1).save(5)
    loaded = vdm_tf.load(run)
    for variable, restored in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(restored.numpy(), variable.numpy() + 1.0, rtol=0, atol=1e-6, err_msg=variable.path)


def test_load_reads_a_keras_file(tmp_path):
    model = _perturbed(TINY, seed=3)
    path = str(tmp_path / "model.keras")
    model.save(path)
    _assert_same_weights(model, vdm_tf.load(path))


def test_load_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        vdm_tf.load(str(tmp_path))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="expected a .keras file"):
        vdm_tf.load(str(text))
    (tmp_path / "run").mkdir()
    runs.save_config(str(tmp_path / "run"), TINY)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        vdm_tf.load(str(tmp_path / "run"))
    fields = TINY.flat() | {"from_the_future": 1}  # the flat config.json of earlier versions
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "config.json").write_text(__import__("json").dumps(fields))
    with pytest.raises(ValueError, match="unknown fields from_the_future"):
        vdm_tf.load(str(tmp_path / "future"))


def test_the_library_imports_nothing_from_trainers_or_export():
    code = (
        "import sys, vdm_tf, vdm_tf.runs, vdm_tf.compression, vdm_tf.convert\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trainers', 'export'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_decoder_alphabet_is_built_saved_and_loaded(tmp_path):
    config = TINY.replace(decoder_alphabet=True)
    model = _perturbed(config, seed=4)
    assert model.pixel_values == vdm_tf.datasets.info("digits").pixel_values
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert vdm_tf.load(path).pixel_values == model.pixel_values
    run = str(tmp_path / "run")
    runs.save_run(run, config, model)
    assert vdm_tf.load(run).pixel_values == model.pixel_values
    # At a large gamma_0 the 256-way decoder spreads mass over the 15 values between two levels.
    x = vdm_tf.datasets.digits_arrays("test")[:16]
    model.schedule._gamma_0.assign(-8.0)
    plain = vdm_tf.VDM(model.denoiser, model.schedule, model.image_shape)
    with_alphabet = model.elbo(x, seed=1)["reconstruction"].numpy()
    without = plain.elbo(x, seed=1)["reconstruction"].numpy()
    assert np.all(with_alphabet < without - 0.05), (with_alphabet, without)


def test_the_configuration_side_of_a_run_imports_no_tensorflow():
    """Config, its checks and config.json (vdm_tf.run_config, trainers.configs) load without TensorFlow,
    and vdm_tf.runs re-exports the same names."""
    code = (
        "import sys\n"
        "from vdm_tf import run_config\n"
        "from trainers import configs, checks, distribute\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported TensorFlow'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    from vdm_tf import run_config

    assert runs.Config is run_config.Config and runs.saved_config is run_config.saved_config


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"dataset": "d\xedgits"}'.encode("latin-1"), r"config.json: not a UTF-8 text file"),
        (b"{not json", r"config.json: not valid JSON \(Expecting property name"),
        (b"[1, 2]", r"config.json: expected a JSON object of Config fields; got a list"),
        (b'{"n_layers": "abc"}', r"config.json: network.n_layers must be an integer; got 'abc'"),
        (b'{"n_layers": true}', r"config.json: network.n_layers must be an integer; got True"),
        (b'{"dropout": 1}', r"config.json: network.dropout must be in \[0.0, 1.0\); got 1.0"),
        (b'{"fourier_exponents": [7, "8"]}', r"config.json: network.fourier_exponents must be a list of numbers"),
        (
            b'{"gamma_min": 5, "gamma_max": 5}',
            r"config.json: schedule.gamma_min must be below gamma_max; got 5.0 and 5.0",
        ),
    ],
)
def test_a_damaged_config_json_is_a_one_line_value_error(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        runs.saved_config(str(tmp_path))
    assert "\n" not in str(error.value)


def test_config_json_is_written_whole(tmp_path, monkeypatch):
    """A failed write leaves the config.json that was there (the run's), and no temporary."""
    runs.save_config(str(tmp_path), TINY)
    before = (tmp_path / "config.json").read_bytes()
    monkeypatch.setattr(os, "fsync", lambda descriptor: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="config.json failed: No space left on device; the file that was there"):
        runs.save_config(str(tmp_path), TINY.replace(n_layers=2))
    assert (tmp_path / "config.json").read_bytes() == before and os.listdir(tmp_path) == ["config.json"]
    assert runs.saved_config(str(tmp_path)) == TINY
