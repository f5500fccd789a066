"""Train a noise-conditional classifier, and sample classes from a diffusion model with it.

    python -m trainers.classifier --model_dir=runs/digits_classifier                 # digits preset
    python -m trainers.classifier --mode=sample --model_dir=runs/digits_classifier \\
        --diffusion_dir=runs/demo --label=3 --guidance_scale=2                        # guided samples

The classifier (`vdm_tf.networks.NoiseConditionalClassifier`) learns p_t(y | z_t) at every noise
level in [gamma_min, gamma_max] (`vdm_tf.conditional.NoisyClassifier`, with `model.fit`); that
range must cover the gamma range of the diffusion model it will guide (the default covers every
VDM preset; a VE or sub-VP score model needs `--gamma_min`/`--gamma_max` from
`vdm_tf.score_model.gamma_range`). `--mode=sample` runs `vdm_tf.conditional.class_conditional_sample`
on a trained run of `trainers.main` and writes `guided_<label>.png` into the classifier's run directory.
Training resumes from its last backup after a kill (`keras.callbacks.BackupAndRestore`) and stops
with a message on a non-finite loss before anything is saved.

The command line checks its flags and directories before TensorFlow starts (`check_train_flags`,
`check_sample_flags`): a mistake is one line and exit code 1 within a fraction of a second;
Ctrl-C is exit code 130. Its outputs (`config.json`, `metrics.csv`, `classifier.keras`,
`guided_<label>.png`) are each written whole or not at all (`vdm_tf.files`).
"""

import dataclasses
import functools
import json
import math
import os
import sys

from absl import app, flags

from trainers import checks, configs
from vdm_tf import cli, dataset_table, files

