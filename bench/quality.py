"""Test bpd on the embedded digits against training wall-clock, with classical peers.

    python -m bench.quality                                  # digits, digits_cdm, digits_multiscale
    python -m bench.quality --presets=digits --evals=6       # the demo preset only
    python -m bench.quality --presets=digits_multiscale --nopeers   # add one curve to the results

1. Peers, fitted here on the same split as the models (`vdm_tf.datasets.digits_indices`): the
   digits take 17 values (0, 16, ..., 255), and each peer is a discrete distribution over them,
   its test negative log-likelihood in bits per dimension:
   - per-pixel categorical: one histogram per pixel (add-0.5 smoothing);
   - linear autoregressive: pixel i in raster order given pixels 0..i-1, a multinomial logistic
     regression per pixel (scikit-learn, C=1);
   - autoregressive MLP: the same with one hidden layer of 32 units (scikit-learn
     `MLPClassifier`, alpha=1).
2. Models: each preset of `--presets` trains for its `train_steps` with its optimizer (AdamW,
   warm-up, cosine decay, EMA); `--evals` times during training the EMA weights are evaluated
   on the test split (8 time samples per image; a CDM's one-step bpd). The clock counts
   training only, not the evaluations.

Prints a table of the final figures, writes bench/results/quality.json and draws the curves with
the peers as horizontal lines in bench/results/quality.png. With `--nopeers` the peers (their fit
takes about 20 minutes on a shared 2-core CPU) and the curves of the presets not trained in this
run are kept from the existing `--out` file, so one preset's curve can be re-measured alone.
"""

import dataclasses
import json
import os
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import sklearn.datasets  # noqa: E402
from absl import app, flags  # noqa: E402

import vdm_tf  # noqa: E402
from trainers import configs  # noqa: E402

flags.DEFINE_list("presets", ["digits", "digits_cdm", "digits_multiscale"], "Presets to train (digits data).")
flags.DEFINE_integer("evals", 6, "Test-set evaluations per training run, evenly spaced in steps.")
flags.DEFINE_bool("peers", True, "Fit the three peers; --nopeers keeps the peers and other curves of --out.")
flags.DEFINE_integer("train_steps", None, "Overrides every preset's train_steps (for quick checks).")
flags.DEFINE_string("out", "bench/results/quality.json", "Where to write the JSON results.")
flags.DEFINE_string("figure", "bench/results/quality.png", "Where to draw the curves.")
FLAGS = flags.FLAGS

LEVELS = 17  # the digits' pixel values 0..16, stored as round(v * 255 / 16)


# --------------------------------------------------------------------------------------------
# Peers: discrete distributions over the 17 levels, raster-order autoregressive or not.


def digits_levels(split):
    """The split's images as integer levels 0..16, [N, 64] (raster order)."""
    images = sklearn.datasets.load_digits().images.astype(int)
    return images[vdm_tf.datasets.digits_indices(split)].reshape(-1, 64)


def categorical_nll(train_values, test_values):
    """Nats of test_values under train_values' histogram (add-0.5 smoothing), summed."""
    counts = np.bincount(train_values, minlength=LEVELS) + 0.5
    return -np.log((counts / counts.sum())[test_values]).sum()


def conditional_nll(classifier, train, test, i):
    """Nats of pixel i of the test images given pixels 0..i-1, `classifier` fitted on the train images."""
    classifier.fit(train[:, :i] / (LEVELS - 1), train[:, i])
    probabilities = np.full((len(test), LEVELS), 1e-4)  # levels unseen at pixel i in training
    probabilities[:, classifier.classes_] = classifier.predict_proba(test[:, :i] / (LEVELS - 1))
    probabilities /= probabilities.sum(1, keepdims=True)
    return -np.log(probabilities[np.arange(len(test)), test[:, i]]).sum()


def peer_bpd(make_classifier, train, test):
    """bpd of a raster-order autoregressive model (per-pixel histograms where a classifier cannot fit)."""
    nats = 0.0
    for i in range(train.shape[1]):
        if make_classifier is None or i == 0 or len(np.unique(train[:, i])) == 1:
            nats += categorical_nll(train[:, i], test[:, i])
        else:
            nats += conditional_nll(make_classifier(), train, test, i)
    return nats / (test.size * np.log(2))


