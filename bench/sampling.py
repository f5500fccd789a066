"""Sampling speed and sample quality of the trained digits model, sampler by sampler.

    python -m bench.sampling                           # 64 samples per sampler from runs/demo
    python -m bench.sampling --num_samples=297 --ancestral_steps=50,250

Samplers (`vdm_tf.samplers`, Song et al. 2021): ancestral (q(z_s | z_t, x_hat), VDM eq. 32-34)
at each of `--ancestral_steps`; predictor-corrector with reverse diffusion + Langevin (`--snr`)
and Euler-Maruyama without corrector, `--pc_steps` predictor steps each; the probability-flow
ODE at each of `--tolerances` (rtol = atol, adaptive Dormand-Prince, NFE reported; the results
JSON's NFE came from TFP's DormandPrince, before `vdm_tf.ode_solver`); and
`VDM.sample`, the model's own ancestral sampler that ends with a draw from its decoder
p(x | z_0) instead of Tweedie's denoised mean (`--vdm_steps`, 0 skips it).

Speed: samples per second of one batch of `--num_samples`, after a warm-up call that traces the
graph. Quality proxies for 8x8 digits, all on pixels / 255 as 64-d vectors:

- FD: the Frechet distance between Gaussians fitted to the samples and to the digits test split
  (297 images). It is biased upwards at small N, so the reference row `data` scores N random
  training images the same way: the floor a perfect sampler would reach at this N (mean over
  `--floor_draws` draws; their standard deviation is the noise of one sampler's figure). The
  test set's FD to the whole training split is reported too.
- a logistic-regression classifier trained on the digits training split: the mean max-probability
  (confidence: do the samples look like some digit?) and the Inception-score-like
  exp(E_x KL(p(y | x) || p(y))) (confident and diverse over the 10 classes: at most 10).

Every sampler uses the same seed, so their rows share their prior draws. Prints a table and
writes bench/results/sampling.json. Cost on a 2-core CPU shared with other jobs: about 6.5
minutes (more under heavier load), a quarter of it the 1000-step ancestral sampler.
"""

import argparse
import os
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from bench.likelihood import describe, restore_demo  # noqa: E402
from vdm_tf import datasets, images, samplers  # noqa: E402


