"""Samplers of the digits models compared at equal cost: KID_digits / FID_digits against NFE and wall-clock.

    python -m bench.sampler_quality --quick               # smoke run: 64 samples, few settings
    python -m bench.sampler_quality                       # every group of rows
    python -m bench.sampler_quality --groups=sde --predictor_steps=320 --pc_steps=160   # add rows

Models (EMA weights), each a run directory of `trainers.main`; a directory that holds no run is
trained first with its preset (`python -m trainers.main --model_dir=DIR --config=PRESET`, the
preset's own steps and optimiser): `--model_dir` (`digits`), `--multiscale_dir`
(`digits_multiscale`), `--cdm_dir` (`digits_cdm`); only the models of the `--groups` measured
are loaded. A run adds to the results: the rows of the `--out` file that it does not measure
(same N and seed) are kept, and `runs` in the JSON records every run's settings and machine.

Samplers (groups `ancestral`, `sde`, `ode`, `multiscale`, `cdm`, `guidance`), every row the
same `--num_samples` N and the same `--seed`, in one batch:

- `ancestral`: the VDM's own chain (`model.sample`, VDM eq. 32-34, ending with a draw of its
  decoder p(x | z_0)) with T = `--ancestral_steps` steps: T network evaluations.
- `reverse_diffusion`, `euler_maruyama`: Score-SDE's predictors on the VDM's SDE
  (`vdm_tf.samplers.sample(..., "pc")`), without a corrector at `--predictor_steps` steps (NFE
  = steps + 1: the last is the denoising step, Tweedie's formula), and with one Langevin
  corrector step per predictor step (`+langevin`, `--snr`) at `--pc_steps` (NFE = 2 steps + 1).
- `ode`: the probability-flow ODE at each of `--tolerances` (rtol = atol; adaptive
  Dormand-Prince, `samplers.ode_sample_latents`): NFE = the solver's function evaluations + 1.
- `multiscale`, `cdm`: `model.sample` of the other two presets, T = `--multiscale_steps` /
  `--cdm_steps`. A multi-scale step runs its network at 4x4 for the first quarter of the time (the
  preset's details end at t = 0.75), and a CDM evaluation is a classifier's forward and backward
  pass: their NFE do not cost what the VDM's cost, the wall-clock axis compares them.
- `guided w=...`: class guidance (`vdm_tf.conditional.class_conditional_sample`, Euler-Maruyama
  at `--guidance_steps`) with the noise-conditional classifier of `--classifier_dir` (trained with
  `python -m trainers.classifier` if new) at each weight of `--guidance_scales`: N / 10 samples of
  each digit, pooled, against the same test split. An evaluation adds the classifier's gradient.
- `data`: N training images: the figures of a perfect sampler at this N (FID's floor).

Quality: the bundled digits feature network (`vdm_tf.metrics.network_for("digits")`) against the
297 images of the digits test split. FID_digits from the running moments (`metrics.compare`; its
+- is the bootstrap standard deviation); FID is biased upwards at small N, so compare rows only
at the same N. KID_digits: the unbiased MMD^2 with KID's cubic kernel over all pairs of the two
sets (`kid_jackknife`), its standard error by the jackknife over the samples (the test split is
the same fixed reference for every row, so its own sampling noise is not in the error bar).

Equal compute, Score-SDE's claim (Song et al. 2021, table 1: "predictor-corrector beats
predictor-only at equal compute", PC1000 against P2000): predictor + Langevin with S steps
against the same predictor alone with 2 S steps, both 2 S + 1 network evaluations
(`claim_pairs`), the KID difference with its paired jackknife standard error (sample i of the
two rows left out together).

Speed: seconds for the batch of N, after a warm-up call of 2 samples that traces the graph, on a
machine shared with other jobs: each row records the load average before it.
Writes bench/results/sampler_quality.json and its figure (KID against NFE and against seconds).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.pc_corrector import positive_integer, positive_integers
from vdm_tf import cli, metrics

PREDICTORS = ("reverse_diffusion", "euler_maruyama")
PRESETS = {"model_dir": "digits", "multiscale_dir": "digits_multiscale", "cdm_dir": "digits_cdm"}
# Groups of rows (`--groups`) and the models each needs.
GROUPS = {
    "ancestral": ("digits",),
    "sde": ("digits",),
    "ode": ("digits",),
    "multiscale": ("digits_multiscale",),
    "cdm": ("digits_cdm",),
    "guidance": ("digits", "classifier"),
}
QUICK = {
    "num_samples": 64,
    "ancestral_steps": [10, 100],
    "predictor_steps": [10, 32],
    "pc_steps": [5, 16],
    "tolerances": [1e-2],
    "multiscale_steps": [32],
    "cdm_steps": [32],
    "guidance_scales": [1.0],
    "guidance_steps": 32,
}


# --------------------------------------------------------------------------------------------
# KID with its jackknife standard error, and the equal-compute pairs.


def kid_jackknife(real, fake):
    """(KID, the KID of `fake` with sample i left out for every i): the unbiased MMD^2 over all pairs.

    KID = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n) for the m real rows x and the n fake rows y: Binkowski et
    al.'s estimator on the whole sets instead of on subsets. Leaving out y_l takes 2 sum_{j != l}
    k(y_l, y_j) from the second sum and sum_i k(x_i, y_l) from the third.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m, n = len(real), len(fake)
    if n < 3 or m < 2:
        raise ValueError(f"KID's jackknife needs at least 2 real and 3 fake samples; got {m} and {n}.")
    kernel = metrics.polynomial_kernel  # KID's (x . y / d + 1)^3
    k_xx, k_yy, k_xy = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    within_real = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    row_yy = k_yy.sum(1) - np.diag(k_yy)  # sum_{j != l} k(y_l, y_j)
    sum_yy, sum_xy = row_yy.sum(), k_xy.sum()
    kid = within_real + sum_yy / (n * (n - 1)) - 2.0 * sum_xy / (m * n)
    left_out = (
        within_real + (sum_yy - 2.0 * row_yy) / ((n - 1) * (n - 2)) - 2.0 * (sum_xy - k_xy.sum(0)) / (m * (n - 1))
    )
    return float(kid), left_out


