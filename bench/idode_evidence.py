"""i-DODE's claim at CPU scale: does the ODE bound beat the VLB for a model trained the i-DODE way?

    python -m bench.idode_evidence --quick                     # a few minutes: checks it runs end to end
    python -m bench.idode_evidence             # digits vs digits_idode: 9 min of training each, ~30 min
    python -m bench.idode_evidence --dataset=photos --budget_minutes=5
    python -m bench.idode_evidence --presets=digits,digits_idode,digits_mulan --budget_minutes=5   # with MuLAN

Zheng et al. 2023 ("Improved Techniques for Maximum Likelihood Estimation for Diffusion ODEs")
train with velocity parameterization, importance-sampled noise levels and a variance-preserving
schedule, then evaluate the probability-flow ODE with truncated-normal dequantization, and
report ODE bounds below the VLB. Here the two presets of one data set, the eps-predicting VDM
(`digits`: learned schedule, uniform times) and the same network trained the i-DODE way
(`digits_idode`), train for the same budget of CPU time and are compared on the test split.
`--presets` compares any presets of one data set the same way, e.g. with MuLAN (Sahoo et al. 2024,
`digits_mulan`: a learned per-pixel schedule), whose claims are a lower bpd and fewer steps to a
given bpd; its ODE bound is `MuLAN.ode_bpd` (truncated-normal only: it has no variational one).

1. Equal training time. Each preset's training cost is measured on a throwaway run,
   alternating between the presets, in CPU seconds per step of this process (wall seconds move
   with the other jobs of a shared machine; CPU seconds much less). Each preset trains for the
   steps that cost `budget_minutes` x the machine's CPU count of CPU time (the cosine
   learning-rate decay ends there, as in a run of that length): on an idle machine whose
   training keeps every CPU busy, `budget_minutes` of wall-clock; the wall and CPU seconds of
   every chunk are recorded. The two runs are
   interleaved, `--evals` chunks each, alternating which goes first, so both see the same load
   of the shared machine; each chunk's wall time and the 1-minute load average after it are
   recorded. Training is `trainers.train.Trainer`, the loop of `make demo` (checkpoints included),
   on the preset's data pipeline; the clock counts training only, not the evaluations.
2. Learning curve: after each chunk the EMA weights are scored on the whole test split
   (`vdm_tf.evaluation.dataset_bpd`, the preset's `eval_time_samples` time samples per image).
3. At the end, with the EMA weights: the VLB (`model.elbo`, `--time_samples` per image) on
   the whole test split, and the ODE (`vdm_tf.likelihood.ode_bpd`, rtol = atol = `--tolerance`,
   one Rademacher probe per image) on its first `--ode_images` images with each dequantization:
   `truncated_normal` (i-DODE's) and `variational` (the model's own q(z_0 | x) and decoder;
   Song et al.'s `uniform` is bench/likelihood.py's, close to truncated_normal). ODE - VLB is
   paired over the same images (mean and standard error of the per-image differences).

What compares with what: the digits presets' decoder puts its mass on the 17 pixel values of the
data set (`decoder_alphabet`), so the VLB and the variational ODE bound -log2 P(x) with that
alphabet, while the truncated-normal protocol bounds the probability of x's
1/256-wide bin, knowing nothing of the alphabet: with the alphabet on it is not comparable
to the VLB (bench/likelihood.py says more). The photos presets have no alphabet: all compare.

Writes bench/results/idode_evidence.json (one entry per data set; a run replaces its data set's
entry and keeps the others) and draws bench/results/idode_evidence.png from it.
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time

from vdm_tf import cli

PAIRS = {"digits": ("digits", "digits_idode"), "photos": ("photos", "photos_idode")}
DEQUANTIZATIONS = ("truncated_normal", "variational")
DEFAULTS = {
    "budget_minutes": 9.0,
    "evals": 5,
    "calibration_steps": 50,
    "ode_images": 150,
    "time_samples": 64,
    "tolerance": 1e-4,
}
QUICK = {
    "budget_minutes": 0.25,
    "evals": 2,
    "calibration_steps": 10,
    "ode_images": 4,
    "time_samples": 4,
    "tolerance": 1e-3,
}
NOTES = (
    "Equal training time: each preset trains the steps that cost budget_minutes x CPU count of CPU time (the "
    "machine is shared; CPU time moves less with other jobs than wall time), about budget_minutes of wall-clock "
    "on an idle machine; the runs interleaved in chunks. "
    "bpd: mean over images +- standard error; ODE - VLB: mean of per-image differences over the same images "
    "+- its standard error. VLB and ODE variational bound -log2 P(x) with the model's decoder (over the data "
    "set's pixel values when decoder_alphabet is on); ODE truncated_normal bounds the probability "
    "of x's 1/256-wide bin and ignores the alphabet, so with decoder_alphabet on it is not comparable to the "
    "VLB. Clock: a 2-core CPU shared with other jobs (load averages recorded per chunk)."
)


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}; got {text!r}")
        return value

    return parse


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m bench.idode_evidence", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(PAIRS), default="digits", help="Which pair of presets.")
    parser.add_argument("--presets", default=None, help="Comma-separated presets of one data set (default: the pair).")
    parser.add_argument(
        "--budget_minutes",
        type=positive(float),
        help="Minutes of every CPU per preset.",
    )
    parser.add_argument("--evals", type=positive(int), help="Chunks per run, each ending in a test VLB.")
    parser.add_argument("--calibration_steps", type=positive(int), help="Steps per timed round.")
    parser.add_argument("--ode_images", type=positive(int), help="First N test images for the ODE.")
    parser.add_argument("--time_samples", type=positive(int), help="Time samples per image, final VLB.")
    parser.add_argument("--tolerance", type=positive(float), help="ODE solver rtol = atol.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the evaluations (training: the presets').")
    parser.add_argument("--quick", action="store_true", help="A few minutes, results in a temporary directory.")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/idode_evidence.json).")
    parser.add_argument("--figure", default=None, help="Figure (default bench/results/idode_evidence.png).")
    args = parser.parse_args(argv)
    args.presets = tuple(args.presets.split(",")) if args.presets else PAIRS[args.dataset]
    from trainers import configs  # the preset table only: TensorFlow is not imported yet

    unknown = [name for name in args.presets if name not in configs.PRESETS]
    datasets = {configs.PRESETS[name].data.dataset for name in args.presets if name not in unknown}
    if unknown or len(datasets) != 1 or len(set(args.presets)) != len(args.presets):
        raise cli.Failure(
            f"--presets: expected distinct presets of one data set (from {', '.join(configs.PRESETS)}); "
            f"got {','.join(args.presets)}"
        )
    args.dataset = datasets.pop()
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:  # not given
            setattr(args, name, value)
    results = tempfile.gettempdir() if args.quick else "bench/results"
    args.out = args.out or os.path.join(results, "idode_evidence_quick.json" if args.quick else "idode_evidence.json")
    args.figure = args.figure or os.path.join(
        results, "idode_evidence_quick.png" if args.quick else "idode_evidence.png"
    )
    for flag, path in (("--out", args.out), ("--figure", args.figure)):
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise cli.Failure(f"{flag}: expected a file in an existing directory; {directory} is not one")
    return args


def main(argv=None):
    args = parse_args(argv)
    from bench import common

    common.prepare()
    import numpy as np
    import tensorflow as tf

    import vdm_tf
    from trainers import configs, train

    command = "python -m bench.idode_evidence " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    machine = common.machine()
    strategy = tf.distribute.get_strategy()
    presets = args.presets
    base = {name: configs.PRESETS[name] for name in presets}
    info = vdm_tf.datasets.info(args.dataset)

    def test_data(batch_size=32):
        return vdm_tf.evaluation.heldout_batches(args.dataset, batch_size)

    x_test = np.concatenate([batch.numpy() for batch in test_data()])

    def train_to(trainer, config, step):
        """Trains `trainer` up to `step` (its learning-rate schedule is the one it was built with).

        Returns (wall seconds, CPU seconds of this process)."""
        trainer.config = config.replace(trainer={"train_steps": step})
        cpu = time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):  # "resumed from step N" at each chunk
            _, seconds = common.timed(trainer.train)
        return seconds, time.process_time() - cpu

    scratch = tempfile.mkdtemp(prefix="idode_evidence_")
    try:
        # 1. Rates: a throwaway run per preset, one untimed chunk (the trace) then two timed ones each.
        steps = args.calibration_steps
        trainers = {
            name: train.Trainer(config.replace(trainer={"train_steps": 4 * steps}), f"{scratch}/rate_{name}", strategy)
            for name, config in base.items()
        }
        timed = {name: 0.0 for name in presets}
        timed_cpu = {name: 0.0 for name in presets}
        for round_ in range(4):
            for name in presets if round_ % 2 == 0 else presets[::-1]:
                seconds, cpu_seconds = train_to(trainers[name], base[name], (round_ + 1) * steps)
                timed[name] += seconds if round_ else 0.0
                timed_cpu[name] += cpu_seconds if round_ else 0.0
        del trainers
        cpu_budget = 60.0 * args.budget_minutes * (os.cpu_count() or 1)
        calibration = {
            name: {
                "steps_per_second": 3 * steps / timed[name],
                "steps_per_cpu_second": 3 * steps / timed_cpu[name],
                "timed_steps": 3 * steps,
                "timed_seconds": timed[name],
                "timed_cpu_seconds": timed_cpu[name],
            }
            for name in presets
        }
        print(
            "rates: "
            + ", ".join(
                f"{name} {3 * steps / timed_cpu[name]:.2f} steps per CPU s ({3 * steps / timed[name]:.2f} per s)"
                for name in presets
            ),
            flush=True,
        )

        # 2. The runs, interleaved in chunks, each scored on the test split after every chunk.
        arms = {}
        for name in presets:
            total = max(args.evals, round(cpu_budget * 3 * steps / timed_cpu[name]))
            config = base[name].replace(trainer={"train_steps": total})
            arms[name] = {
                "config": config,
                "trainer": train.Trainer(config, f"{scratch}/{name}", strategy, verbose=False),
                "train_steps": total,
                "train_seconds": 0.0,
                "train_cpu_seconds": 0.0,
                "curve": [],
            }
        for chunk in range(1, args.evals + 1):
            for name in presets if chunk % 2 else presets[::-1]:
                arm = arms[name]
                step = round(arm["train_steps"] * chunk / args.evals)
                seconds, cpu_seconds = train_to(arm["trainer"], arm["config"], step)
                arm["train_seconds"] += seconds
                arm["train_cpu_seconds"] += cpu_seconds
                model = arm["trainer"].model
                with vdm_tf.runs.ema_weights(model):
                    result = vdm_tf.evaluation.dataset_bpd(
                        model, test_data(), arm["config"].trainer.eval_time_samples, seed=args.seed
                    )
                arm["curve"].append(
                    {
                        "step": step,
                        "train_seconds": arm["train_seconds"],
                        "chunk_seconds": seconds,
                        "train_cpu_seconds": arm["train_cpu_seconds"],
                        "load_average_1min": os.getloadavg()[0],
                        "bpd": result["bpd"],
                        "stderr": result["stderr"],
                    }
                )
                print(
                    f"  {name:<14} step {step:>5}  {arm['train_seconds']:6.0f} s  test VLB {result['bpd']:.3f} "
                    f"+- {result['stderr']:.3f}  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )

        # 3. The final bounds, EMA weights.
        results = {}
        for name, arm in arms.items():
            model = arm["trainer"].model
            with vdm_tf.runs.ema_weights(model):
                (vlb, vlb_seconds) = common.timed(
                    vdm_tf.evaluation.dataset_bpd,
                    model,
                    test_data(max(1, 2**20 // (args.time_samples * x_test[0].size))),  # K N copies at once
                    args.time_samples,
                    seed=args.seed,
                )
                per_image = vlb.pop("per_image")
                images = x_test[: args.ode_images]
                odes = []
                for dequantization in DEQUANTIZATIONS:
                    bound = ode_bound(model, dequantization)
                    if bound is None:
                        continue
                    out, seconds = common.timed(bound, images, seed=args.seed, rtol=args.tolerance, atol=args.tolerance)
                    bpd = out["bpd"].numpy().astype(np.float64)
                    difference = bpd - per_image[: len(bpd)]
                    odes.append(
                        {
                            "dequantization": dequantization,
                            "images": len(bpd),
                            "bpd": float(bpd.mean()),
                            "bpd_se": float(bpd.std(ddof=1) / math.sqrt(len(bpd))),
                            "minus_vlb": float(difference.mean()),
                            "minus_vlb_se": float(difference.std(ddof=1) / math.sqrt(len(bpd))),
                            "vlb_same_images": float(per_image[: len(bpd)].mean()),
                            "nfe": int(out["nfe"]),
                            "seconds": seconds,
                        }
                    )
                    print(
                        f"  {name:<14} ODE {dequantization:<17} {odes[-1]['bpd']:.3f} +- {odes[-1]['bpd_se']:.3f}  "
                        f"ODE - VLB {odes[-1]['minus_vlb']:+.3f} +- {odes[-1]['minus_vlb_se']:.3f}  ({seconds:.0f} s)",
                        flush=True,
                    )
            results[name] = {
                "config": arm["config"].flat(),
                "train_steps": arm["train_steps"],
                "train_seconds": arm["train_seconds"],
                "train_cpu_seconds": arm["train_cpu_seconds"],
                "curve": arm["curve"],
                "vlb": {**vlb, "seconds": vlb_seconds},
                "ode": odes,
            }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    entry = {
        "command": command,
        "presets": list(presets),
        "budget_minutes": args.budget_minutes,
        "evals": args.evals,
        "images": f"{args.dataset} {info.test_split} split: VLB on all {len(x_test)}, ODE on [:{args.ode_images}]",
        "time_samples": args.time_samples,
        "tolerance": args.tolerance,
        "probe": "rademacher",
        "seed": args.seed,
        "calibration": calibration,
        "notes": NOTES,
        "machine": machine,
        "load_average_1min_after": os.getloadavg()[0],
        "total_seconds": time.perf_counter() - start,
        "models": results,
    }
    everything = {"datasets": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            everything = json.load(f)
    everything["datasets"][args.dataset] = entry
    common.write_json(args.out, everything)
    print_table(entry)
    draw(everything, args.figure)
    print(f"wrote {args.out} and {args.figure} ({entry['total_seconds'] / 60:.1f} min)")


def ode_bound(model, dequantization):
    """(images, seed, rtol, atol) -> {"bpd", "nfe"}: the model's ODE bound with `dequantization`, or None."""
    import vdm_tf

    if hasattr(model, "sde"):
        return lambda images, **options: vdm_tf.likelihood.ode_bpd(
            model, images, dequantization=dequantization, **options
        )
    if dequantization == "truncated_normal" and hasattr(model, "ode_bpd"):
        return model.ode_bpd
    return None