def peers():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    train, test = digits_levels("train"), digits_levels("test")
    kinds = {
        "per-pixel categorical": None,
        "linear autoregressive": lambda: LogisticRegression(C=1.0, max_iter=2000),
        "autoregressive MLP (32 hidden)": lambda: MLPClassifier((32,), alpha=1.0, max_iter=500, random_state=0),
    }
    results = {}
    for name, make_classifier in kinds.items():
        start = time.perf_counter()
        bpd = peer_bpd(make_classifier, train, test)
        results[name] = {"bpd": bpd, "fit_seconds": time.perf_counter() - start}
        print(f"{name:>32}: {bpd:.3f} bpd ({results[name]['fit_seconds']:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------------------------
# Models: learning curves against training wall-clock.


class LearningCurve(keras.callbacks.Callback):
    """Evaluates the EMA weights at every epoch end; the clock pauses while it does."""

    def __init__(self, config, test_data):
        super().__init__()
        self.config, self.test_data = config, test_data
        self.points, self.train_seconds = [], 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.train_seconds += time.perf_counter() - self.epoch_start
        with vdm_tf.runs.ema_weights(self.model):
            result = vdm_tf.evaluation.dataset_bpd(
                self.model, self.test_data, self.config.trainer.eval_time_samples, seed=self.config.trainer.seed
            )
        step = int(self.model.optimizer.iterations.numpy())
        self.points.append(
            {
                "step": step,
                "train_seconds": self.train_seconds,
                "bpd": result["bpd"],
                "stderr": result["stderr"],
                "train_bpd": float(logs["bpd"]) if logs else None,
            }
        )
        print(f"  step {step:>5}  {self.train_seconds:7.1f} s  test bpd {result['bpd']:.3f}", flush=True)


def learning_curve(preset):
    config = configs.PRESETS[preset]
    if FLAGS.train_steps:
        config = config.replace(train_steps=FLAGS.train_steps)
    model = vdm_tf.runs.compiled_model(config, seed=config.trainer.seed)
    train = vdm_tf.datasets.load("digits", "train", config.data.batch_size, seed=config.trainer.seed)
    test = vdm_tf.datasets.load("digits", "test", 32, shuffle=False, repeat=False, drop_remainder=False)
    curve = LearningCurve(config, test)
    steps_per_eval = -(-config.trainer.train_steps // FLAGS.evals)
    print(f"{preset}: {config.trainer.train_steps} steps, batch {config.data.batch_size}", flush=True)
    model.fit(train, steps_per_epoch=steps_per_eval, epochs=FLAGS.evals, verbose=0, callbacks=[curve])
    final = curve.points[-1]
    return {
        "config": dataclasses.asdict(config),
        "parameters": model.count_params(),
        "curve": curve.points,
        "bpd": final["bpd"],
        "stderr": final["stderr"],
        "train_seconds": final["train_seconds"],
        "seconds_per_step": final["train_seconds"] / final["step"],
        "load_average_after": os.getloadavg(),  # the clock depends on the other jobs of a shared CPU
    }


def bpd_at(curve, seconds):
    """Test bpd of a learning curve at `seconds` of training, interpolated between its evaluations.

    Mid-run points are pessimistic for a run that is longer than `seconds`: its learning rate
    has not decayed yet (cosine over `train_steps`).
    """
    return float(np.interp(seconds, [p["train_seconds"] for p in curve], [p["bpd"] for p in curve]))


def draw(models, peer_results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, result in sorted(models.items()):  # by name: a preset keeps its colour from run to run
        curve = result["curve"]
        axes.plot([p["train_seconds"] / 60 for p in curve], [p["bpd"] for p in curve], "o-", label=name)
    styles = iter(["--", "-.", ":"])
    for name, result in peer_results.items():
        axes.axhline(result["bpd"], color="gray", linestyle=next(styles), label=f"{name} ({result['bpd']:.2f})")
    axes.set_xlabel("training wall-clock (minutes, 2-core CPU)")
    axes.set_ylabel("test bpd (digits, 297 images)")
    lowest = min([p["bpd"] for r in models.values() for p in r["curve"]] + [r["bpd"] for r in peer_results.values()])
    axes.set_ylim(lowest - 0.15, max([r["bpd"] for r in peer_results.values()] + [lowest]) + 0.6)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv):
    del argv
    unknown = [name for name in FLAGS.presets if name not in configs.PRESETS]
    if unknown:
        raise app.UsageError(f"Unknown presets {', '.join(unknown)}; known: {', '.join(configs.PRESETS)}.")
    previous = {"peers": {}, "models": {}}
    if not FLAGS.peers and os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            previous = json.load(f)
    peer_results = peers() if FLAGS.peers else previous["peers"]
    models = {name: result for name, result in previous["models"].items() if name not in FLAGS.presets}
    models.update({preset: learning_curve(preset) for preset in FLAGS.presets})
    # Equal training wall-clock: every curve at the shortest run's clock (linear interpolation).
    clock = min(result["train_seconds"] for result in models.values()) if models else 0.0
    for result in models.values():
        result["bpd_at_shortest_clock"] = bpd_at(result["curve"], clock)
    print(f"\n{'model (digits test split)':>32}{'test bpd':>10}{'train s':>9}{'s/step':>8}{f'at {clock:.0f} s':>10}")
    for name, result in peer_results.items():
        print(f"{name:>32}{result['bpd']:>10.3f}{result['fit_seconds']:>9.0f}")
    for name, result in models.items():
        print(
            f"{name:>32}{result['bpd']:>10.3f}{result['train_seconds']:>9.0f}{result['seconds_per_step']:>8.3f}"
            f"{result['bpd_at_shortest_clock']:>10.3f}"
        )
    common.write_json(FLAGS.out, {"machine": common.machine(), "peers": peer_results, "models": models})
    print(f"wrote {FLAGS.out}")
    draw(models, peer_results, FLAGS.figure)


if __name__ == "__main__":
    app.run(main)