def jackknife_se(left_out):
    """The jackknife standard error from leave-one-out estimates: sqrt((n - 1) / n sum (theta_i - mean)^2)."""
    left_out = np.asarray(left_out, np.float64)
    n = len(left_out)
    return float(np.sqrt((n - 1) / n * np.sum(np.square(left_out - left_out.mean()))))


def claim_pairs(rows):
    """Score-SDE's equal-compute pairs: (predictor + langevin at S steps, the predictor alone at 2 S steps).

    From `rows` (dicts with `sampler`, `corrector` and `steps`), every pair whose two rows were
    measured, in order of budget; both rows cost 2 S + 1 network evaluations.
    """
    alone = {(row["sampler"], row["steps"]): row for row in rows if row.get("corrector") == "none"}
    pairs = []
    for row in rows:
        if row.get("corrector") == "langevin" and (row["sampler"], 2 * row["steps"]) in alone:
            pairs.append((row, alone[(row["sampler"], 2 * row["steps"])]))
    return sorted(pairs, key=lambda pair: (pair[0]["sampler"], pair[0]["steps"]))


# --------------------------------------------------------------------------------------------
# Command line.


def comma_floats(accept, expected):
    """An argparse type: comma-separated floats, each `accept`ed, or an error naming `expected`."""
    import argparse

    def parse(text):
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(accept(value) for value in values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {expected}; got {text!r}")
        return values

    return parse


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m bench.sampler_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help="Rows to measure, of " + ", ".join(GROUPS) + ".")
    parser.add_argument("--model_dir", default="runs/sampler_quality/digits", help="Run of the digits preset.")
    parser.add_argument("--multiscale_dir", default="runs/sampler_quality/digits_multiscale")
    parser.add_argument("--cdm_dir", default="runs/sampler_quality/digits_cdm")
    parser.add_argument("--num_samples", type=positive_integer, default=256, help="N, the same for every row.")
    parser.add_argument("--ancestral_steps", type=positive_integers, default=[10, 32, 100, 320, 1000])
    parser.add_argument("--predictor_steps", type=positive_integers, default=[10, 32, 100, 320])
    parser.add_argument("--pc_steps", type=positive_integers, default=[5, 16, 50, 160])
    parser.add_argument("--snr", type=float, default=0.16, help="Signal-to-noise ratio of the Langevin corrector.")
    parser.add_argument(
        "--tolerances", type=comma_floats(lambda v: 0 < v < 1, "tolerances in (0, 1)"), default=[1e-1, 1e-2, 1e-3, 1e-4]
    )
    parser.add_argument("--multiscale_steps", type=positive_integers, default=[32, 100, 320])
    parser.add_argument("--cdm_steps", type=positive_integers, default=[100, 320])
    parser.add_argument("--classifier_dir", default="runs/sampler_quality/digits_classifier")
    parser.add_argument(
        "--guidance_scales",
        type=comma_floats(lambda v: v >= 0, "guidance weights >= 0"),
        default=[1.0, 3.0],
        help="Class guidance weights w.",
    )
    parser.add_argument("--guidance_steps", type=positive_integer, default=100, help="Euler-Maruyama steps.")
    parser.add_argument("--seed", type=int, default=0, help="The sampling seed of every row.")
    parser.add_argument("--quick", action="store_true", help=f"A smoke run: {QUICK}.")
    parser.add_argument(
        "--out", default=None, help="JSON results (default bench/results/sampler_quality[_quick].json)."
    )
    args = parser.parse_args(argv)
    args.groups = args.groups.split(",")
    unknown = [group for group in args.groups if group not in GROUPS]
    if unknown:
        raise cli.Failure(f"--groups: unknown {', '.join(unknown)}; expected some of {', '.join(GROUPS)}.")
    if args.snr <= 0:
        raise cli.Failure(f"--snr must be > 0; got {args.snr}.")
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.num_samples < 3:
        raise cli.Failure(f"--num_samples must be >= 3 (KID's jackknife); got {args.num_samples}.")
    args.out = args.out or f"bench/results/sampler_quality{'_quick' if args.quick else ''}.json"
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        raise cli.Failure(f"--out: expected a file in an existing directory; {directory} is not one.")
    for flag in (*PRESETS, "classifier_dir"):
        path = getattr(args, flag)
        if os.path.exists(path) and not os.path.isdir(path):
            raise cli.Failure(f"--{flag}={path} is a file; expected a run directory (trained here if new).")
    return args


