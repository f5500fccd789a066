"""Inference side by side with the official JAX VDM: the ELBO with K time samples, and ancestral sampling.

    python -m bench.inference_throughput --official_repo=PATH/vdm               # tiny, small, paper
    python -m bench.inference_throughput --official_repo=PATH/vdm --smoke       # tiny, K = 2, T = 4

The same networks as bench/train_throughput.py (the CIFAR-10 setup at 32x32x3 with a tiny, small
or paper-size U-Net; random weights, learned linear schedule from -13.3 to 5) and the same
random uint8 images, a batch of the configuration's batch size:

- `elbo`: vdm_tf's `model.elbo(x, seed=..., num_time_samples=K)` (the README's call) against
  the official evaluation loss (`Experiment_VDM.loss_fn`, `is_train=False`) on the batch
  repeated K times (`bench/official_jax_inference.py`); images per second.
- `sample`: vdm_tf's `model.sample(n, num_steps=T, seed=...)` against the official
  `Experiment_VDM.sample_fn` (T calls of `VDM.sample` in a `lax.fori_loop`, then
  `VDM.generate_x`) under `jax.jit`; seconds per batch of n images.

Every measurement is a fresh process, bracketed official / vdm_tf / official, and reports the
first call (tracing or compilation and one call) apart from the median of `--repeats` later
calls (new seeds), the time from process start to the first result, and `other CPUs` (see
bench/train_throughput.py). The official side runs in the JAX environment of
bench/train_throughput.py (`--jax_venv`). Prints a table per CPU kind; writes
bench/results/inference_throughput.json ({"kinds": {kind: {"machine", "results"}}}), keeping the
other kinds' rows and this kind's rows of configurations not measured now; `--smoke` writes
bench/results/inference_throughput_smoke.json unless `--out` says otherwise.
"""

import argparse
import json
import os
import statistics
import sys
import time

from bench import common
from bench import train_throughput as train
from vdm_tf import cli

START = time.time()
PROG = "python -m bench.inference_throughput"
HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("elbo", "sample")


def _worker(task, name, num_time_samples, num_steps, repeats):
    """One side's timings of `task` on vdm_tf, as the README's calls make them."""
    import keras

    import vdm_tf
    from bench.official_jax_step import random_images

    keras.utils.set_random_seed(0)
    n_layers, n_embd, batch_size = train.CONFIGS[name]
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=n_layers, n_embd=n_embd, fourier_features=True, dropout=0.1)
    model = vdm_tf.VDM(denoiser, vdm_tf.schedules.LearnedLinear(), train.IMAGE_SHAPE)
    images = random_images(batch_size)
    if task == "elbo":
        call = lambda seed: model.elbo(images, seed=seed, num_time_samples=num_time_samples)["bpd"].numpy()
    else:
        call = lambda seed: model.sample(batch_size, num_steps=num_steps, seed=seed).numpy()
    durations, outputs, first_done = [], None, None
    for seed in range(repeats + 1):
        outputs, seconds = common.timed(call, seed)
        durations.append(seconds)
        first_done = first_done or time.time()
    result = {
        "first_call_seconds": durations[0],
        "seconds": statistics.median(durations[1:]),
        "call_seconds": durations[1:],
        "time_to_first_result": first_done - float(os.environ.get("BENCH_LAUNCHED", START)),
        "params": model.count_params(),
    }
    if task == "elbo":
        result["bpd"] = float(outputs.mean())
    return result


