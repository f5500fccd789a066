"""Train, evaluate and sample a Variational Diffusion Model.

    python -m trainers.main                               # digits, on the CPU, a few minutes
    python -m trainers.main --config=cifar10 --model_dir=runs/cifar10 --config.batch_size=64
    python -m trainers.main --mode=eval --model_dir=runs/demo
    python -m trainers.main --mode=sample --model_dir=runs/demo

`--config=PRESET` picks a preset of `trainers.configs.PRESETS`; `--config.FIELD=VALUE` overrides
any field of `trainers.configs.Config`; `--dataset`, `--train_steps` and `--batch_size` (global)
are shortcuts for the fields of the same name. The run directory holds `config.json`, the
trained weights `model.weights.h5` (the EMA weights when EMA is on), `samples.png` and
`samples.npz`.
"""

import dataclasses
import json
import os
import typing

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # before TensorFlow is imported: see vdm_tf/__init__.py

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import vdm_tf  # noqa: E402
from trainers import configs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "train (then eval and sample), eval, or sample.")
flags.DEFINE_string("config", "digits", f"Preset: one of {', '.join(configs.PRESETS)}.")
flags.DEFINE_string("model_dir", "runs/default", "Run directory: config, weights, samples.")
flags.DEFINE_string("data_dir", None, "TensorFlow Datasets data directory.")
flags.DEFINE_string("dataset", None, "Shortcut for --config.dataset.")
flags.DEFINE_integer("train_steps", None, "Shortcut for --config.train_steps.")
flags.DEFINE_integer("batch_size", None, "Shortcut for --config.batch_size (global batch size).")

_SHORTCUTS = ("dataset", "train_steps", "batch_size")


def _define_config_flags():
    """One `--config.FIELD` flag per field of `Config`, typed like the field."""
    hints = typing.get_type_hints(configs.Config)
    for field in dataclasses.fields(configs.Config):
        name, kind = f"config.{field.name}", hints[field.name]
        help_text = f"Override Config.{field.name}."
        if kind is bool:
            flags.DEFINE_bool(name, None, help_text)
        elif kind is int:
            flags.DEFINE_integer(name, None, help_text)
        elif kind is float:
            flags.DEFINE_float(name, None, help_text)
        elif kind is tuple:
            flags.DEFINE_list(name, None, help_text + " Comma-separated integers.")
        else:
            flags.DEFINE_string(name, None, help_text)


_define_config_flags()


def config_from_flags():
    """The preset named by --config with every --config.FIELD and shortcut override applied."""
    if FLAGS.config not in configs.PRESETS:
        raise app.UsageError(f"Unknown --config={FLAGS.config}; presets: {', '.join(configs.PRESETS)}.")
    overrides = {}
    for field in dataclasses.fields(configs.Config):
        value = FLAGS[f"config.{field.name}"].value
        if value is not None:
            overrides[field.name] = tuple(int(v) for v in value) if field.type is tuple else value
    for name in _SHORTCUTS:
        if FLAGS[name].value is not None:
            overrides[name] = FLAGS[name].value
    return dataclasses.replace(configs.PRESETS[FLAGS.config], **overrides)


def _paths(model_dir):
    return {
        "config": os.path.join(model_dir, "config.json"),
        "weights": os.path.join(model_dir, "model.weights.h5"),
        "samples_png": os.path.join(model_dir, "samples.png"),
        "samples_npz": os.path.join(model_dir, "samples.npz"),
    }


def train(config, model_dir, data_dir):
    paths = _paths(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    with open(paths["config"], "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    model = configs.build_model(config)
    model.compile(optimizer=configs.build_optimizer(config, model), jit_compile=config.jit_compile)
    train_data = vdm_tf.datasets.load(
        config.dataset, "train", config.batch_size, seed=config.seed, data_dir=data_dir
    )
    steps_per_epoch = min(config.steps_per_epoch, config.train_steps)
    model.fit(train_data, epochs=-(-config.train_steps // steps_per_epoch), steps_per_epoch=steps_per_epoch)
    model.save_weights(paths["weights"])  # after fit: the EMA weights, when EMA is on
    return model


def restore(model_dir):
    """The config and trained model of a run directory."""
    paths = _paths(model_dir)
    with open(paths["config"]) as f:
        fields = json.load(f)
    fields["fourier_exponents"] = tuple(fields["fourier_exponents"])
    config = configs.Config(**fields)
    model = configs.build_model(config)
    model.load_weights(paths["weights"])
    return config, model


def evaluate(config, model, data_dir):
    test_split = vdm_tf.datasets.info(config.dataset).test_split
    test_data = vdm_tf.datasets.load(
        config.dataset, test_split, 256, shuffle=False, repeat=False, drop_remainder=False, data_dir=data_dir
    )
    result = vdm_tf.evaluation.dataset_bpd(model, test_data, config.eval_time_samples, seed=config.seed)
    terms = ", ".join(f"{name} {result[name]:.4f}" for name in ("diffusion", "prior", "reconstruction"))
    print(f"terms (bpd): {terms}")
    print(vdm_tf.evaluation.summary_line(result))
    return result


def sample(config, model, model_dir):
    paths = _paths(model_dir)
    samples = model.sample(config.num_samples, num_steps=config.sample_steps, seed=config.seed).numpy()
    picture = vdm_tf.images.grid(samples)
    picture = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
    zoom = max(1, 256 // max(picture.size))  # small images are shown enlarged, pixels kept sharp
    picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST).save(paths["samples_png"])
    np.savez_compressed(paths["samples_npz"], images=samples)
    print(f"wrote {paths['samples_png']} and {paths['samples_npz']} ({len(samples)} samples, {config.sample_steps} steps)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.mode == "train":
        config = config_from_flags()
        model = train(config, FLAGS.model_dir, FLAGS.data_dir)
    else:
        config, model = restore(FLAGS.model_dir)
    if FLAGS.mode in ("train", "sample"):
        sample(config, model, FLAGS.model_dir)
    if FLAGS.mode in ("train", "eval"):
        evaluate(config, model, FLAGS.data_dir)


if __name__ == "__main__":
    app.run(main)