# The samplers of `vdm_tf.samplers.SAMPLERS`, named here without importing TensorFlow (a test keeps them equal).
SAMPLERS = ("pc", "ancestral", "ode")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """A classifier training run (see `NoiseConditionalClassifier` for the network fields)."""

    dataset: str = "digits"
    n_layers: int = 1
    n_embd: int = 32
    num_resolutions: int = 2
    dropout: float = 0.1
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    batch_size: int = 128
    train_steps: int = 2000
    steps_per_epoch: int = 250  # a backup (resume point) and a line of metrics per "epoch"
    learning_rate: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        """Rejects values no run can use (so a bad flag fails before any work)."""
        if dataset_table.info(self.dataset).num_classes is None:
            raise ValueError(f"the {self.dataset} data set has no labels to train a classifier on.")
        for name in ("n_layers", "n_embd", "num_resolutions", "batch_size", "train_steps", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")
        if not (self.learning_rate > 0.0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0; got {self.learning_rate}.")
        if not (self.gamma_min < self.gamma_max and math.isfinite(self.gamma_min) and math.isfinite(self.gamma_max)):
            raise ValueError(f"gamma_min must be below gamma_max; got {self.gamma_min} and {self.gamma_max}.")


PRESETS = {
    "digits": ClassifierConfig(),
    "mnist": ClassifierConfig(dataset="mnist", n_layers=2, n_embd=64, train_steps=20_000, learning_rate=1e-3),
    # Song et al. (2021) guide CIFAR-10 with a noise-conditional Wide-ResNet-28-10; this is smaller.
    "cifar10": ClassifierConfig(
        dataset="cifar10", n_layers=2, n_embd=128, num_resolutions=3, train_steps=100_000, learning_rate=2e-4
    ),
}

# TensorFlow's C++ INFO and WARNING lines (a full disk's RESOURCE_EXHAUSTED, twice) repeat what the
# one-line error says; set before `cli.start()` imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FLAGS = flags.FLAGS
_CALLBACKS = ("StopOnNonFiniteLoss", "StopAtStep", "MetricsLog")


@functools.cache
def _callback_classes():
    """The Keras callbacks of a training run (defined on first use: Keras imports TensorFlow)."""
    import keras

    from trainers import train

    class StopOnNonFiniteLoss(keras.callbacks.Callback):
        """Raises before any later callback (the backup) can save a state with a NaN or inf loss."""

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise train.NonFiniteLossError(
                    f"Training stopped at batch {batch}: the loss is {loss}. The last backup is intact."
                )

    class StopAtStep(keras.callbacks.Callback):
        """Ends `fit` when the optimizer has made `steps` steps, in the middle of an epoch if need be."""

        def __init__(self, steps):
            super().__init__()
            self.steps = int(steps)

        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations) >= self.steps:
                self.model.stop_training = True

    class MetricsLog(keras.callbacks.Callback):
        """`metrics.csv` (as `keras.callbacks.CSVLogger` writes it), one whole line per epoch (`files.append_line`)."""

        def __init__(self, path):
            super().__init__()
            self.path = path

        def on_epoch_end(self, epoch, logs=None):
            names = sorted(logs or {})
            if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
                files.append_line(self.path, ",".join(["epoch", *names]))
            files.append_line(self.path, ",".join([str(epoch), *(str(float(logs[name])) for name in names)]))

    return {"StopOnNonFiniteLoss": StopOnNonFiniteLoss, "StopAtStep": StopAtStep, "MetricsLog": MetricsLog}


def __getattr__(name):
    if name in _CALLBACKS:
        return _callback_classes()[name]
    raise AttributeError(f"module 'trainers.classifier' has no attribute {name!r}")


def build(config):
    """The `NoisyClassifier` of a configuration, compiled."""
    import keras

    import vdm_tf

    info = dataset_table.info(config.dataset)
    network = vdm_tf.networks.NoiseConditionalClassifier(
        info.num_classes,
        config.n_layers,
        config.n_embd,
        config.num_resolutions,
        config.dropout,
        config.gamma_min,
        config.gamma_max,
    )
    noisy = vdm_tf.conditional.NoisyClassifier(
        network, info.image_shape, config.gamma_min, config.gamma_max, seed=config.seed
    )
    noisy.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    return noisy


def train_classifier(config, model_dir, verbose=1):
    """Trains (resuming if a backup exists), saves `classifier.keras`, returns test accuracy by gamma."""
    import keras

    import vdm_tf

    callback = _callback_classes()
    files.write_bytes(
        os.path.join(model_dir, "config.json"), (json.dumps(dataclasses.asdict(config), indent=2) + "\n").encode()
    )
    keras.utils.set_random_seed(config.seed)
    noisy = build(config)
    data = vdm_tf.datasets.load(config.dataset, "train", config.batch_size, seed=config.seed, with_labels=True)
    callbacks = [
        callback["StopOnNonFiniteLoss"](),
        callback["StopAtStep"](config.train_steps),  # the last epoch may be a part of one
        keras.callbacks.BackupAndRestore(os.path.join(model_dir, "backup")),
        callback["MetricsLog"](os.path.join(model_dir, "metrics.csv")),
    ]
    epochs = -(-config.train_steps // config.steps_per_epoch)
    noisy.fit(  # datasets.load shuffles; fit's own shuffle=True cannot apply to a tf.data.Dataset (and warns)
        data, epochs=epochs, steps_per_epoch=config.steps_per_epoch, callbacks=callbacks, verbose=verbose, shuffle=False
    )
    with files.atomic_path(os.path.join(model_dir, "classifier.keras")) as temporary:
        noisy.save(temporary)
    return accuracy_by_noise_level(noisy, config)


def accuracy_by_noise_level(noisy, config, gammas=(-10.0, -5.0, -2.0, 0.0, 2.0, 5.0), seed=0):
    """Test-split accuracy of p_t(y | z_t) at fixed noise levels: {gamma: accuracy}."""
    import numpy as np
    import tensorflow as tf

    import vdm_tf

    test_split = dataset_table.info(config.dataset).test_split
    test = vdm_tf.datasets.load(
        config.dataset, test_split, 256, shuffle=False, repeat=False, drop_remainder=False, with_labels=True
    )
    correct, total = np.zeros(len(gammas)), 0
    for x, labels in test:
        f = vdm_tf.images.encode(x)
        eps = tf.random.stateless_normal(tf.shape(f), [seed, total])
        for i, gamma in enumerate(gammas):
            z = math.sqrt(1 / (1 + math.exp(gamma))) * f + math.sqrt(1 / (1 + math.exp(-gamma))) * eps
            predictions = tf.argmax(noisy(z, tf.fill(tf.shape(f)[:1], gamma)), axis=-1)
            correct[i] += float(tf.reduce_sum(tf.cast(predictions == labels, tf.float32)))
        total += int(x.shape[0])
    return {gamma: correct[i] / total for i, gamma in enumerate(gammas)}


def saved_classes(model_dir):
    """How many classes the classifier run in `model_dir` knows (from its config.json), or a one-line error."""
    path = os.path.join(model_dir, "config.json")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return dataset_table.info(json.loads(data.decode("utf-8"))["dataset"]).num_classes
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else cli.one_line(error)
        raise cli.Failure(
            f"{path}: {reason}; expected the JSON object a classifier run writes (with its dataset)."
        ) from None


def check_label(label, num_classes):
    if not 0 <= label < num_classes:
        raise cli.Failure(f"--label must be a class of the classifier, 0..{num_classes - 1}; got {label}.")


def check_model_dir(model_dir):
    checks.path_flag("model_dir", model_dir, "the classifier's run directory")
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise cli.Failure(f"--model_dir={model_dir} is a file; expected the classifier's run directory.")


def check_train_flags(model_dir):
    """The configuration of --config and the overrides, or a one-line error; before any work."""
    overrides = {
        name: getattr(FLAGS, name)
        for name in ("train_steps", "batch_size", "learning_rate", "gamma_min", "gamma_max")
        if getattr(FLAGS, name) is not None
    }
    try:
        config = dataclasses.replace(PRESETS[FLAGS.config], **overrides)
    except ValueError as error:
        raise cli.Failure(error) from None
    checks.writable_directory(model_dir, "--model_dir", "the classifier's run directory")
    return config


def check_sample_flags(model_dir, diffusion_dir, label, num_samples, num_steps):
    """One-line errors for --mode=sample before any model is loaded (and before TensorFlow starts)."""
    if diffusion_dir is None or label is None:
        raise cli.Failure("--mode=sample needs --diffusion_dir (a run of trainers.main) and --label (a class).")
    checks.path_flag("diffusion_dir", diffusion_dir, "a run directory of trainers.main")
    for name, value in (("num_samples", num_samples), ("num_steps", num_steps)):
        if value < 1:
            raise cli.Failure(f"--{name} must be >= 1; got {value}.")
    if not os.path.isfile(os.path.join(model_dir, "classifier.keras")):
        raise cli.Failure(
            f"{model_dir} holds no trained classifier (classifier.keras): train it first with "
            f"python -m trainers.classifier --model_dir={model_dir}"
        )
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        check_label(label, saved_classes(model_dir))
    try:
        saved = configs.saved_config(diffusion_dir)
    except ValueError as error:
        raise cli.Failure(error) from None
    if saved is None:
        raise cli.Failure(f"--diffusion_dir={diffusion_dir} holds no diffusion run (no config.json).")
    if configs.latest_checkpoint(diffusion_dir) is None:
        raise cli.Failure(f"--diffusion_dir={diffusion_dir} holds no checkpoint; train it first with trainers.main.")
    checks.writable_directory(model_dir, "--model_dir", "the classifier's run directory")


def guided_samples(model_dir, diffusion_dir, label, scale, num_samples, sampler, num_steps, seed):
    """Class-`label` samples of the diffusion run in `diffusion_dir`, guided by this classifier."""
    import keras

    import vdm_tf
    from vdm_tf import conditional  # noqa: F401  (registers NoisyClassifier for load_model)

    model = vdm_tf.runs.restore_for_inference(diffusion_dir)
    noisy = keras.saving.load_model(os.path.join(model_dir, "classifier.keras"))
    check_label(label, vdm_tf.conditional.num_classes(noisy, model.image_shape))  # also without config.json
    return vdm_tf.conditional.class_conditional_sample(
        model, noisy, label, num_samples, scale=scale, sampler=sampler, num_steps=num_steps, seed=seed
    ).numpy()


def main(argv):
    checks.no_extra_arguments(argv)
    model_dir = FLAGS.model_dir
    check_model_dir(model_dir)
    if FLAGS.mode == "train":
        config = check_train_flags(model_dir)
    else:
        check_sample_flags(model_dir, FLAGS.diffusion_dir, FLAGS.label, FLAGS.num_samples, FLAGS.num_steps)
    cli.start()
    import vdm_tf
    from trainers import train

    train.quiet_info_logs()
    if FLAGS.mode == "train":
        try:
            accuracy = train_classifier(config, model_dir)
        except train.NonFiniteLossError as error:
            print(f"\n{error}", file=sys.stderr)
            sys.exit(3)
        print("test accuracy by gamma: " + ", ".join(f"{g:+.0f}: {a:.3f}" for g, a in accuracy.items()))
    else:
        samples = guided_samples(
            model_dir,
            FLAGS.diffusion_dir,
            FLAGS.label,
            FLAGS.guidance_scale,
            FLAGS.num_samples,
            FLAGS.sampler,
            FLAGS.num_steps,
            FLAGS.seed,
        )
        path = os.path.join(model_dir, f"guided_{FLAGS.label}.png")
        vdm_tf.images.save_grid(samples, path)
        print(f"wrote {path} ({len(samples)} samples of class {FLAGS.label}, guidance scale {FLAGS.guidance_scale})")


def parse_flags(argv):
    """absl's flag parsing, a wrong flag (`--batch_size=1.5`, `--mode=bogus`) made a `cli.Failure`."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        raise cli.Failure(f"{error} (--helpshort lists the flags)") from None


if __name__ == "__main__":
    flags.DEFINE_enum("mode", "train", ["train", "sample"], "train, or sample from a diffusion run with guidance.")
    flags.DEFINE_enum("config", "digits", list(PRESETS), "Preset.")
    flags.DEFINE_string("model_dir", "runs/classifier", "The classifier's run directory.")
    flags.DEFINE_integer("train_steps", None, "Override the preset's training steps.")
    flags.DEFINE_integer("batch_size", None, "Override the preset's batch size.")
    flags.DEFINE_float("learning_rate", None, "Override the preset's learning rate.")
    flags.DEFINE_float("gamma_min", None, "Lowest noise level trained on (default: the preset's).")
    flags.DEFINE_float("gamma_max", None, "Highest noise level trained on (default: the preset's).")
    flags.DEFINE_string("diffusion_dir", None, "sample: run directory of a trained trainers.main model.")
    flags.DEFINE_integer("label", None, "sample: the class to generate.")
    flags.DEFINE_float("guidance_scale", 1.0, "sample: guidance weight w (1: the exact conditional).")
    flags.DEFINE_integer("num_samples", 64, "sample: how many images.")
    flags.DEFINE_enum("sampler", "pc", list(SAMPLERS), "sample: the sampler.")
    flags.DEFINE_integer("num_steps", 500, "sample: steps of the pc / ancestral sampler.")
    flags.DEFINE_integer("seed", 0, "sample: seed.")
    cli.run(functools.partial(app.run, flags_parser=parse_flags), main, prog="python -m trainers.classifier")
