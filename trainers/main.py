"""Train, evaluate and sample a Variational Diffusion Model.

    python -m trainers.main                               # digits, on the CPU, a few minutes
    python -m trainers.main --config=cifar10 --model_dir=runs/cifar10 --config.batch_size=64
    python -m trainers.main --dataset=imagenet64 --config=imagenet64 --tpu=NAME --model_dir=gs://...
    python -m trainers.main --mode=eval --model_dir=runs/demo
    python -m trainers.main --mode=sample --model_dir=runs/demo
    python -m trainers.main --mode=export --model_dir=runs/demo    # SavedModel for TF-Serving

`--config=PRESET` picks a preset of `trainers.configs.PRESETS`; `--config.FIELD=VALUE` overrides
any field of `trainers.configs.Config` by its flat name (`--config.n_layers=2`, `--config.model=cdm`),
`--config.SECTION.FIELD=VALUE` by its path (`--config.network.n_layers=2`, `--config.model.kind=cdm`;
the sections: `vdm_tf.run_config`); `--dataset`, `--train_steps` and `--batch_size` (global)
are shortcuts for the fields of the same name. Rerunning a command on a run directory resumes
from its last checkpoint with the configuration saved there (flags given again override it).
`--mode=eval|sample|export` use the trained run as it is: of the overrides only those of
`INFERENCE_FIELDS` (how many samples, steps, time samples, the seed) apply; others are refused.

Bad input (a flag value, a missing run or data set, an existing export version, a directory
it cannot write to) ends the command with a one-line error and exit code 1; everything that can
be checked without TensorFlow is checked before TensorFlow starts (`check_input`). Ctrl-C ends
it with exit code 130 (`vdm_tf.cli.run`); every output is written whole or not at all, and a
rerun resumes from the last checkpoint.
"""

import functools
import os
import sys
import typing

from absl import app, flags

from trainers import checks, configs, distribute
from vdm_tf import cli, run_config

# TensorFlow's C++ INFO and WARNING lines (a full disk's RESOURCE_EXHAUSTED, twice) repeat what the
# one-line error says; set before `cli.start()` imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample", "export"], "train (then sample and eval), eval, sample or export."
)
flags.DEFINE_string("config", "digits", f"Preset: one of {', '.join(configs.PRESETS)}.")
flags.DEFINE_string("model_dir", "runs/default", "Run directory: config, checkpoints, logs, samples.")
flags.DEFINE_string("data_dir", None, "TensorFlow Datasets data directory.")
flags.DEFINE_enum("strategy", "auto", list(distribute.STRATEGIES), "tf.distribute strategy.")
flags.DEFINE_string("tpu", None, "TPU name or address (implies --strategy=tpu).")
flags.DEFINE_string("dataset", None, "Shortcut for --config.dataset.")
flags.DEFINE_integer("train_steps", None, "Shortcut for --config.train_steps.")
flags.DEFINE_integer("batch_size", None, "Shortcut for --config.batch_size (global batch size).")
flags.DEFINE_integer("steps_per_execution", None, "Shortcut for --config.steps_per_execution.")
flags.DEFINE_bool("export", False, "With --mode=train: also export the trained model for TF-Serving.")
flags.DEFINE_string("export_dir", None, "Exports go to EXPORT_DIR/NAME/VERSION (default: MODEL_DIR/export).")
flags.DEFINE_string("export_name", "vdm", "Model name of the export (TF-Serving's MODEL_NAME).")
flags.DEFINE_integer("export_version", None, "Version of the export (default: one more than the highest present).")
flags.DEFINE_bool("export_score_sde", False, "Also export exact_likelihood, inpaint and the pc / ode samplers.")
flags.DEFINE_integer(
    "export_importance_samples",
    1,
    "A MuLAN's exact_likelihood (with --export_score_sde): K truncated-normal dequantizations per image, "
    "combined by importance weights (the official --n_is).",
)

_SHORTCUTS = ("dataset", "train_steps", "batch_size", "steps_per_execution")  # flat names of Config fields
# The fields --mode=eval|sample|export can change (flat names): they do not touch the trained model.
INFERENCE_FIELDS = ("eval_time_samples", "export_time_samples", "sample_steps", "num_samples", "seed")


def _config_flag_names():
    """{NAME of a --config.NAME flag: (section, field)}: every field by its flat name and by its path."""
    names = {}
    for flat, path in run_config.FLAT_NAMES.items():
        names[flat] = names[path] = run_config.field_path(path)
    return names


_CONFIG_FLAGS = _config_flag_names()


def _kind(section, field):
    return typing.get_type_hints(run_config.SECTIONS[section])[field]