def features(x):
    """uint8 images [N, 8, 8, 1] -> float64 [N, 64] in [0, 1]."""
    return np.asarray(x, np.float64).reshape(len(x), -1) / 255.0


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of Gaussians fitted to the rows of a and b.

    tr (C_a C_b)^(1/2) = tr (C_a^(1/2) C_b C_a^(1/2))^(1/2), a symmetric form that stays exact
    for the singular covariances of digits (the border pixels are always 0).
    """
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)))
    return float(np.sum(np.square(mean_a - mean_b)) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


class Quality:
    """FD to the test split and the classifier scores of a set of images."""

    def __init__(self):
        train_x, train_y = datasets.digits_arrays("train", with_labels=True)
        test_x, test_y = datasets.digits_arrays("test", with_labels=True)
        self.train, self.test = features(train_x), features(test_x)
        self.classifier = LogisticRegression(max_iter=5000).fit(self.train, train_y)
        self.test_accuracy = float(self.classifier.score(self.test, test_y))

    def __call__(self, x):
        probs = np.clip(self.classifier.predict_proba(features(x)), 1e-12, 1.0)
        marginal = probs.mean(0)
        kl = np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1)
        return {
            "fd_to_test": frechet_distance(features(x), self.test),
            "mean_max_prob": float(probs.max(1).mean()),
            "inception_like": float(np.exp(kl.mean())),
        }


def sampler_calls(model, args):
    """(name, settings, call(num_samples, num_steps_or_None) -> (uint8 images, nfe))."""
    calls = []
    for steps in (int(value) for value in args.ancestral_steps.split(",")):
        calls.append(("ancestral", {"steps": steps}, "sampler", {"sampler": "ancestral", "num_steps": steps}))
    for predictor, corrector in (("reverse_diffusion", "langevin"), ("euler_maruyama", "none")):
        options = {"sampler": "pc", "num_steps": args.pc_steps, "predictor": predictor, "corrector": corrector}
        settings = {"steps": args.pc_steps, "predictor": predictor, "corrector": corrector}
        if corrector != "none":
            options["snr"] = settings["snr"] = args.snr
        calls.append(("pc", settings, "sampler", options))
    for tolerance in (float(value) for value in args.tolerances.split(",")):
        calls.append(("ode", {"tolerance": tolerance}, "ode", {"rtol": tolerance, "atol": tolerance}))
    if args.vdm_steps:
        calls.append(("VDM.sample", {"steps": args.vdm_steps}, "vdm", {"num_steps": args.vdm_steps}))

    def bind(kind, options):
        def call(num_samples, seed, warm_up=False):
            if kind == "ode":
                x_hat, nfe = samplers.ode_sample_latents(model, num_samples, seed=seed, **options)
                return images.decode(x_hat).numpy(), int(nfe)
            steps = 2 if warm_up else options["num_steps"]  # the step count is a graph input
            if kind == "vdm":
                return model.sample(num_samples, num_steps=steps, seed=seed).numpy(), steps
            nfe = steps * (2 if options.get("corrector") == "langevin" else 1)
            return samplers.sample(model, num_samples, seed=seed, **{**options, "num_steps": steps}).numpy(), nfe

        return call

    return [(name, settings, bind(kind, options)) for name, settings, kind, options in calls]


def label(settings):
    """A short table label: 'reverse_diffusion+langevin T=250 snr=0.16', 'tol=1e-05', ..."""
    parts = [f"{settings['predictor']}+{settings['corrector']}"] if "predictor" in settings else []
    names = {"steps": "T", "tolerance": "tol", "snr": "snr", "images": ""}
    parts += [
        f"{names[key]}={value:g}" if names[key] else str(value) for key, value in settings.items() if key in names
    ]
    return " ".join(parts)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="runs/demo", help="Run directory of a trained digits model.")
    parser.add_argument("--num_samples", type=int, default=64, help="Samples per sampler (one batch).")
    parser.add_argument("--ancestral_steps", default="50,250,1000", help="Ancestral step counts, comma-separated.")
    parser.add_argument("--pc_steps", type=int, default=250, help="Predictor steps of the PC samplers.")
    parser.add_argument("--snr", type=float, default=0.16, help="Signal-to-noise ratio of the Langevin corrector.")
    parser.add_argument("--tolerances", default="1e-3,1e-5", help="ODE sampler rtol = atol values, comma-separated.")
    parser.add_argument("--vdm_steps", type=int, default=250, help="Steps of VDM.sample (0: skip).")
    parser.add_argument("--floor_draws", type=int, default=20, help="Draws of training images for the data row.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (the same for every sampler).")
    parser.add_argument("--out", default="bench/results/sampling.json", help="Where to write the JSON results.")
    return parser.parse_args()


def main():
    args = parse_args()
    load_before = common.machine()
    start = time.perf_counter()
    model, config = restore_demo(args.model_dir)
    quality = Quality()
    # The floor at this N, and the spread of the figures between draws of N images.
    train, rng = datasets.digits_arrays("train"), np.random.default_rng(args.seed)
    draws = [quality(train[rng.permutation(len(train))[: args.num_samples]]) for _ in range(args.floor_draws)]
    rows = [
        {
            "sampler": "data",
            "settings": {"images": f"{args.num_samples} training images x {args.floor_draws}"},
            **{key: float(np.mean([draw[key] for draw in draws])) for key in draws[0]},
            **{f"{key}_std": float(np.std([draw[key] for draw in draws], ddof=1)) for key in draws[0]},
        }
    ]
    for name, settings, call in sampler_calls(model, args):
        _, warmup = common.timed(call, 2, args.seed, warm_up=True)
        (samples, nfe), seconds = common.timed(call, args.num_samples, args.seed)
        rows.append(
            {
                "sampler": name,
                "settings": settings,
                "nfe": nfe,
                "seconds": seconds,
                "samples_per_second": args.num_samples / seconds,
                "warmup_seconds": warmup,
                **quality(samples),
            }
        )
        print(f"  done: {name} {settings} ({seconds:.0f} s)", flush=True)

    print(f"{'sampler':<12}{'settings':<40}{'NFE':>6}{'samples/s':>11}{'FD':>15}{'max p':>7}{'IS-like':>9}")
    for row in rows:
        speed = f"{row['nfe']:>6}{row['samples_per_second']:>11.2f}" if "nfe" in row else f"{'-':>6}{'-':>11}"
        spread = f" +- {row['fd_to_test_std']:.3f}" if "fd_to_test_std" in row else ""
        print(
            f"{row['sampler']:<12}{label(row['settings']):<40}{speed}{row['fd_to_test']:>8.3f}{spread:<7}"
            f"{row['mean_max_prob']:>7.3f}{row['inception_like']:>9.2f}"
        )
    test = datasets.digits_arrays("test")
    reference = {
        "fd_test_to_train": frechet_distance(quality.test, quality.train),
        "classifier": "sklearn LogisticRegression on the digits training split, pixels / 255",
        "classifier_test_accuracy": quality.test_accuracy,
        "test_split": {key: value for key, value in quality(test).items() if key != "fd_to_test"},
    }
    print(
        f"reference: FD(test, train) = {reference['fd_test_to_train']:.3f}; classifier test accuracy "
        f"{quality.test_accuracy:.3f}; test split max p {reference['test_split']['mean_max_prob']:.3f}, "
        f"IS-like {reference['test_split']['inception_like']:.2f}"
    )
    result = {
        "model": describe(args.model_dir, config),
        "num_samples": args.num_samples,
        "seed": args.seed,
        "notes": "FD on pixels / 255 (64-d) against the 297 test images; the 'data' row is the floor at this N. "
        "NFE: score evaluations (ODE: whole batch). Timings of one batch after a warm-up call, on a CPU shared "
        "with other jobs (see load averages).",
        "reference": reference,
        **load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "total_seconds": time.perf_counter() - start,
        "rows": rows,
    }
    common.write_json(args.out, result)
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
