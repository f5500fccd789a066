"""VDM's schedule claim on digits: a learned schedule against a fixed linear one.

    python -m bench.schedule_claim --quick          # smoke run: 40 steps each, 2 evaluations
    python -m bench.schedule_claim                  # 400 steps each, evaluated every 100 (about 20 min)

Kingma et al. 2021 (section 5.1, appendix I.2, figure 5): the continuous-time VLB depends on
the noise schedule only through its endpoints gamma_0, gamma_1; the shape in between changes
only the variance of the VLB's Monte-Carlo estimate, and learning the shape to minimise that
variance makes optimisation faster. Two models of the `digits` preset (same network, optimiser,
batches and seed) train for `--train_steps`: its learned schedule (`LearnedMonotonic`, shape on
the variance, endpoints on the VLB) and `FixedLinear` from the preset's gamma_min to gamma_max;
a third, `LearnedLinear` (endpoints learned on the VLB, shape linear), separates the two things
the learned schedule changes: learned against learned-linear is the shape's effect,
learned-linear against fixed-linear the endpoints'.
Every `--eval_every` steps each model's EMA weights are measured:

(a) Estimator variance. For each of the 297 digits test images, `--variance_draws` estimates
    of the continuous-time diffusion loss with one time sample each (`model.elbo(x, seed=s,
    num_time_samples=1)["diffusion"]`, bpd; a fresh t and eps for every draw s): their variance
    per image, averaged over the images, is the variance of the one-sample estimator. The learned
    model is measured twice with the same network: under its schedule, and under
    `FixedLinear(gamma_0, gamma_1)` with its learned endpoints, whose expected loss is the same
    (invariance; the mean's difference is printed as a check) and whose variance is the
    claim's baseline. The fixed-schedule model's own variance is given too.
(b) Optimisation. The test VLB (bpd, `--eval_time_samples` antithetic times per image) against
    steps and training seconds (after the first, tracing step; evaluations excluded), with the
    paired standard error of each pair's difference (the same images, times and noise). At
    equal steps: each evaluation.
    At equal wall-clock and at equal CPU time (this process's, which moves less than the wall
    clock with other jobs on a shared machine): every curve read at the shortest run's training
    time (linear interpolation between evaluations); the learned schedule's step costs more.

On a shared 2-core CPU the seconds depend on the load: the JSON records it at every evaluation.
Writes bench/results/schedule_claim[_quick].json.
"""

import os
import sys
import time

import numpy as np

from bench import common
from bench.pc_corrector import positive_integer
from vdm_tf import cli

# (first, second, what their difference isolates): paired test-bpd differences at equal steps.
PAIRS = (
    ("learned", "fixed_linear", "learned schedule (shape and endpoints)"),
    ("learned", "learned_linear", "the learned shape (both learn their endpoints)"),
    ("learned_linear", "fixed_linear", "the learned endpoints (both linear)"),
)
QUICK = {"train_steps": 40, "eval_every": 20, "variance_draws": 4, "eval_time_samples": 2}


def parse_args(argv):
    parser = cli.ArgumentParser(prog="python -m bench.schedule_claim", description=__doc__.split("\n")[0])
    parser.add_argument("--train_steps", type=positive_integer, default=400, help="Steps of each model.")
    parser.add_argument("--eval_every", type=positive_integer, default=100, help="Steps between evaluations.")
    parser.add_argument(
        "--variance_draws", type=positive_integer, default=8, help="One-sample estimates per test image (>= 2)."
    )
    parser.add_argument("--eval_time_samples", type=positive_integer, default=4, help="Times per image of the VLB.")
    parser.add_argument("--quick", action="store_true", help=f"A smoke run: {QUICK}.")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/schedule_claim[_quick].json).")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.variance_draws < 2:
        raise cli.Failure(f"--variance_draws must be >= 2 (a variance); got {args.variance_draws}.")
    if args.train_steps % args.eval_every:
        raise cli.Failure(f"--train_steps ({args.train_steps}) must be a multiple of --eval_every ({args.eval_every}).")
    args.out = args.out or f"bench/results/schedule_claim{'_quick' if args.quick else ''}.json"
    directory = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(directory):
        raise cli.Failure(f"--out: expected a file in an existing directory; {directory} is not one.")
    return args