def _define_config_flags():
    """Two flags per field of `Config`, typed like the field: `--config.FLAT_NAME`, `--config.SECTION.FIELD`."""
    for name, (section, field) in _CONFIG_FLAGS.items():
        flag, kind, path = f"config.{name}", _kind(section, field), f"{section}.{field}"
        help_text = f"Override Config.{path}." if name == path else f"Override Config.{path} (--config.{path})."
        if kind is bool:
            flags.DEFINE_bool(flag, None, help_text)
        elif kind is int:
            flags.DEFINE_integer(flag, None, help_text)
        elif kind is float:
            flags.DEFINE_float(flag, None, help_text)
        elif kind is tuple:
            flags.DEFINE_list(flag, None, help_text + " Comma-separated numbers.")
        else:
            flags.DEFINE_string(flag, None, help_text)


_define_config_flags()


def _number(text, flag):
    """'7' -> 7, '0.5' -> 0.5; anything else is a one-line error naming `flag`."""
    try:
        return int(text) if text.strip().lstrip("-").isdigit() else float(text)
    except ValueError:
        raise cli.Failure(f"{flag} takes comma-separated numbers; got {text!r}.") from None


def overrides_from_flags():
    """{"section.field": (flag, value)} of every `--config.*` and shortcut flag given on the command line.

    A shortcut (`--batch_size`) overrides a `--config` flag of the same field; the two `--config`
    flags of one field (`--config.n_layers`, `--config.network.n_layers`) together are an error.
    """
    overrides = {}
    for name, (section, field) in _CONFIG_FLAGS.items():
        flag, path, value = f"--config.{name}", f"{section}.{field}", FLAGS[f"config.{name}"].value
        if value is None:
            continue
        if path in overrides:
            raise cli.Failure(f"{overrides[path][0]} and {flag} set the same field, {path}: give one of them.")
        if _kind(section, field) is tuple:
            value = tuple(_number(v, flag) for v in value)
        overrides[path] = (flag, value)
    for name in _SHORTCUTS:
        if FLAGS[name].value is not None:
            overrides[run_config.FLAT_NAMES[name]] = (f"--{name}", FLAGS[name].value)
    return overrides


def preset():
    """The `Config` of the preset named by --config, or a one-line error."""
    if FLAGS.config not in configs.PRESETS:
        raise cli.Failure(f"unknown --config={FLAGS.config}; presets: {', '.join(configs.PRESETS)}.")
    return configs.PRESETS[FLAGS.config]


def config_from_flags(base=None):
    """`base` (default: the preset named by --config) with every given override applied.

    Raises:
        cli.Failure: an unknown preset or a value `Config` rejects.
    """
    overrides = {path: value for path, (_, value) in overrides_from_flags().items()}
    try:
        return (base or preset()).replace(**overrides)
    except ValueError as error:
        raise cli.Failure(error) from None


def inference_config(saved, mode):
    """The saved config of a run with the overrides --mode=eval|sample|export can apply."""
    inference = {run_config.FLAT_NAMES[name] for name in INFERENCE_FIELDS}
    refused = [flag for path, (flag, _) in overrides_from_flags().items() if path not in inference]
    if FLAGS["config"].present:
        refused.insert(0, "--config")
    if refused:
        given = ", ".join(refused)
        raise cli.Failure(
            f"--mode={mode} uses the trained run as it was saved: {given} cannot change it "
            f"(only {', '.join('--config.' + name for name in INFERENCE_FIELDS)} apply)."
        )
    return config_from_flags(saved)


def _exists(path):
    if run_config.is_remote(path):
        import tensorflow as tf

        return tf.io.gfile.exists(path)
    return os.path.lexists(path)


def _is_directory(path):
    if run_config.is_remote(path):
        import tensorflow as tf

        return tf.io.gfile.isdir(path)
    return os.path.isdir(path)


def checked_config(model_dir, mode):
    """The run's configuration from the flags (and config.json), or a one-line error.

    No TensorFlow for a local `model_dir`.
    """
    if _exists(model_dir) and not _is_directory(model_dir):
        raise cli.Failure(f"--model_dir={model_dir} is a file; expected a run directory (new or existing).")
    try:
        saved = configs.saved_config(model_dir)
    except ValueError as error:  # not JSON, not UTF-8, unknown fields, a bad value
        raise cli.Failure(f"{error} Fix or remove it, or choose another --model_dir.") from None
    if mode == "train":
        return config_from_flags(saved)
    if saved is None:
        raise cli.Failure(
            f"{model_dir} holds no run (no config.json); train one first: --mode=train --model_dir={model_dir}"
        )
    config = inference_config(saved, mode)
    if run_config.latest_checkpoint(model_dir) is None:
        raise cli.Failure(f"{model_dir} holds no checkpoint yet: train (or resume) it first with --mode=train.")
    return config