# --------------------------------------------------------------------------------------------
# The measurements.


def trained(model_dir, preset):
    """The EMA model of a run directory, trained first with `preset` if it holds no checkpoint."""
    from vdm_tf import run_config, runs

    if run_config.latest_checkpoint(model_dir) is None:
        train(["trainers.main", f"--model_dir={model_dir}", f"--config={preset}"])
    return runs.restore_for_inference(model_dir)


def trained_classifier(model_dir):
    """The noise-conditional classifier of `python -m trainers.classifier` (its digits preset), trained if new."""
    import keras

    from vdm_tf import conditional  # noqa: F401  (registers NoisyClassifier for loading)

    path = os.path.join(model_dir, "classifier.keras")
    if not os.path.exists(path):
        train(["trainers.classifier", f"--model_dir={model_dir}"])
    return keras.saving.load_model(path)


def train(command):
    """Runs a training command line (`python -m ...`) in its own process."""
    print(f"training: python -m {' '.join(command)}", flush=True)
    subprocess.run([sys.executable, "-m", *command], check=True)


def sampler_rows(args, models):
    """(row settings, draw(num_samples) -> (uint8 images, NFE)) for every sampler of the run."""
    from vdm_tf import images, samplers

    calls = []

    def own_chain(family, model, steps):
        def draw(num_samples, warm_up=False):
            return model.sample(num_samples, num_steps=1 if warm_up else steps, seed=args.seed).numpy(), steps

        calls.append(({"family": family, "sampler": "ancestral", "steps": steps}, draw))

    def pc(predictor, corrector, steps):
        options = {"predictor": predictor, "corrector": corrector, "snr": args.snr}

        def draw(num_samples, warm_up=False):
            count = 1 if warm_up else steps
            x = samplers.sample(models["digits"], num_samples, "pc", count, args.seed, **options)
            return x.numpy(), steps * (2 if corrector == "langevin" else 1) + 1

        family = predictor + ("+langevin" if corrector == "langevin" else "")
        calls.append(({"family": family, "sampler": predictor, "corrector": corrector, "steps": steps}, draw))

    def ode(tolerance):
        def draw(num_samples, warm_up=False):
            x_hat, nfe = samplers.ode_sample_latents(
                models["digits"], num_samples, seed=args.seed, rtol=tolerance, atol=tolerance
            )
            return images.decode(x_hat).numpy(), int(nfe) + 1

        calls.append(({"family": "ode", "sampler": "ode", "tolerance": tolerance}, draw))

    def guided(scale):
        """Class guidance (`conditional.class_conditional_sample`): N / 10 samples of each digit, pooled.

        Digit d draws with the seed (seed, d), so that the ten batches do not share their noise.
        """
        from vdm_tf import conditional

        counts = np.diff(np.linspace(0, args.num_samples, 11).round().astype(int))
        steps = args.guidance_steps

        def draw(num_samples, warm_up=False):
            batches = [
                conditional.class_conditional_sample(
                    models["digits"],
                    models["classifier"],
                    label,
                    2 if warm_up else count,
                    scale,
                    "pc",
                    (args.seed, label),
                    num_steps=1 if warm_up else steps,
                    predictor="euler_maruyama",
                    corrector="none",
                ).numpy()
                for label, count in enumerate(counts)
            ]
            return np.concatenate(batches), steps + 1

        settings = {"family": f"guided w={scale:g}", "sampler": "euler_maruyama", "corrector": "guidance"}
        calls.append(({**settings, "steps": steps, "guidance_scale": scale}, draw))

    groups = {
        "ancestral": lambda: [own_chain("ancestral", models["digits"], steps) for steps in args.ancestral_steps],
        "sde": lambda: [
            pc(predictor, corrector, steps)
            for predictor in PREDICTORS
            for corrector, steps_list in (("none", args.predictor_steps), ("langevin", args.pc_steps))
            for steps in steps_list
        ],
        "ode": lambda: [ode(tolerance) for tolerance in args.tolerances],
        "multiscale": lambda: [own_chain("multiscale", models["digits_multiscale"], s) for s in args.multiscale_steps],
        "cdm": lambda: [own_chain("cdm", models["digits_cdm"], steps) for steps in args.cdm_steps],
        "guidance": lambda: [guided(scale) for scale in args.guidance_scales],
    }
    for group in args.groups:
        start = len(calls)
        groups[group]()
        for settings, _ in calls[start:]:
            settings["group"] = group
    return calls