def one_sample_diffusion(model, images, draws):
    """[draws, N] one-time-sample estimates (bpd) of each image's continuous-time diffusion loss."""
    return np.stack([model.elbo(images, seed=draw, num_time_samples=1)["diffusion"].numpy() for draw in range(draws)])


def variance_summary(estimates):
    """Mean over images of the per-image variance of the draws (ddof 1), with its standard error, and the mean."""
    per_image = estimates.var(axis=0, ddof=1)
    return {
        "variance": float(per_image.mean()),
        "variance_se": float(per_image.std(ddof=1) / np.sqrt(len(per_image))),
        "mean": float(estimates.mean()),
    }


def fixed_twin(model):
    """`model`'s network under `FixedLinear` with `model`'s current endpoints: the same VLB, another shape."""
    import vdm_tf

    schedule = vdm_tf.schedules.FixedLinear(float(model.schedule.gamma_0), float(model.schedule.gamma_1))
    return vdm_tf.VDM(model.denoiser, schedule, model.image_shape, pixel_values=model.pixel_values)


def evaluate(model, images, args, learned):
    """(figures of the EMA weights of `model` now, per-image test bpd) — see the module docstring."""
    import vdm_tf

    with vdm_tf.runs.ema_weights(model):
        bpd = model.elbo(images, seed=0, num_time_samples=args.eval_time_samples)["bpd"].numpy()
        own = one_sample_diffusion(model, images, args.variance_draws)
        figures = {
            "bpd": float(bpd.mean()),
            "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(len(bpd))),
            "gamma_0": float(model.schedule.gamma_0),
            "gamma_1": float(model.schedule.gamma_1),
            "diffusion_estimator": variance_summary(own),
        }
        if learned:
            linear = one_sample_diffusion(fixed_twin(model), images, args.variance_draws)
            figures["diffusion_estimator_fixed_linear_same_endpoints"] = variance_summary(linear)
            _, figures["mean_difference_se"] = common.paired_gap(own.mean(axis=0), linear.mean(axis=0))
    return figures, bpd


def train_curve(config, images, args, learned):
    """Trains `config`'s model with `model.fit`, evaluating every --eval_every steps; returns its curve."""
    import keras

    import vdm_tf

    model = vdm_tf.runs.compiled_model(config, seed=config.trainer.seed)
    data = vdm_tf.datasets.load("digits", "train", config.data.batch_size, seed=config.trainer.seed)
    curve, per_image = [], []
    clock = {"first_step_end": None, "first_step_cpu": None, "evaluating": 0.0, "evaluating_cpu": 0.0}

    def on_train_batch_end(batch, logs):
        if clock["first_step_end"] is None:
            clock["first_step_end"], clock["first_step_cpu"] = time.perf_counter(), time.process_time()

    def on_epoch_end(epoch, logs):
        start, start_cpu = time.perf_counter(), time.process_time()
        load = os.getloadavg()[0]
        figures, bpd = evaluate(model, images, args, learned)
        steps = (epoch + 1) * args.eval_every
        seconds = start - clock["first_step_end"] - clock["evaluating"]
        cpu_seconds = start_cpu - clock["first_step_cpu"] - clock["evaluating_cpu"]
        curve.append(
            {
                "steps": steps,
                "train_seconds": seconds,
                "train_cpu_seconds": cpu_seconds,
                "load_average_1min": load,
                **figures,
            }
        )
        per_image.append(bpd)
        clock["evaluating"] += time.perf_counter() - start
        clock["evaluating_cpu"] += time.process_time() - start_cpu
        line = f"  step {steps:>5} {seconds:7.1f} s ({cpu_seconds:7.1f} CPU s)"
        line += f"  test bpd {figures['bpd']:.3f} +- {figures['bpd_stderr']:.3f}"
        line += f"  Var[one-sample diffusion] {figures['diffusion_estimator']['variance']:.4f}"
        if learned:
            linear = figures["diffusion_estimator_fixed_linear_same_endpoints"]
            line += f" (fixed linear, same endpoints: {linear['variance']:.4f})"
        print(f"{line}  load {load:.1f}", flush=True)

    callback = keras.callbacks.LambdaCallback(on_train_batch_end=on_train_batch_end, on_epoch_end=on_epoch_end)
    epochs = args.train_steps // args.eval_every
    model.fit(data, steps_per_epoch=args.eval_every, epochs=epochs, verbose=0, callbacks=[callback])
    return curve, np.stack(per_image)


