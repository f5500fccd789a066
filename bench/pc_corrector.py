"""The PC sampler's Langevin corrector on variance-preserving and variance-exploding models.

    python -m bench.pc_corrector                          # 22 minutes on 2 shared cores (load 6-10)
    python -m bench.pc_corrector --num_samples=4000 --steps=500,1000

Data: 16 independent pixels (4 x 4 x 1), each a discretised Gaussian, P(x = k) proportional to
N(f_k; mu, s^2) at the bin centres f_k, with mu from -0.5 to 0.5 and s from 0.1 to 0.4 across
the pixels. Its Bayes-optimal denoiser is exact: given z_t ~ N(alpha_t f, sigma_t^2), the
posterior over a pixel's 256 values is softmax(log P(k) + l_k) with l_k = -(z_t - alpha_t f_k)^2
/ (2 sigma_t^2), which is `vdm_tf.images.decoder_logits(z_t, gamma_t)`, and the noise prediction
is eps_hat = (z_t - alpha_t E[f | z_t]) / sigma_t. That denoiser drives three score models:

- `vp`: `ScoreSDEModel` on `VPSDE()` (beta 0.1..20),
- `ve`: `ScoreSDEModel` on `VESDE()` (sigma 0.01..50),
- `vdm`: a `VDM` on `FixedLinear(-13.3, 5)`, whose `.sde` is its variance-preserving `ScheduleSDE`.

Each row draws `--num_samples` uint8 images with `vdm_tf.samplers.sample(model, N, "pc", steps)`
and one predictor + corrector setting: Euler-Maruyama without corrector and reverse diffusion +
Langevin (snr 0.16) on `vp` and `vdm`, and on `ve` its default (reverse diffusion + Langevin).
Per pixel it reports the error of the sample mean in standard errors and the ratio of the sample
std to the reference's. The reference is what an exact sampler gives: data drawn from P, noised
to `sde.t_min` by q(z | x), then the samplers' own last step (Tweedie's denoised mean, rounded to
a pixel value), on `--reference_samples` draws; the standard errors include its noise. (On `vp`
and `vdm` the last step leaves the data as it is; on `ve`, sigma(t_min) = 0.01 is 1.3 bins.)

Writes bench/results/pc_corrector.json (`--output`) with the machine (CPU model from /proc/cpuinfo).
"""

import argparse
import os
import time

from vdm_tf import cli

IMAGE_SHAPE = (4, 4, 1)
SETTINGS = {
    "vp": (("euler_maruyama", "none"), ("reverse_diffusion", "langevin")),
    "ve": (("reverse_diffusion", "langevin"),),
    "vdm": (("euler_maruyama", "none"), ("reverse_diffusion", "langevin")),
}


