"""Likelihood of the trained digits model: the VLB against the probability-flow ODE.

    python -m bench.likelihood                                # 32 test images of runs/demo
    python -m bench.likelihood --num_images=64 --exact_images=4

For the first `--num_images` images of the digits test split it reports, in bits per dimension:

- VLB: the VDM's negative ELBO (`model.elbo`) with `--time_samples` time samples per image;
- ODE: the exact likelihood of the probability-flow ODE (`vdm_tf.likelihood.ode_bpd`, Song et
  al. 2021, section 4.3) with uniform dequantisation (Song et al.'s `+7` protocol) and with the
  variational bound that uses the model's own q(z_0 | x) and decoder, at each of `--tolerances`
  (rtol = atol), with the Hutchinson divergence (one Rademacher probe per image and solve) and,
  on the first `--exact_images` images, the exact divergence (64 backward passes per step: slow).

Every figure is a mean over images with its standard error (std / sqrt(N)); `ODE - VLB` is the
mean of the per-image differences with the standard error of that paired difference. NFE is
the solver's number of ODE function evaluations for the whole batch (the adaptive step is set by
the worst image, so it grows with the batch); seconds per image is the batch's wall time over
N, measured after a warm-up call that traces the graph (the trace time is reported apart).
Prints a table and writes bench/results/likelihood.json.

Cost on a 2-core CPU shared with other jobs: the default run takes about 10 minutes, half of it
tracing the two solver graphs (about 2.5 minutes each); the exact divergence adds a trace of about
5 minutes and about 25 seconds per image at rtol 1e-3.
"""

import argparse
import math
import os
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import numpy as np  # noqa: E402

from trainers import configs, train  # noqa: E402
from vdm_tf import datasets, likelihood  # noqa: E402

DEQUANTIZATIONS = ("uniform", "variational")
# What the two ODE figures bound, next to the VLB's -log2 P(x) of the same images.
DEQUANTIZATION_NOTE = (
    "VLB and ODE variational both bound -log2 P(x) of the discrete image, with the same q(z_0 | x) and "
    "decoder p(x | z_0) (over the data set's pixel values when the decoder alphabet is on); only the "
    "density of z_0 differs (the diffusion ELBO vs the probability-flow ODE's exact marginal), so they "
    "compare. ODE uniform bounds the probability of the 1/256-wide bin around x: it ignores the alphabet, "
    "so with the alphabet on it is not comparable to the VLB (the ODE's z_0 density is spread over the "
    "sigma_0-wide neighbourhood of each pixel value, many bins wide)."
)


def restore_demo(model_dir):
    """The trained model of a run directory (EMA weights) and its config."""
    config = configs.saved_config(model_dir)
    return train.restore_for_inference(model_dir, config), config


def describe(model_dir, config):
    """One line on the digits VDM of a run directory: network, schedule, decoder, length of training."""
    return (
        f"{model_dir}: digits VDM, {config.network.n_layers} x {config.network.n_embd} ScoreUNet, "
        f"{config.schedule.kind} schedule, gamma_min {config.schedule.gamma_min:g}, "
        f"decoder alphabet {'on' if config.model.decoder_alphabet else 'off'}, {config.trainer.train_steps} steps"
    )


def mean_and_se(values):
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def summary(name, bpd, vlb, seconds, **extra):
    """One table row: mean bpd and ODE - VLB (paired over the same images), both with standard errors."""
    row = {"method": name, "images": len(bpd), **extra}
    row["bpd"], row["bpd_se"] = mean_and_se(bpd)
    row["minus_vlb"], row["minus_vlb_se"] = mean_and_se(bpd - vlb[: len(bpd)])
    row["seconds_per_image"] = seconds / len(bpd)
    return row


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="runs/demo", help="Run directory of a trained digits model.")
    parser.add_argument("--num_images", type=int, default=32, help="First N images of the digits test split.")
    parser.add_argument("--time_samples", type=int, default=64, help="Time samples per image of the VLB.")
    parser.add_argument("--tolerances", default="1e-3,1e-5", help="ODE solver rtol = atol values, comma-separated.")
    parser.add_argument("--exact_images", type=int, default=0, help="Images for the exact divergence (0: skip).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the VLB, dequantisation and probes.")
    parser.add_argument("--out", default="bench/results/likelihood.json", help="Where to write the JSON results.")
    return parser.parse_args()


def main():
    args = parse_args()
    load_before = common.machine()
    start = time.perf_counter()
    model, config = restore_demo(args.model_dir)
    x = datasets.digits_arrays("test")[: args.num_images]

    model.elbo(x[:1], seed=args.seed, num_time_samples=args.time_samples)  # warm-up: traces
    terms, seconds = common.timed(model.elbo, x, seed=args.seed, num_time_samples=args.time_samples)
    vlb = terms["bpd"].numpy().astype(np.float64)
    rows = [summary("VLB", vlb, vlb, seconds, time_samples=args.time_samples)]
    rows[0].update({name: float(np.mean(terms[name])) for name in ("diffusion", "prior", "reconstruction")})

    for tolerance in (float(value) for value in args.tolerances.split(",")):
        for exact in (False, True) if args.exact_images else (False,):
            subset = x[: args.exact_images] if exact else x
            options = {"rtol": tolerance, "atol": tolerance, "exact_divergence": exact}
            # Both dequantisations share one traced solver: a 1-image call traces it.
            _, warmup = common.timed(likelihood.ode_bpd, model, subset[:1], seed=args.seed, **options)
            for dequantization in DEQUANTIZATIONS:
                out, seconds = common.timed(
                    likelihood.ode_bpd, model, subset, seed=args.seed, dequantization=dequantization, **options
                )
                rows.append(
                    summary(
                        "ODE",
                        out["bpd"].numpy().astype(np.float64),
                        vlb,
                        seconds,
                        dequantization=dequantization,
                        tolerance=tolerance,
                        divergence="exact" if exact else "hutchinson",
                        nfe=int(out["nfe"]),
                        warmup_seconds=warmup,
                    )
                )
                print(f"  done: ODE {dequantization} tol {tolerance:g} exact={exact} ({seconds:.0f} s)", flush=True)

    print(f"{'method':<8}{'dequant':<13}{'tol':>7}{'div':>7}{'N':>4}{'bpd':>16}{'ODE - VLB':>17}{'NFE':>6}{'s/img':>8}")
    for row in rows:
        ode = row["method"] == "ODE"
        print(
            f"{row['method']:<8}{row.get('dequantization', '-'):<13}"
            f"{(format(row['tolerance'], 'g') if ode else '-'):>7}{(row['divergence'][:5] if ode else '-'):>7}"
            f"{row['images']:>4}{row['bpd']:>9.3f} +- {row['bpd_se']:.3f}"
            + (f"{row['minus_vlb']:>+10.3f} +- {row['minus_vlb_se']:.3f}" if ode else f"{'':>17}")
            + f"{(row['nfe'] if ode else '-'):>6}{row['seconds_per_image']:>8.3f}"
        )
    result = {
        "model": describe(args.model_dir, config),
        "images": f"digits test split [:{args.num_images}]",
        "seed": args.seed,
        "probe": "rademacher",
        "notes": "bpd and ODE - VLB: mean over images +- standard error (paired over the same images). "
        "NFE: whole batch. Timings after a warm-up call, on a CPU shared with other jobs (see load averages). "
        + DEQUANTIZATION_NOTE,
        **load_before,
        "load_average_1min_after": os.getloadavg()[0],
        "total_seconds": time.perf_counter() - start,
        "rows": rows,
    }
    common.write_json(args.out, result)
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