def export_path(model_dir):
    """The export directory (EXPORT_DIR/NAME/VERSION goes in it); fails if --export_version exists."""
    export_dir = os.path.join(model_dir, "export") if FLAGS.export_dir is None else FLAGS.export_dir
    checks.path_flag("export_dir", export_dir, "the directory of exported models")
    name = FLAGS.export_name
    if not name or name.strip() != name or "/" in name or name in (".", ".."):
        raise cli.Failure(f"--export_name={name!r}: expected a model name (a non-empty directory name, no '/').")
    if FLAGS.export_version is None:
        return export_dir
    if FLAGS.export_version < 0:
        raise cli.Failure(f"--export_version must be >= 0 (TF-Serving's versions); got {FLAGS.export_version}.")
    path = os.path.join(export_dir, name, str(FLAGS.export_version))
    if _exists(path):
        raise cli.Failure(f"{path} exists: choose another --export_version (or leave it out for the next free one).")
    return export_dir


def check_importance_samples(config, exporting):
    """--export_importance_samples: K >= 1, and K > 1 only where it is used, a MuLAN's exact_likelihood."""
    k = FLAGS.export_importance_samples
    if k < 1:
        raise cli.Failure(f"--export_importance_samples must be >= 1 (dequantizations per image); got {k}.")
    if k == 1:
        return
    if not exporting:
        raise cli.Failure(
            "--export_importance_samples sets the export's exact likelihood: add --export (or --mode=export)."
        )
    if not FLAGS.export_score_sde:
        raise cli.Failure("--export_importance_samples sets the exact_likelihood signature: add --export_score_sde.")
    if config.model.kind != "mulan":
        raise cli.Failure(
            f"--export_importance_samples is for a MuLAN (model.kind=mulan: the official --n_is); "
            f"this run's model.kind is {config.model.kind}."
        )


def check_input(argv):
    """Every check of the command line that needs neither a model nor data: (config, export_dir).

    Local paths need no TensorFlow; a remote `--model_dir` or `--export_dir` (gs://) starts it
    for `tf.io.gfile`, after the checks of the flags themselves.
    """
    checks.no_extra_arguments(argv)
    mode = FLAGS.mode
    model_dir = checks.path_flag("model_dir", FLAGS.model_dir, "a run directory")
    if mode == "train" or FLAGS["config"].present:
        preset()
    overrides_from_flags()  # a list flag that is not numbers
    exporting = mode == "export" or (mode == "train" and FLAGS.export)
    export_dir = FLAGS.export_dir if exporting else None
    if any(run_config.is_remote(path) for path in (model_dir, export_dir or "")):
        cli.start()
    config = checked_config(model_dir, mode)
    check_importance_samples(config, exporting)
    export_dir = export_path(model_dir) if exporting else None
    if mode in ("train", "sample"):
        checks.writable_directory(model_dir, "--model_dir", "a run directory")
    if exporting:
        checks.writable_directory(export_dir, "--export_dir", "a directory for exports")
    return config, export_dir


def make_strategy():
    """The strategy of --strategy / --tpu; a TPU that cannot be reached is a one-line error."""
    try:
        return distribute.make_strategy(FLAGS.strategy, FLAGS.tpu)
    except Exception as error:  # noqa: BLE001  the TPU resolver fails with URLError, ValueError, RuntimeError...
        if FLAGS.strategy != "tpu" and not FLAGS.tpu:
            raise
        reason = cli.one_line(f"{type(error).__name__}: {error}")[:200]
        raise cli.Failure(f"--tpu={FLAGS.tpu}: cannot connect to the TPU ({reason}).") from None


def run_training(model_dir, strategy, config):
    """Trains (or resumes) and returns the trainer.

    If the start fails, the run directory is removed again when this call created it.
    """
    import shutil

    from trainers import train

    try:
        train.check_batch_size(config.data.batch_size, strategy)
    except ValueError as error:
        raise cli.Failure(error) from None
    created = not _exists(model_dir)
    try:
        trainer = train.Trainer(config, model_dir, strategy, FLAGS.data_dir)
        if trainer.cluster.is_chief:
            configs.save_config(model_dir, config)
    except BaseException:
        if created and not run_config.is_remote(model_dir):
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    try:
        trainer.train()
    except train.NonFiniteLossError as error:
        print(f"\n{error}", file=sys.stderr)
        sys.exit(3)
    return trainer


def final_evaluation(trainer):
    """The trainer's evaluation of its final weights (`Trainer.last_evaluation`), or None.

    With `eval_every` > 0 the trainer evaluates the last step itself; those are the weights of
    the last checkpoint that `--mode=train` evaluates for its summary, with the same helpers and
    seeds, so the summary prints these figures instead of computing them again. A run resumed
    at its end trains no step and has none.
    """
    evaluation = trainer.last_evaluation
    return evaluation if evaluation is not None and evaluation["step"] == trainer.step else None