def quality(network, real, samples):
    """FID_digits (+- bootstrap), KID_digits (+- jackknife SE), precision / recall of `samples` against `real`."""
    fake = metrics.statistics(network, samples)
    result = metrics.compare(real, fake)
    kid, left_out = kid_jackknife(real.kept, fake.kept)
    return {
        "fid": result["fid"],
        "fid_bootstrap_std": result["fid_bootstrap_std"],
        "kid": kid,
        "kid_se": jackknife_se(left_out),
        "precision": result["precision"],
        "recall": result["recall"],
    }, left_out


def kept_rows(args, rows, claim):
    """(rows, claim entries, runs) of an earlier `--out` (same N and seed) that this run did not measure.

    So a run of some `--groups` or settings adds to the results instead of replacing them; a row
    is known by its `label`, a claim entry by its predictor and NFE. `runs`: the earlier runs'
    records (settings, machine, load), each naming its rows.
    """
    if not os.path.exists(args.out):
        return [], [], []
    with open(args.out) as f:
        previous = json.load(f)
    if (previous["settings"]["num_samples"], previous["settings"]["seed"]) != (args.num_samples, args.seed):
        print(f"not keeping the rows of {args.out}: another N or seed", flush=True)
        return [], [], []
    measured = {label(row) for row in rows}
    kept = [row for row in previous["rows"] if label(row) not in measured]
    for row in kept:
        print(f"kept from {args.out}: {label(row)}", flush=True)
    pairs = {(entry["predictor"], entry["nfe"]) for entry in claim}
    kept_claim = [
        entry for entry in previous["predictor_corrector_claim"] if (entry["predictor"], entry["nfe"]) not in pairs
    ]
    runs = previous.get("runs") or [
        {key: previous[key] for key in ("settings", "machine", "load_average_1min_after", "total_seconds")}
        | {"rows": [label(row) for row in previous["rows"]]}
    ]
    return kept, kept_claim, runs


