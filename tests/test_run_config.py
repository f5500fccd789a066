"""`Config` in sections (vdm_tf.run_config): every flat name of the command line and of the flat
`config.json` lands in its section, and a run directory written before there were sections
(tests/fixtures/run_flat_config) still loads, evaluates and resumes with the same numbers."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import vdm_tf
from trainers import configs, main, train
from vdm_tf import cli, run_config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run_flat_config")

# flat name -> (section, field) and a valid value other than the default, written out here rather
# than derived from vdm_tf.run_config, so that a flat name mapped to the wrong place fails.
FIELDS = {
    "model": ("model", "kind", "cdm"),
    "timesteps": ("model", "timesteps", 10),
    "num_levels": ("model", "num_levels", 20),
    "cross_entropy_weight": ("model", "cross_entropy_weight", 0.5),
    "multiscale_levels": ("model", "multiscale_levels", 1),
    "multiscale_end_times": ("model", "multiscale_end_times", (0.5,)),
    "multiscale_stage_networks": ("model", "multiscale_stage_networks", True),
    "augment": ("model", "augment", True),
    "decoder_alphabet": ("model", "decoder_alphabet", True),
    "parameterization": ("model", "parameterization", "velocity"),
    "latent_size": ("model", "latent_size", 20),
    "latent_k": ("model", "latent_k", 5),
    "encoder_layers": ("model", "encoder_layers", 3),
    "schedule_features": ("model", "schedule_features", 16),
    "schedule": ("schedule", "kind", "fixed_linear"),
    "gamma_min": ("schedule", "gamma_min", -10.0),
    "gamma_max": ("schedule", "gamma_max", 6.0),
    "minimize_variance": ("schedule", "minimize_variance", False),
    "sde": ("schedule", "sde", "ve"),
    "beta_min": ("schedule", "beta_min", 0.2),
    "beta_max": ("schedule", "beta_max", 10.0),
    "sigma_min": ("schedule", "sigma_min", 0.02),
    "sigma_max": ("schedule", "sigma_max", 40.0),
    "n_layers": ("network", "n_layers", 3),
    "n_embd": ("network", "n_embd", 24),
    "dropout": ("network", "dropout", 0.2),
    "fourier_features": ("network", "fourier_features", False),
    "fourier_exponents": ("network", "fourier_exponents", (3, 4)),
    "attention": ("network", "attention", True),
    "head_channels": ("network", "head_channels", 8),
    "mixed_precision": ("network", "mixed_precision", "bfloat16"),
    "optimizer": ("optimizer", "kind", "sgd"),
    "learning_rate": ("optimizer", "learning_rate", 0.5),
    "warmup_steps": ("optimizer", "warmup_steps", 7),
    "final_learning_rate_fraction": ("optimizer", "final_learning_rate_fraction", 0.3),
    "weight_decay": ("optimizer", "weight_decay", 0.2),
    "adam_beta1": ("optimizer", "adam_beta1", 0.8),
    "adam_beta2": ("optimizer", "adam_beta2", 0.95),
    "ema_momentum": ("optimizer", "ema_momentum", 0.5),
    "clip_norm": ("optimizer", "clip_norm", 2.0),
    "dataset": ("data", "dataset", "mnist"),
    "batch_size": ("data", "batch_size", 16),
    "train_steps": ("trainer", "train_steps", 9),
    "steps_per_execution": ("trainer", "steps_per_execution", 2),
    "jit_compile": ("trainer", "jit_compile", False),
    "seed": ("trainer", "seed", 5),
    "checkpoint_every": ("trainer", "checkpoint_every", 11),
    "keep_checkpoints": ("trainer", "keep_checkpoints", 2),
    "log_every": ("trainer", "log_every", 13),
    "sample_every": ("trainer", "sample_every", 17),
    "eval_every": ("trainer", "eval_every", 19),
    "eval_time_samples": ("trainer", "eval_time_samples", 3),
    "export_time_samples": ("trainer", "export_time_samples", 4),
    "sample_steps": ("trainer", "sample_steps", 19),
    "num_samples": ("trainer", "num_samples", 6),
}


def read(config, section, field):
    return getattr(getattr(config, section), field)


def flag_text(value):
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_of_flags(*argv, base=None):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", *argv])
    try:
        return main.config_from_flags(base)
    finally:
        flags.FLAGS.unparse_flags()


# Fields that only go with parameterization=velocity (tests/test_idode.py routes them).
VELOCITY_FIELDS = {"time_sampling", "flow_matching_weight"}
# MuLAN's fields (model.kind=mulan).
MULAN_FIELDS = {"latent_size", "latent_k", "encoder_layers", "schedule_features"}
# Fields added after the fixture run directory was written: its config.json lacks them.
NEWER_FIELDS = {"parameterization", "eval_every"} | VELOCITY_FIELDS | MULAN_FIELDS


def test_the_flat_names_are_those_of_the_flat_config_json():
    with open(os.path.join(FIXTURE, "config.json")) as f:
        flat = json.load(f)
    assert set(run_config.FLAT_NAMES) == set(FIELDS) | VELOCITY_FIELDS
    assert set(flat) == set(run_config.FLAT_NAMES) - NEWER_FIELDS


@pytest.mark.parametrize("name", list(FIELDS))
def test_each_flat_name_lands_in_its_section_from_python_json_and_both_flags(name):
    section, field, value = FIELDS[name]
    default = run_config.Config()
    routes = {
        "replace": default.replace(**{name: value}),
        "flat config.json": run_config.Config.from_json({name: value}),
        f"--config.{name}": config_of_flags(f"--config.{name}={flag_text(value)}", base=default),
        f"--config.{section}.{field}": config_of_flags(f"--config.{section}.{field}={flag_text(value)}", base=default),
    }
    for route, config in routes.items():
        assert read(config, section, field) == value, route
        others = {n: read(config, s, f) for n, (s, f, _) in FIELDS.items() if n != name}
        assert others == {n: read(default, s, f) for n, (s, f, _) in FIELDS.items() if n != name}, route


def test_the_flat_config_json_of_an_old_run_parses_to_its_sectioned_config(tmp_path):
    expected = run_config.Config(
        model=run_config.ModelConfig(decoder_alphabet=True),
        schedule=run_config.ScheduleConfig(gamma_min=-7.5),
        network=run_config.NetworkConfig(n_layers=1, n_embd=4, dropout=0.0, fourier_exponents=(3, 4)),
        optimizer=run_config.OptimizerConfig(
            learning_rate=8e-3, warmup_steps=1, final_learning_rate_fraction=0.05, ema_momentum=0.98
        ),
        data=run_config.DataConfig(dataset="digits", batch_size=64),
        trainer=run_config.TrainerConfig(
            train_steps=3,
            jit_compile=False,
            checkpoint_every=200,
            log_every=50,
            sample_every=100_000,
            eval_time_samples=1,
            sample_steps=2,
            num_samples=2,
        ),
    )
    config = run_config.saved_config(FIXTURE)
    assert config == expected
    # Written again, it is the nested form, which reads back to the same Config.
    run_config.save_config(str(tmp_path), config)
    nested = json.loads((tmp_path / "config.json").read_text())
    with open(os.path.join(FIXTURE, "config.json")) as f:
        flat = json.load(f)
    assert nested.pop("format_version") == 2
    written = {name: nested[section][field] for name, (section, field, _) in FIELDS.items()}
    assert {name: value for name, value in written.items() if name not in NEWER_FIELDS} == flat
    assert sum(len(fields) for fields in nested.values()) == len(flat) + len(NEWER_FIELDS)
    assert run_config.saved_config(str(tmp_path)) == config


def test_a_run_directory_written_before_sections_loads_with_its_numbers():
    """vdm_tf.load of the flat run directory gives the ELBO that the code of its time computed."""
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    model = vdm_tf.load(FIXTURE)
    assert model.count_params() == expected["count_params"]
    result = model.elbo(vdm_tf.datasets.digits_arrays("test")[:8], seed=expected["seed"])
    for name in ("bpd", "diffusion", "prior", "reconstruction"):
        np.testing.assert_allclose(result[name].numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_eval_and_resume_read_a_run_directory_written_before_sections(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(FIXTURE, run)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", "--mode=eval", f"--model_dir={run}", "--config.trainer.eval_time_samples=2"])
    try:
        config, _ = main.check_input(["main"])
    finally:
        flags.FLAGS.unparse_flags()
    assert config == run_config.saved_config(FIXTURE).replace(eval_time_samples=2)
    trainer = train.Trainer(config, run, tf.distribute.get_strategy(), verbose=False)
    assert trainer.restore() == 3  # a resumed run starts from the old checkpoint


def test_two_names_of_one_field_on_a_command_line_are_refused():
    with pytest.raises(cli.Failure, match=r"^--config.n_layers and --config.network.n_layers set the same field"):
        config_of_flags("--config.n_layers=2", "--config.network.n_layers=3")
    # A shortcut overrides a --config flag of its field, as it always did.
    assert config_of_flags("--config.data.batch_size=4", "--batch_size=8").data.batch_size == 8


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"format_version": 2, "network": {"n_leyers": 3}}, r"unknown fields network.n_leyers \(written by a newer"),
        ({"format_version": 2, "networks": {}}, r"unknown fields networks \(written by a newer"),
        ({"format_version": 3}, r"format_version 3: this vdm_tf reads version 2"),
        ({"format_version": 2, "network": [1]}, r"network: expected a JSON object of the section's fields"),
        ({"format_version": 2, "network": {"n_layers": 0}}, r"network.n_layers must be >= 1; got 0"),
        ({"format_version": 2, "model": {"kind": "cdm"}, "schedule": {"sde": "vp"}}, r"A CDM uses its own noise"),
    ],
)
def test_a_damaged_nested_config_json_names_the_field(tmp_path, fields, message):
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=message) as error:
        run_config.saved_config(str(tmp_path))
    assert "\n" not in str(error.value)


def test_presets_are_sectioned_configs_of_known_data_sets():
    for name, config in configs.PRESETS.items():
        assert isinstance(config, run_config.Config), name
        assert isinstance(config.network, run_config.NetworkConfig), name
    assert configs.PRESETS["digits_cdm"].model.kind == "cdm"
    assert configs.PRESETS["digits_multiscale"].model.multiscale_end_times == (0.75,)