def print_table(entry):
    print(
        f"\n{'preset':<14}{'steps':>6}{'train s':>8}{'test VLB':>16}"
        + "".join(f"{d[:12]:>28}" for d in DEQUANTIZATIONS)
    )
    for name, result in entry["models"].items():
        vlb = result["vlb"]
        line = f"{name:<14}{result['train_steps']:>6}{result['train_seconds']:>8.0f}"
        line += f"{vlb['bpd']:>9.3f} +- {vlb['stderr']:.3f}"
        odes = {ode["dequantization"]: ode for ode in result["ode"]}
        for dequantization in DEQUANTIZATIONS:
            ode = odes.get(dequantization)
            line += (
                f"{ode['bpd']:>9.3f} ({ode['minus_vlb']:+.3f} +- {ode['minus_vlb_se']:.3f})" if ode else f"{'-':>28}"
            )
        print(line)


def draw(everything, path):
    """Per data set: the learning curves, and ODE - VLB (paired) of the two comparable-or-not protocols."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(everything["datasets"])
    figure, axes = plt.subplots(len(datasets), 3, figsize=(12, 3.6 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        entry = everything["datasets"][dataset]
        for name, result in entry["models"].items():
            curve = result["curve"]
            row[0].errorbar(
                [p["train_seconds"] / 60 for p in curve],
                [p["bpd"] for p in curve],
                [p["stderr"] for p in curve],
                marker="o",
                capsize=3,
                label=f"{name} ({result['train_steps']} steps)",
            )
        row[0].set_xlabel("training wall-clock (minutes)")
        row[0].set_ylabel(f"test VLB (bpd, {dataset})")
        row[0].legend(fontsize=8)
        for axis, dequantization in zip(row[1:], ("variational", "truncated_normal")):
            pairs = [
                (name, ode)
                for name, result in entry["models"].items()
                for ode in result["ode"]
                if ode["dequantization"] == dequantization
            ]
            if not pairs:
                continue
            names, rows = (list(column) for column in zip(*pairs))
            axis.errorbar(
                range(len(names)), [r["minus_vlb"] for r in rows], [r["minus_vlb_se"] for r in rows], fmt="o", capsize=4
            )
            for i, r in enumerate(rows):
                axis.annotate(f"{r['minus_vlb']:+.3f}", (i, r["minus_vlb"]), textcoords="offset points", xytext=(8, 0))
            axis.axhline(0.0, color="gray", linewidth=0.8)
            axis.set_xticks(range(len(names)), names)
            axis.set_xlim(-0.5, len(names) - 0.5)
            axis.set_ylabel(f"ODE ({dequantization}) - VLB, bpd")
            axis.set_title(f"{rows[0]['images']} test images, paired", fontsize=9)
        for axis in row:
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    cli.run(main, prog="python -m bench.idode_evidence")
