"""Classification Diffusion Model on digits: one-step likelihood vs the demo VDM's VLB and ODE likelihood.

    python -m bench.cdm                      # trains a small CDM for --steps, then compares
    python -m bench.cdm --steps=3000 --ode_images=297

1. Trains a CDM (`NoiseLevelClassifier`, T levels on FixedLinear(-13.3, 5)) on the digits train
   split for `--steps` steps, from scratch, on this machine: a briefly trained model, nowhere
   near convergence (the paper trains 500k steps); the JSON records how long it trained.
2. On the digits test split, bits per dimension and seconds per image of
   - the CDM's one-step likelihood (`cdm.one_step_bpd`, one classifier evaluation per image),
   - the demo VDM's VLB (`vdm.elbo`, `--vlb_time_samples` denoiser evaluations per image),
   - the demo VDM's probability-flow ODE likelihood (`vdm_tf.likelihood.ode_bpd`, uniform
     dequantisation like the one-step bpd, Hutchinson trace, rtol = atol = 1e-5) on the first
     `--ode_images` test images,
   and the ratio of each method's seconds per image to the CDM's.
3. Denoising: per-pixel MSE of the noise prediction, E (eps - eps_hat)^2, of the CDM
   (Theorem 3.1: the classifier's input gradient) and of the VDM denoiser, at several gamma, on
   the same test images (bin centres) and noise.

The demo VDM comes from `make demo` (runs/demo, EMA weights). Timings are wall-clock after one
untimed call (tracing), on whatever this machine is. Prints a table and writes
bench/results/cdm.json.
"""

import dataclasses
import json
import math
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import vdm_tf  # noqa: E402
from trainers import configs, train  # noqa: E402
from vdm_tf.cdm import CDM  # noqa: E402
from vdm_tf.networks.noise_level_classifier import NoiseLevelClassifier  # noqa: E402