def label(row):
    """A table label: 'euler_maruyama+langevin S=16', 'ancestral T=100', 'ode tol=0.001', ..."""
    if row["family"] == "data":
        return "data (training images)"
    if "guidance_scale" in row:
        return f"{row['family']} (euler_maruyama S={row['steps']})"
    if row["family"] == "ode":
        return f"ode tol={row['tolerance']:g}"
    return f"{row['family']} {'T' if row['sampler'] == 'ancestral' else 'S'}={row['steps']}"


def draw_figure(rows, path):
    """KID_digits against NFE and against seconds (log x), one line per sampler family, the data row dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    families = [family for family in dict.fromkeys(row["family"] for row in rows) if family != "data"]
    for family in families:
        points = sorted((row for row in rows if row["family"] == family), key=lambda row: row["nfe"])
        for axis, key in zip(axes, ("nfe", "seconds")):
            axis.errorbar(
                [row[key] for row in points],
                [row["kid"] for row in points],
                yerr=[row["kid_se"] for row in points],
                marker="o",
                markersize=4,
                capsize=2,
                label=family,
            )
    data = next((row for row in rows if row["family"] == "data"), None)
    for axis, xlabel in zip(
        axes, ("network evaluations per sample (NFE)", "seconds for the batch (2-core CPU, shared)")
    ):
        if data is not None:
            axis.axhline(data["kid"], color="gray", linestyle="--", label="data (training images)")
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"KID_digits against the test split (N = {rows[0]['num_samples']}), +- jackknife SE")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    from bench import common

    common.prepare()
    from vdm_tf import datasets

    start = time.perf_counter()
    machine = common.machine()
    needed = {name for group in args.groups for name in GROUPS[group]}
    models = {preset: trained(getattr(args, flag), preset) for flag, preset in PRESETS.items() if preset in needed}
    if "classifier" in needed:
        models["classifier"] = trained_classifier(args.classifier_dir)
    network = metrics.network_for("digits")
    real = metrics.statistics(network, datasets.digits_arrays("test"))
    training = datasets.digits_arrays("train")
    floor = training[np.random.default_rng(args.seed).permutation(len(training))[: args.num_samples]]
    data_quality, _ = quality(network, real, floor)
    rows = [{"family": "data", "sampler": "data", "num_samples": args.num_samples, **data_quality}]
    left_outs = {}
    for settings, draw in sampler_rows(args, models):
        _, warm_up_seconds = common.timed(draw, 2, warm_up=True)
        load = os.getloadavg()[0]
        (samples, nfe), seconds = common.timed(draw, args.num_samples)
        measured, left_outs[len(rows)] = quality(network, real, samples)
        row = {**settings, "num_samples": args.num_samples, "nfe": nfe, "seconds": seconds}
        row.update(warm_up_seconds=warm_up_seconds, load_average_1min_before=load, **measured)
        rows.append(row)
        print(
            f"{label(row):<36} NFE {nfe:>5}  {seconds:7.1f} s  KID {row['kid']:.5f} +- {row['kid_se']:.5f}  "
            f"FID {row['fid']:.3f} +- {row['fid_bootstrap_std']:.3f}  (load {load:.1f})",
            flush=True,
        )
    claim = []
    for with_corrector, alone in claim_pairs(rows):
        difference = left_outs[rows.index(with_corrector)] - left_outs[rows.index(alone)]
        entry = {
            "predictor": alone["sampler"],
            "nfe": alone["nfe"],
            "pc_steps": with_corrector["steps"],
            "predictor_only_steps": alone["steps"],
            "kid_pc": with_corrector["kid"],
            "kid_pc_se": with_corrector["kid_se"],
            "kid_predictor_only": alone["kid"],
            "kid_predictor_only_se": alone["kid_se"],
            "kid_difference": with_corrector["kid"] - alone["kid"],
            "kid_difference_se": jackknife_se(difference),
            "fid_pc": with_corrector["fid"],
            "fid_predictor_only": alone["fid"],
        }
        claim.append(entry)
        print(
            f"claim, {entry['predictor']} at NFE {entry['nfe']}: PC S={entry['pc_steps']} KID {entry['kid_pc']:.5f}, "
            f"predictor-only S={entry['predictor_only_steps']} {entry['kid_predictor_only']:.5f}, PC - P "
            f"{entry['kid_difference']:+.5f} +- {entry['kid_difference_se']:.5f}",
            flush=True,
        )
    kept, kept_claim, runs = kept_rows(args, rows, claim)
    this_run = {
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "machine": machine,
        "load_average_1min_after": os.getloadavg()[0],
        "total_seconds": time.perf_counter() - start,
        "rows": [label(row) for row in rows],
    }
    rows = rows[:1] + sorted(rows[1:] + kept, key=lambda row: (list(GROUPS).index(row["group"]), row["nfe"]))
    claim = sorted(claim + kept_claim, key=lambda entry: (entry["predictor"], entry["nfe"]))
    result = {
        "settings": this_run["settings"],  # of the last run; `runs` has every run's
        "models": {name: getattr(args, flag) for flag, name in {**PRESETS, "classifier_dir": "classifier"}.items()},
        "notes": "KID_digits / FID_digits of N samples against the 297 digits test images under the bundled digits "
        "feature network. KID: unbiased MMD^2 over all pairs, +- jackknife standard error over the samples (the "
        "test split is a fixed reference). FID: +- bootstrap std; biased upwards at small N, compare rows at the "
        "same N only ('data' is N training images). NFE: network evaluations per sample (the SDE samplers' last "
        "denoising step included; multiscale steps partly at 4x4, a CDM evaluation is a forward and a backward "
        "pass, a guided one adds the classifier's gradient). Seconds: the batch of N after a warm-up call, on a "
        "2-core CPU shared with other jobs (each row's load average before it; each run's machine in `runs`).",
        "runs": runs + [this_run],
        "rows": rows,
        "predictor_corrector_claim": claim,
    }
    common.write_json(args.out, result)
    print(f"wrote {args.out} ({this_run['total_seconds']:.0f} s)")
    draw_figure(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:], prog="python -m bench.sampler_quality")