def positive_integers(text, expected="comma-separated integers >= 1"):
    """An argparse type: comma-separated integers >= 1."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return values


def positive_integer(text):
    """An argparse type: one integer >= 1."""
    values = positive_integers(text, "an integer >= 1")
    if len(values) > 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return values[0]


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m bench.pc_corrector", description=__doc__.split("\n")[0])
    parser.add_argument("--num_samples", type=positive_integer, default=4000)
    parser.add_argument("--steps", type=positive_integers, default=[500, 1000], help="predictor steps, e.g. 500,1000")
    parser.add_argument("--reference_samples", type=positive_integer, default=200_000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--output", default="bench/results/pc_corrector.json")
    args = parser.parse_args(argv)
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise cli.Failure(f"--output: expected a file in an existing directory; {directory} is not one")
    return args


def main(argv=None):
    args = parse_args(argv)
    from bench import common

    common.prepare()
    import keras
    import numpy as np
    import tensorflow as tf

    from vdm_tf import VDM, images, samplers, schedules, score_model, sde

    mean = np.linspace(-0.5, 0.5, 16).reshape(IMAGE_SHAPE)
    std = np.linspace(0.1, 0.4, 16).reshape(IMAGE_SHAPE)
    centres = images.bin_centres().numpy().astype(np.float64)
    log_p = -0.5 * np.square((centres - mean[..., None]) / std[..., None])
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))  # [4, 4, 1, 256]
    data_mean = (np.exp(log_p) * centres).sum(-1).ravel()
    data_std = np.sqrt((np.exp(log_p) * np.square(centres)).sum(-1).ravel() - np.square(data_mean))

    class ExactDenoiser(keras.layers.Layer):
        """eps_hat of the discretised Gaussian: the posterior mean over the 256 values of each pixel."""

        def call(self, z, gamma, training=None):
            gamma = tf.broadcast_to(gamma, tf.shape(z)[:1])
            posterior = tf.nn.softmax(tf.constant(log_p, tf.float32) + images.decoder_logits(z, gamma))
            alpha, sigma = (images.per_example(tf.sqrt(tf.sigmoid(s * gamma)), 4) for s in (-1.0, 1.0))
            return (z - alpha * tf.reduce_sum(posterior * images.bin_centres(), -1)) / sigma

    models = {
        "vp": score_model.ScoreSDEModel(ExactDenoiser(), sde.VPSDE(), IMAGE_SHAPE),
        "ve": score_model.ScoreSDEModel(ExactDenoiser(), sde.VESDE(), IMAGE_SHAPE),
        "vdm": VDM(ExactDenoiser(), schedules.FixedLinear(-13.3, 5.0), IMAGE_SHAPE),
    }
    for model in models.values():
        model.build()

    def reference(model):
        """Pixel values an exact sampler ends with: x ~ P, z ~ q(z_{t_min} | x), decode(Tweedie)."""
        rng = np.random.default_rng(args.seed)
        cdf = np.cumsum(np.exp(log_p), -1)
        t_min = model.sde.t_min
        m, s = (float(v) for v in model.sde.marginal(tf.constant(t_min)))
        chunks = []
        for start in range(0, args.reference_samples, 4000):
            num = min(4000, args.reference_samples - start)
            x = np.minimum((rng.random((num, *IMAGE_SHAPE, 1)) > cdf).sum(-1), 255)
            z = m * centres[x] + s * rng.standard_normal(x.shape)
            x_hat = samplers.denoised_mean(model, tf.constant(z, tf.float32), tf.fill([num], float(t_min)))
            chunks.append(images.decode(x_hat).numpy())
        return centres[np.concatenate(chunks)].reshape(args.reference_samples, -1)

    def moments(f, ref):
        """Per-pixel mean error in standard errors and std ratio, f and ref: [N, 16] pixel values."""
        n, n_ref = len(f), len(ref)
        ref_std = ref.std(0, ddof=1)
        mean_z = (f.mean(0) - ref.mean(0)) / (ref_std * np.sqrt(1 / n + 1 / n_ref))
        ratio = f.std(0, ddof=1) / ref_std
        ratio_se = np.sqrt(1 / (2 * (n - 1)) + 1 / (2 * (n_ref - 1)))
        return {
            "max_abs_mean_error_se": round(float(np.abs(mean_z).max()), 2),
            "std_ratio_min": round(float(ratio.min()), 4),
            "std_ratio_max": round(float(ratio.max()), 4),
            "std_ratio_mean": round(float(ratio.mean()), 4),
            "max_abs_std_error_se": round(float(np.abs(ratio - 1).max() / ratio_se), 2),
            "mean_error_se": [round(float(v), 2) for v in mean_z],
            "std_ratio": [round(float(v), 4) for v in ratio],
        }

    start = time.time()
    rows = []
    references = {name: reference(model) for name, model in models.items()}
    for name, model in models.items():
        ref = references[name]
        data_ratio = ref.std(0, ddof=1) / data_std
        print(f"{name}: reference std / data std {data_ratio.min():.4f}..{data_ratio.max():.4f}", flush=True)
        for steps in args.steps:
            for predictor, corrector in SETTINGS[name]:
                options = dict(predictor=predictor, corrector=corrector)
                x, seconds = common.timed(samplers.sample, model, args.num_samples, "pc", steps, args.seed, **options)
                f = centres[x.numpy()].reshape(args.num_samples, -1)
                default = samplers.PC_DEFAULTS[samplers.pc_kind(model.sde)] == options
                row = {"model": name, "steps": steps, **options, "default": default, "seconds": round(seconds, 1)}
                rows.append(row | moments(f, ref))
                print(
                    f"{name:4s} {steps:5d} {predictor}+{corrector}{' (default)' if default else ''}: "
                    f"|mean error| <= {rows[-1]['max_abs_mean_error_se']} SE, std ratio "
                    f"{rows[-1]['std_ratio_min']}..{rows[-1]['std_ratio_max']} "
                    f"(|std error| <= {rows[-1]['max_abs_std_error_se']} SE), {seconds:.0f} s",
                    flush=True,
                )
    common.write_json(
        args.output,
        {
            "data": "16 independent discretised Gaussian pixels, mu -0.5..0.5, s 0.1..0.4 (linspace), exact denoiser",
            "models": {
                "vp": "ScoreSDEModel, VPSDE(0.1, 20)",
                "ve": "ScoreSDEModel, VESDE(0.01, 50)",
                "vdm": "VDM, FixedLinear(-13.3, 5): ScheduleSDE",
            },
            "num_samples": args.num_samples,
            "reference_samples": args.reference_samples,
            "seed": args.seed,
            "snr": 0.16,
            "notes": "mean errors in standard errors of the difference to the reference (an exact sampler's "
            "pixel values, its noise included); std ratios to the reference's std, whose standard error is "
            "about 1 / sqrt(2 N) (1.1% at N = 4000).",
            "machine": common.machine(),
            "total_seconds": round(time.time() - start, 1),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    cli.run(main, prog="python -m bench.pc_corrector")