flags.DEFINE_string("vdm_dir", "runs/demo", "Run directory of the trained digits VDM.")
flags.DEFINE_integer("steps", 600, "CDM training steps.")
flags.DEFINE_integer("batch_size", 64, "CDM training batch size.")
flags.DEFINE_float("learning_rate", 2e-3, "Peak AdamW learning rate (warm-up 100 steps, cosine decay to 5%).")
flags.DEFINE_integer("num_levels", 1000, "T, the CDM's diffusion levels.")
flags.DEFINE_integer("n_layers", 1, "ResNet blocks on the classifier's down path.")
flags.DEFINE_integer("n_embd", 32, "Channels of the classifier's blocks.")
flags.DEFINE_integer("head_channels", 256, "Channels of the classifier's last convolution (pooled into the logits).")
flags.DEFINE_float("cross_entropy_weight", 1e-3, "w of the CDM loss w * CE + MSE.")
flags.DEFINE_bool("jit_compile", True, "XLA for the training step (its second-order graph is many small ops).")
flags.DEFINE_integer("vlb_time_samples", 8, "Time samples per image of the VDM's VLB.")
flags.DEFINE_integer("ode_images", 32, "Test images scored with the (slow) ODE likelihood.")
flags.DEFINE_list("gammas", ["-10", "-6", "-3", "0", "3", "5"], "Noise levels (gamma) of the denoising MSE.")
flags.DEFINE_integer("seed", 0, "Seed of the training and evaluation randomness.")
flags.DEFINE_string("out", "bench/results/cdm.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS

SCHEDULE = (-13.3, 5.0)


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        fields = json.load(f)
    fields["fourier_exponents"] = tuple(fields["fourier_exponents"])
    return configs.Config(**fields)


def train_cdm():
    """A CDM trained on the digits train split for FLAGS.steps; returns (model, training record)."""
    keras.utils.set_random_seed(FLAGS.seed)
    classifier = NoiseLevelClassifier(
        FLAGS.num_levels, n_layers=FLAGS.n_layers, n_embd=FLAGS.n_embd, fourier_exponents=(3, 4), dropout=0.0,
        head_channels=FLAGS.head_channels,
    )
    model = CDM(
        classifier,
        vdm_tf.schedules.FixedLinear(*SCHEDULE),
        (8, 8, 1),
        num_levels=FLAGS.num_levels,
        cross_entropy_weight=FLAGS.cross_entropy_weight,
        seed=FLAGS.seed,
    )
    warmup = min(100, FLAGS.steps // 10)
    learning_rate = keras.optimizers.schedules.CosineDecay(
        0.0, FLAGS.steps - warmup, alpha=0.05, warmup_target=FLAGS.learning_rate, warmup_steps=warmup
    )
    optimizer = keras.optimizers.AdamW(learning_rate, beta_2=0.99, use_ema=True, ema_momentum=0.995)
    model.compile(optimizer=optimizer, steps_per_execution=10, jit_compile=FLAGS.jit_compile)
    data = vdm_tf.datasets.load("digits", "train", batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    start = time.perf_counter()
    history = model.fit(data, steps_per_epoch=FLAGS.steps // 10, epochs=10, verbose=2).history
    seconds = time.perf_counter() - start
    record = {
        "steps": FLAGS.steps,
        "batch_size": FLAGS.batch_size,
        "seconds": seconds,
        "jit_compile": FLAGS.jit_compile,
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "last_epoch_means": {name: values[-1] for name, values in history.items()},
    }
    return model, record


def timed(fn, images, batch_size):
    """(per-image outputs of fn over the images in batches, seconds per image after a warm-up call).

    Every function here runs one graph for any batch size, so two images trace it.
    """
    fn(images[:2])
    start = time.perf_counter()
    outputs = [np.asarray(fn(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs), (time.perf_counter() - start) / len(images)


def summary(bpd, seconds_per_image, **extra):
    return {
        "bpd": float(bpd.mean()),
        "stderr": float(bpd.std(ddof=1) / math.sqrt(bpd.size)),
        "num_images": int(bpd.size),
        "seconds_per_image": seconds_per_image,
        **extra,
    }


def likelihoods(cdm, vdm, test):
    results = {}
    bpd, seconds = timed(lambda x: cdm.one_step_bpd(x, seed=FLAGS.seed), test, 64)
    results["cdm_one_step"] = summary(bpd, seconds, evaluations_per_image=1)
    k = FLAGS.vlb_time_samples
    bpd, seconds = timed(lambda x: vdm.elbo(x, seed=FLAGS.seed, num_time_samples=k)["bpd"], test, 64)
    results["vdm_vlb"] = summary(bpd, seconds, evaluations_per_image=k)
    nfe = []

    def ode(x):
        out = vdm_tf.likelihood.ode_bpd(vdm, x, seed=FLAGS.seed, dequantization="uniform")
        nfe.append(int(out["nfe"]))
        return out["bpd"]

    bpd, seconds = timed(ode, test[: FLAGS.ode_images], 32)
    results["vdm_ode"] = summary(bpd, seconds, evaluations_per_image=float(np.mean(nfe[1:])))
    for result in results.values():
        result["time_ratio_to_cdm"] = result["seconds_per_image"] / results["cdm_one_step"]["seconds_per_image"]
    return results


def denoising(cdm, vdm, test):
    """Per-pixel E (eps - eps_hat)^2 of both denoisers at each gamma, same images and noise."""
    f = vdm_tf.images.encode(test)
    eps = tf.random.stateless_normal(tf.shape(f), vdm_tf.seeding.as_seed(FLAGS.seed))
    rows = []
    for gamma in map(float, FLAGS.gammas):
        z = math.sqrt(1 / (1 + math.exp(gamma))) * f + math.sqrt(1 / (1 + math.exp(-gamma))) * eps
        gammas = tf.fill([len(test)], gamma)
        row = {"gamma": gamma}
        for name, model in (("cdm", cdm), ("vdm", vdm)):
            eps_hat = model.denoiser(z, gammas, training=False)
            row[f"{name}_mse"] = float(tf.reduce_mean(tf.square(eps - eps_hat)))
        row["vdm_over_cdm"] = row["vdm_mse"] / row["cdm_mse"]
        rows.append(row)
    return rows


def main(argv):
    del argv
    vdm_config = load_config(FLAGS.vdm_dir)
    vdm = train.restore_for_inference(FLAGS.vdm_dir, vdm_config)
    cdm, training = train_cdm()
    test = vdm_tf.datasets.digits_arrays("test")
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "tensorflow": tf.__version__,
        "vdm": {"model_dir": FLAGS.vdm_dir, "config": dataclasses.asdict(vdm_config)},
        "cdm": {
            "num_levels": FLAGS.num_levels,
            "schedule": f"FixedLinear{SCHEDULE}",
            "classifier": cdm.classifier.get_config(),
            "cross_entropy_weight": FLAGS.cross_entropy_weight,
            "training": training,
        },
        "likelihood": likelihoods(cdm, vdm, test),
        "denoising": denoising(cdm, vdm, test),
    }
    print(f"\nCDM trained {training['steps']} steps (batch {training['batch_size']}) in {training['seconds']:.0f} s")
    print(f"\n{'method':<14}{'bpd':>16}{'images':>8}{'evals/image':>13}{'s/image':>11}{'x CDM time':>12}")
    for name, r in results["likelihood"].items():
        print(
            f"{name:<14}{r['bpd']:>9.3f} +- {r['stderr']:.3f}{r['num_images']:>8}{r['evaluations_per_image']:>13.0f}"
            f"{r['seconds_per_image']:>11.5f}{r['time_ratio_to_cdm']:>12.1f}"
        )
    print(f"\n{'gamma':>7}{'CDM eps MSE':>13}{'VDM eps MSE':>13}{'VDM / CDM':>11}")
    for row in results["denoising"]:
        print(f"{row['gamma']:>7.1f}{row['cdm_mse']:>13.4f}{row['vdm_mse']:>13.4f}{row['vdm_over_cdm']:>11.2f}")
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