def main(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,small,paper")
    parser.add_argument("--num_time_samples", type=int, default=8, help="K, time samples per image of the ELBO")
    parser.add_argument("--num_steps", type=int, default=256, help="T, ancestral sampling steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed ELBO calls after the first")
    parser.add_argument("--sample_repeats", type=int, default=1, help="timed sampling calls after the first")
    parser.add_argument("--smoke", action="store_true", help="tiny only, K = 2, T = 4, one repeat: checks the run")
    parser.add_argument("--official_repo", default=None, help="a checkout of google-research/vdm")
    parser.add_argument("--jax_venv", default=os.path.join(HERE, ".jax-venv"))
    parser.add_argument("--out", default=None, help="default bench/results/inference_throughput[_smoke].json")
    parser.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        common.prepare()  # as the README's snippet: before TensorFlow
        result = _worker(args.worker, args.config, args.num_time_samples, args.num_steps, args.repeats)
        print(json.dumps(result))
        return
    if args.smoke:
        args.configs, args.num_time_samples, args.num_steps, args.repeats, args.sample_repeats = "tiny", 2, 4, 1, 1
    names = args.configs.split(",")
    unknown = [name for name in names if name not in train.CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {', '.join(unknown)}; expected some of {', '.join(train.CONFIGS)}")
    if min(args.num_time_samples, args.num_steps, args.repeats, args.sample_repeats) < 1:
        parser.error("--num_time_samples, --num_steps, --repeats and --sample_repeats take positive integers")
    if args.official_repo and not os.path.exists(os.path.join(args.official_repo, "model_vdm.py")):
        parser.error(f"--official_repo={args.official_repo} holds no model_vdm.py (a google-research/vdm checkout)")
    out = args.out or os.path.join(HERE, "results", f"inference_throughput{'_smoke' * args.smoke}.json")
    jax = train.jax_python(args.jax_venv) if args.official_repo else None
    results = []
    for name in names:
        n_layers, n_embd, batch_size = train.CONFIGS[name]
        for task in TASKS:
            repeats = args.repeats if task == "elbo" else args.sample_repeats
            settings = [f"--num_time_samples={args.num_time_samples}", f"--num_steps={args.num_steps}"]
            official = [
                jax, os.path.join(HERE, "official_jax_inference.py"), f"--official_repo={args.official_repo}",
                f"--task={task}", f"--n_layers={n_layers}", f"--n_embd={n_embd}", f"--batch_size={batch_size}",
                f"--repeats={repeats}", *settings,
            ]  # fmt: skip
            ours = [sys.executable, "-m", "bench.inference_throughput", f"--worker={task}", f"--config={name}"]
            runs = {"official": [], "vdm_tf": []}
            if jax:
                runs["official"].append(train.measure(official))
            runs["vdm_tf"].append(train.measure(ours + [f"--repeats={repeats}", *settings]))
            if jax:  # the bracket's other side
                runs["official"].append(train.measure(official))
            for side, measured in runs.items():
                if measured:
                    results.append(row(name, task, side, measured, runs, args.num_time_samples, args.num_steps))
                    print_row(results[-1])
    machine = common.machine()
    kind = common.cpu_kind(machine["cpu"])
    kinds = common.merge_kind(common.read_kinds(out), kind, {"machine": machine, "results": results}, train.CONFIGS)
    print_table(kinds)
    common.write_json(out, {"kinds": kinds})
    print(f"wrote {out}")


def row(name, task, side, measured, runs, num_time_samples, num_steps):
    """One side's figures for one configuration and task: medians over its runs."""
    n_layers, n_embd, batch_size = train.CONFIGS[name]
    median = lambda key: statistics.median(run[key] for run in measured)
    seconds = median("seconds")
    official = statistics.median(run["seconds"] for run in runs["official"]) if runs["official"] else None
    return {
        "config": name,
        "task": task,
        "side": side,
        "n_layers": n_layers,
        "n_embd": n_embd,
        "batch_size": batch_size,
        "num_time_samples": num_time_samples if task == "elbo" else None,
        "num_steps": num_steps if task == "sample" else None,
        "seconds": seconds,
        "images_per_second": batch_size / seconds,
        "speed_vs_official": official / seconds if official else None,
        "first_call_seconds": median("first_call_seconds"),
        "time_to_first_result": median("time_to_first_result"),
        "other_cpus": median("other_cpus"),
        "params": measured[0]["params"],
        "runs": measured,
    }


def print_row(row):
    ratio = f"{row['speed_vs_official']:.2f}x" if row["speed_vs_official"] else "-"
    setting = f"K={row['num_time_samples']}" if row["task"] == "elbo" else f"T={row['num_steps']}"
    print(
        f"{row['config']:<7}{row['task'] + ' ' + setting:<12}{row['side']:<10}{row['batch_size']:>6}"
        f"{row['seconds']:>10.3f}{row['images_per_second']:>9.2f}{ratio:>10}{row['first_call_seconds']:>12.1f}"
        f"{row['time_to_first_result']:>12.1f}{row['other_cpus']:>12.2f}",
        flush=True,
    )


def print_table(kinds):
    """Every CPU kind's rows."""
    for kind, section in kinds.items():
        print(f"\n{kind} ({section['machine']['cpu']}, {section['machine'].get('cpus')} CPUs)")
        print(
            f"{'config':<7}{'task':<12}{'side':<10}{'batch':>6}{'s/batch':>10}{'img/s':>9}{'vs off.':>10}"
            f"{'1st call s':>12}{'to 1st s':>12}{'other CPUs':>12}"
        )
        for result in section["results"]:
            print_row(result)


if __name__ == "__main__":
    cli.run(main, prog=PROG)