def sample_quality(config, model, samples=None, data_dir=None):
    """FID / KID / precision / recall of the run's samples against its test split, under the data set's
    bundled feature network (`vdm_tf.evaluation.SampleQuality`; digits and photos), as one line; None for
    other data sets.

    `samples`: uint8 images the run has drawn (--mode=train reuses those of `sample`); else
    `trainer.num_samples` (default 64) are drawn with `trainer.sample_steps` ancestral steps and
    the run's seed. KID is the figure to read at this N (unbiased); FID is biased upwards at
    small N and compares only runs evaluated with the same number of samples.
    """
    import vdm_tf

    dataset, trainer = config.data.dataset, config.trainer
    if not vdm_tf.evaluation.SampleQuality.available(dataset):
        return None
    quality = vdm_tf.evaluation.SampleQuality(
        dataset, trainer.num_samples, trainer.sample_steps, trainer.seed, data_dir
    )
    return vdm_tf.evaluation.quality_line(quality(model, samples))


def evaluate(config, model, data_dir=None, samples=None, evaluated=None):
    """Prints the sample quality (`sample_quality`, where the data set has a feature network) and the test bpd.

    `evaluated`: the figures of these weights computed already (`final_evaluation`): printed
    as they are, nothing computed again. The summary line (`test bpd: ...`) comes last.
    """
    import vdm_tf

    if evaluated is None:
        quality = sample_quality(config, model, samples, data_dir)
    else:
        quality = evaluated["quality"] and vdm_tf.evaluation.quality_line(evaluated["quality"])
    if quality:
        print(quality)
    trainer = config.trainer
    if evaluated is None:
        result = vdm_tf.evaluation.heldout_bpd(
            model, config.data.dataset, trainer.eval_time_samples, trainer.seed, data_dir
        )
    else:
        result = evaluated["bpd"]
    names = [name for name in ("diffusion", "prior", "reconstruction") if name in result]
    terms = ", ".join(f"{name} {result[name]:.4f}" for name in names)
    if terms:
        print(f"terms (bpd): {terms}")
    else:  # a CDM: the one-step density, not a bound
        print("one-step bpd (CDM): a density at the dequantised pixel values, not a bound")
    print(vdm_tf.evaluation.summary_line(result))
    return result


def sample(config, model, model_dir):
    """Writes samples.png (a grid) and samples.npz (the uint8 images) into the run directory, each whole.

    Returns the samples. `python -m vdm_tf.metrics --fake=MODEL_DIR/samples.npz` scores them.
    """
    import numpy as np

    import vdm_tf
    from vdm_tf import files

    trainer = config.trainer
    samples = model.sample(trainer.num_samples, num_steps=trainer.sample_steps, seed=trainer.seed).numpy()
    png, npz = os.path.join(model_dir, "samples.png"), os.path.join(model_dir, "samples.npz")
    vdm_tf.images.save_grid(samples, png)
    with files.atomic_path(npz) as temporary:
        np.savez_compressed(temporary, images=samples)
    print(f"wrote {png} and {npz} ({len(samples)} samples, {trainer.sample_steps} steps)")
    return samples


def export_model(config, model, export_dir):
    import export

    path = export.export_model(
        model,
        export_dir,
        FLAGS.export_name,
        FLAGS.export_version,
        time_samples=config.trainer.export_time_samples,
        score_sde=FLAGS.export_score_sde,
        importance_samples=FLAGS.export_importance_samples,
    )
    print(f"exported {path}; its signatures (saved_model_cli show):")
    print(export.signature_summary(path))


def main(argv):
    model_dir, mode = FLAGS.model_dir, FLAGS.mode
    config, export_dir = check_input(argv)  # no TensorFlow yet (for local paths)
    cli.start()
    from trainers import train

    train.quiet_info_logs()
    if mode in ("train", "eval"):
        try:
            train.prepare_data(config.data.dataset, FLAGS.data_dir)
        except train.DataNotPreparedError as error:
            raise cli.Failure(error) from None
    evaluated = None
    if mode == "train":
        strategy = make_strategy()
        trainer = run_training(model_dir, strategy, config)
        if not distribute.cluster_info(strategy).is_chief:
            return
        evaluated = final_evaluation(trainer)
    model = train.restore_for_inference(model_dir, config)
    samples = sample(config, model, model_dir) if mode in ("train", "sample") else None
    if export_dir is not None:
        export_model(config, model, export_dir)
    if mode in ("train", "eval"):
        evaluate(config, model, FLAGS.data_dir, samples, evaluated)


def parse_flags(argv):
    """absl's flag parsing, a wrong flag (`--batch_size=1.5`, `--mode=bogus`) made a `cli.Failure`."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        raise cli.Failure(f"{error} (--helpshort lists the flags)") from None


if __name__ == "__main__":
    cli.run(functools.partial(app.run, flags_parser=parse_flags), main, prog="python -m trainers.main")
