"""Classification Diffusion Model on digits: one-step likelihood vs the demo VDM's VLB and ODE likelihood.

    python -m bench.cdm --vdm_dir=runs/demo            # trains the digits_cdm preset, then compares
    python -m bench.cdm --steps=600 --ode_images=297

1. Trains the `digits_cdm` preset (trainers/configs.py; `--steps` overrides its train_steps) on
   the digits train split, from scratch, on this machine; the JSON records how long it trained
   (wall-clock and process CPU seconds, and the load average: the machine may be shared).
2. On the digits test split, bits per dimension and seconds per image of
   - the CDM's one-step likelihood (`cdm.one_step_bpd`, one classifier evaluation per image),
   - the demo VDM's VLB (`vdm.elbo`, `--vlb_time_samples` denoiser evaluations per image),
   - the demo VDM's probability-flow ODE likelihood (`vdm_tf.likelihood.ode_bpd`, uniform
     dequantisation like the one-step bpd, Hutchinson trace, rtol = atol = 1e-5) on the first
     `--ode_images` test images,
   and the ratio of each method's seconds per image to the CDM's.
3. The one-step bpd in parts: `-log N(f; 0, I)` (the prior at the last level), the classifier's
   log ratio `logit_0 - logit_{T+1}` split into the stretches of the level grid where it accrues
   (`logit_0 - logit_k` at the levels k of `--band_edges`), and the +7 of the dequantisation;
   beside it the exact split for the per-pixel categorical model of the train split (2.42 test
   bpd), whose terms below gamma = -8 hold for any model of the 17-value digits (the neighbouring
   pixel values are more than 7 noise standard deviations apart there).
4. Denoising: per-pixel MSE of the noise prediction, E (eps - eps_hat)^2, of the CDM
   (Theorem 3.1: the classifier's input gradient), of the VDM denoiser and of the best linear
   denoiser of the train split (Wiener filter; near the optimum at high noise, where the posterior
   mean is nearly linear), at several gamma, on the same test images (bin centres) and noise.

The demo VDM comes from `make demo` (runs/demo, EMA weights). Timings are wall-clock after one
untimed call (tracing), on whatever this machine is. Prints a table and writes
bench/results/cdm.json.
"""

import dataclasses
import math
import os
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from scipy.special import log_ndtr, logsumexp  # noqa: E402

import vdm_tf  # noqa: E402
from trainers import configs, train  # noqa: E402
from vdm_tf import cdm as cdm_lib  # noqa: E402

flags.DEFINE_string("vdm_dir", "runs/demo", "Run directory of the trained digits VDM.")
flags.DEFINE_integer("steps", None, "CDM training steps (default: the digits_cdm preset's train_steps).")
flags.DEFINE_integer("vlb_time_samples", 8, "Time samples per image of the VDM's VLB.")
flags.DEFINE_integer("ode_images", 32, "Test images scored with the (slow) ODE likelihood.")
flags.DEFINE_list(
    "gammas", ["-12", "-10", "-8", "-6", "-3", "0", "3", "4.9", "5", "8", "10"], "gamma of the denoising MSE."
)
flags.DEFINE_list("band_edges", ["-10", "-8", "-6", "-4", "-2", "0", "2"], "gamma boundaries of the log-ratio split.")
flags.DEFINE_string("out", "bench/results/cdm.json", "Where to write the JSON results.")
flags.register_validator("steps", lambda steps: steps is None or steps >= 10, "--steps must be at least 10.")
flags.register_validator(
    "vdm_dir", lambda path: os.path.exists(os.path.join(path, "config.json")),
    "--vdm_dir must be a trained digits VDM run directory (with config.json), e.g. runs/demo of `make demo`.",
)
FLAGS = flags.FLAGS


def load_config(model_dir):
    return vdm_tf.runs.saved_config(model_dir)