def at_seconds(curve, seconds, clock="train_seconds"):
    """The curve's bpd at `seconds` of training (`clock`: wall or CPU), linear between evaluations (None before
    the first one)."""
    times = [point[clock] for point in curve]
    if seconds < times[0]:
        return None
    return float(np.interp(seconds, times, [point["bpd"] for point in curve]))


def main(argv=None):
    args = parse_args(argv)
    common.prepare()
    import keras

    import vdm_tf
    from trainers import configs

    keras.utils.set_random_seed(0)
    machine = common.machine()
    images = vdm_tf.datasets.digits_arrays("test")
    preset = configs.PRESETS["digits"].replace(train_steps=args.train_steps)
    runs = {
        "learned": preset,  # LearnedMonotonic, minimize_variance
        "learned_linear": preset.replace(schedule={"kind": "learned_linear"}),
        "fixed_linear": preset.replace(schedule={"kind": "fixed_linear"}),
    }
    curves, per_image = {}, {}
    for name, config in runs.items():
        print(f"{name} schedule ({config.schedule.kind}), {args.train_steps} steps", flush=True)
        curves[name], per_image[name] = train_curve(config, images, args, learned=name == "learned")
    equal_steps = []
    for index, point in enumerate(curves["learned"]):
        row = {"steps": point["steps"], "bpd": {name: curves[name][index]["bpd"] for name in runs}}
        for first, second, meaning in PAIRS:
            mean, se = common.paired_gap(per_image[first][index], per_image[second][index])
            row[f"{first} - {second}"] = {"mean": mean, "se": se, "meaning": meaning}
        equal_steps.append(row)
    equal_time = {}
    for clock in ("train_seconds", "train_cpu_seconds"):
        shortest = min(curve[-1][clock] for curve in curves.values())
        equal_time[clock] = {clock: shortest, **{name: at_seconds(curves[name], shortest, clock) for name in curves}}
    print("\nat equal steps: test bpd differences (paired SE)")
    for row in equal_steps:
        pairs = "  ".join(
            f"{first} - {second} {row[f'{first} - {second}']['mean']:+.3f} +- {row[f'{first} - {second}']['se']:.3f}"
            for first, second, _ in PAIRS
        )
        print(f"  step {row['steps']:>5}: {pairs}")
    for clock, label in (("train_seconds", "wall-clock"), ("train_cpu_seconds", "CPU time")):
        read = equal_time[clock]
        bpd = ", ".join(f"{name} {'n/a' if read[name] is None else format(read[name], '.3f')}" for name in curves)
        print(f"at equal {label} ({read[clock]:.0f} s of training): {bpd}")
    last = curves["learned"][-1]
    own, linear = last["diffusion_estimator"], last["diffusion_estimator_fixed_linear_same_endpoints"]
    others = ", ".join(f"{name} model {curves[name][-1]['diffusion_estimator']['variance']:.4f}" for name in runs)
    print(
        f"variance of the one-sample diffusion loss (bpd^2), learned model at step {last['steps']}: "
        f"{own['variance']:.4f} +- {own['variance_se']:.4f} under its schedule, "
        f"{linear['variance']:.4f} +- {linear['variance_se']:.4f} under FixedLinear with its endpoints "
        f"(means {own['mean']:.4f} / {linear['mean']:.4f}, difference SE {last['mean_difference_se']:.4f}); "
        f"each under its own schedule: {others}"
    )
    common.write_json(
        args.out,
        {
            "settings": {key: value for key, value in vars(args).items() if key != "out"},
            "preset": "digits",
            "machine": machine,
            "load_average_1min_after": os.getloadavg()[0],
            "notes": "bpd: test VLB of the EMA weights over the 297 digits test images; +- standard error over "
            "images, differences paired. Variance: per-image variance (ddof 1) of one-time-sample estimates of the "
            "continuous-time diffusion loss in bpd, averaged over the test images, +- its standard error over "
            "images. train_seconds (wall) and train_cpu_seconds (this process) exclude evaluations; measured on a "
            "shared 2-core CPU (load per evaluation).",
            "curves": curves,
            "equal_steps": equal_steps,
            "equal_wall_clock": equal_time["train_seconds"],
            "equal_cpu_time": equal_time["train_cpu_seconds"],
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:], prog="python -m bench.schedule_claim")