def train_cdm(config):
    """The CDM of `config` trained on the digits train split; returns (model, training record)."""
    batch_size, trainer = config.data.batch_size, config.trainer
    model = vdm_tf.runs.compiled_model(config, seed=trainer.seed, steps_per_execution=10)
    data = vdm_tf.datasets.load("digits", "train", batch_size=batch_size, seed=trainer.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(data, steps_per_epoch=trainer.train_steps // 10, epochs=10, verbose=2).history
    record = {
        "steps": 10 * (trainer.train_steps // 10),  # 10 epochs of train_steps // 10
        "batch_size": batch_size,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "load_average_1min": os.getloadavg()[0],
        "jit_compile": trainer.jit_compile,
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "last_epoch_means": {name: values[-1] for name, values in history.items()},
    }
    # The EMA weights, as the trainer evaluates.
    model.optimizer.finalize_variable_values(model.trainable_variables)
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


def likelihoods(cdm, vdm, test, seed):
    results = {}
    bpd, seconds = timed(lambda x: cdm.one_step_bpd(x, seed=seed), test, 64)
    results["cdm_one_step"] = summary(bpd, seconds, evaluations_per_image=1)
    k = FLAGS.vlb_time_samples
    bpd, seconds = timed(lambda x: vdm.elbo(x, seed=seed, num_time_samples=k)["bpd"], test, 64)
    results["vdm_vlb"] = summary(bpd, seconds, evaluations_per_image=k)
    nfe = []

    def ode(x):
        out = vdm_tf.likelihood.ode_bpd(vdm, x, seed=seed, dequantization="uniform")
        nfe.append(int(out["nfe"]))
        return out["bpd"]

    bpd, seconds = timed(ode, test[: FLAGS.ode_images], 32)
    results["vdm_ode"] = summary(bpd, seconds, evaluations_per_image=float(np.mean(nfe[1:])))
    for result in results.values():
        result["time_ratio_to_cdm"] = result["seconds_per_image"] / results["cdm_one_step"]["seconds_per_image"]
    return results


def per_pixel_log_density(train_images, f, alpha2=None):
    """log p_t(f) [N] of the per-pixel categorical model of `train_images` (add-0.5), dequantised.

    At level 0 (alpha2 None) the density of x + u, u ~ U[0, 1); at a level of the diffusion
    (alpha2 = alpha_t^2) that density scaled by alpha_t and convolved with N(0, 1 - alpha_t^2).
    """
    values = np.unique(train_images).astype(np.float64)
    flat = train_images.reshape(len(train_images), -1)
    counts = np.stack([(flat == v).sum(0) for v in values], axis=1) + 0.5  # [D, values]
    log_pi = np.log(counts / counts.sum(1, keepdims=True))
    low = 2 * values / vdm_tf.images.NUM_VALUES - 1  # bin k is [low_k, low_k + width)
    width = 2 / vdm_tf.images.NUM_VALUES
    f = f.reshape(len(f), -1)
    if alpha2 is None:
        k = np.searchsorted(values, np.floor((f + 1) / width), side="right") - 1
        return (np.take_along_axis(log_pi[None], k[..., None], axis=2)[..., 0] - np.log(width)).sum(1)
    alpha, sigma = math.sqrt(alpha2), math.sqrt(1 - alpha2)
    upper, lower = (f[..., None] - alpha * low) / sigma, (f[..., None] - alpha * (low + width)) / sigma
    log_bin = log_ndtr(upper) + np.log1p(-np.exp(np.minimum(log_ndtr(lower) - log_ndtr(upper), -1e-12)))
    return logsumexp(log_bin - np.log(alpha * width) + log_pi[None], axis=2).sum(1)


def one_step_parts(cdm, train_images, test, seed):
    """The test one-step bpd in parts, and the same split for the per-pixel categorical model.

    bpd = prior + ratio + 7 with prior = -log N(f; 0, I) / (D ln 2) and ratio = -(logit_0 -
    logit_{T+1}) / (D ln 2); `bands` splits the ratio at the levels nearest `--band_edges`.
    """
    f = cdm_lib.dequantize(test, tf.random.stateless_uniform(test.shape, vdm_tf.seeding.as_seed(seed)))
    logits = cdm.classifier(f, training=False).numpy()
    bits = cdm.num_dims * math.log(2.0)
    prior = -cdm.sde.prior_log_prob(f).numpy() / bits
    alpha2, sigma2 = (v.numpy() for v in cdm.denoiser.level_variances())
    gamma = np.log(sigma2[1:-1] / alpha2[1:-1])  # levels 1 .. T
    edges = [float(e) for e in FLAGS.band_edges]
    levels = [int(np.searchsorted(gamma, e)) for e in edges] + [cdm.num_levels + 1]
    names = [f"gamma < {e:g}" for e in edges] + [f"gamma < {gamma[-1]:.3g}, pure noise"]
    reference_log_p0 = per_pixel_log_density(train_images, f.numpy())
    reference_log_p = [
        per_pixel_log_density(train_images, f.numpy(), alpha2[k]) if k <= cdm.num_levels
        else cdm.sde.prior_log_prob(f).numpy() for k in levels
    ]
    bands, previous, reference_previous = {}, 0.0, 0.0
    for name, k, log_p in zip(names, levels, reference_log_p):
        ratio = float(np.mean(logits[:, 0] - logits[:, k])) / bits
        reference = float(np.mean(reference_log_p0 - log_p)) / bits
        bands[name] = {"cdm": ratio - previous, "per_pixel": reference - reference_previous}
        previous, reference_previous = ratio, reference
    return {
        "bpd": float(np.mean(prior) - previous + 7.0),
        "prior": float(np.mean(prior)),
        "log_ratio": -previous,
        "dequantization": 7.0,
        "per_pixel_bpd": float(np.mean(-reference_log_p0)) / bits + 7.0,
        "log_ratio_bands": bands,
    }


def pixel_moments(images):
    """(mean, covariance) of the pixels of uint8 `images` in f units (float64), one image per row."""
    f = vdm_tf.images.encode(images).numpy().reshape(len(images), -1).astype(np.float64)
    return f.mean(0), np.cov(f.T)


def linear_denoiser_mse(moments, f, z, alpha2):
    """Per-pixel E (eps - eps_hat)^2 of the best linear denoiser (Wiener filter) of the train split.

    With the train split's pixel mean m and covariance C (`moments`, f units), f_hat = m + alpha C
    (alpha^2 C + sigma^2 I)^-1 (z - alpha m) and eps - eps_hat = alpha (f_hat - f) / sigma. At high
    noise the posterior mean is nearly linear in z, so this is close to the best any denoiser can do.
    """
    mean, covariance = moments
    alpha, sigma2 = math.sqrt(alpha2), 1.0 - alpha2
    gain = alpha * covariance @ np.linalg.inv(alpha2 * covariance + sigma2 * np.eye(len(mean)))
    f, z = (np.asarray(v, np.float64).reshape(len(v), -1) for v in (f, z))
    f_hat = mean + (z - alpha * mean) @ gain.T
    return float(alpha2 / sigma2 * np.mean(np.square(f_hat - f)))


def denoising(cdm, vdm, train_images, test, seed):
    """Per-pixel E (eps - eps_hat)^2 of both denoisers and the linear one at each gamma, same images and noise."""
    f, moments = vdm_tf.images.encode(test), pixel_moments(train_images)
    eps = tf.random.stateless_normal(tf.shape(f), vdm_tf.seeding.as_seed(seed))
    rows = []
    for gamma in map(float, FLAGS.gammas):
        alpha2 = 1 / (1 + math.exp(gamma))
        z = math.sqrt(alpha2) * f + math.sqrt(1 - alpha2) * eps
        gammas = tf.fill([len(test)], gamma)
        row = {"gamma": gamma}
        for name, model in (("cdm", cdm), ("vdm", vdm)):
            eps_hat = model.denoiser(z, gammas, training=False)
            row[f"{name}_mse"] = float(tf.reduce_mean(tf.square(eps - eps_hat)))
        row["linear_mse"] = linear_denoiser_mse(moments, f, z, alpha2)
        row["cdm_over_vdm"] = row["cdm_mse"] / row["vdm_mse"]
        row["cdm_over_linear"] = row["cdm_mse"] / row["linear_mse"]
        rows.append(row)
    return rows


def main(argv):
    del argv
    vdm_config = load_config(FLAGS.vdm_dir)
    vdm = train.restore_for_inference(FLAGS.vdm_dir, vdm_config)
    config = configs.PRESETS["digits_cdm"]
    if FLAGS.steps is not None:
        config = config.replace(train_steps=FLAGS.steps)
    cdm, training = train_cdm(config)
    train_images, test = vdm_tf.datasets.digits_arrays("train"), vdm_tf.datasets.digits_arrays("test")
    results = {
        "machine": common.machine(),
        "vdm": {"model_dir": FLAGS.vdm_dir, "config": dataclasses.asdict(vdm_config)},
        "cdm": {"preset": "digits_cdm", "config": dataclasses.asdict(config), "training": training},
        "likelihood": likelihoods(cdm, vdm, test, config.trainer.seed),
        "one_step_parts": one_step_parts(cdm, train_images, test, config.trainer.seed),
        "denoising": denoising(cdm, vdm, train_images, test, config.trainer.seed),
    }
    print(
        f"\nCDM trained {training['steps']} steps (batch {training['batch_size']}) in {training['seconds']:.0f} s "
        f"({training['cpu_seconds']:.0f} s of CPU; load average {training['load_average_1min']:.1f})"
    )
    print(f"\n{'method':<14}{'bpd':>16}{'images':>8}{'evals/image':>13}{'s/image':>11}{'x CDM time':>12}")
    for name, r in results["likelihood"].items():
        print(
            f"{name:<14}{r['bpd']:>9.3f} +- {r['stderr']:.3f}{r['num_images']:>8}{r['evaluations_per_image']:>13.0f}"
            f"{r['seconds_per_image']:>11.5f}{r['time_ratio_to_cdm']:>12.1f}"
        )
    parts = results["one_step_parts"]
    print(
        f"\none-step bpd {parts['bpd']:.3f} = prior {parts['prior']:.3f} + log ratio {parts['log_ratio']:.3f} + 7; "
        f"its log ratio by stretch of the level grid (bits/dim), against the per-pixel model's "
        f"({parts['per_pixel_bpd']:.3f} bpd):"
    )
    for name, band in parts["log_ratio_bands"].items():
        print(f"  {name:<28}{band['cdm']:>8.3f}{band['per_pixel']:>8.3f}")
    print(f"\n{'gamma':>7}{'CDM eps MSE':>13}{'VDM eps MSE':>13}{'linear':>10}{'CDM / VDM':>11}{'CDM / linear':>14}")
    for row in results["denoising"]:
        print(
            f"{row['gamma']:>7.1f}{row['cdm_mse']:>13.5f}{row['vdm_mse']:>13.5f}{row['linear_mse']:>10.5f}"
            f"{row['cdm_over_vdm']:>11.2f}{row['cdm_over_linear']:>14.2f}"
        )
    common.write_json(FLAGS.out, results)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
