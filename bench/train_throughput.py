"""Train-step throughput and time to the first step, side by side with the official JAX VDM.

    python -m bench.train_throughput --official_repo=PATH/vdm            # tiny, small, paper
    python -m bench.train_throughput --official_repo=PATH/vdm --configs=tiny --steps=6 --rounds=2

`PATH/vdm` is a checkout of google-research/vdm (`git clone https://github.com/google-research/vdm`;
the figures here used dc27b98). The JAX side runs in its own virtual environment, made by this
bench on first use (`--jax_venv`, default `bench/.jax-venv`: jax 0.10.2, flax 0.12.8, optax 0.2.8,
chex, ml_collections from the package registry); JAX is never a dependency of vdm_tf. Without
`--official_repo` only vdm_tf is timed.

Each configuration is the VDM CIFAR-10 setup at 32x32x3 (continuous time, Fourier features,
dropout 0.1, AdamW b1 0.9 / b2 0.99 / weight decay 0.01, EMA 0.9999 updated in the step) with a
smaller or larger U-Net, on random uint8 images. Every measurement is a fresh process, so the
first step includes all tracing and compilation, and each round is bracketed
JAX / vdm_tf `model.fit` / vdm_tf trainer loop / JAX, so that the two sides see the same machine
load (these machines are shared and noisy):

- `jax`: the official loss (`VDM.__call__`, learnable scalar schedule), AdamW with its decay mask
  and the EMA update under plain `jax.jit` (`bench/official_jax_step.py`).
- `fit`: `model.fit` on a `vdm_tf.VDM` with the same schedule (`LearnedLinear`) and
  `vdm_tf.optimizers.AdamW` (Keras's AdamW in TensorFlow's fused kernels), no XLA.
- `fit_keras` (only if asked for in `--paths`): the same with `keras.optimizers.AdamW`, to show
  what the fused optimizer changes.
- `trainer`: `trainers.train.Trainer`, the loop of `python -m trainers.main`, with the presets'
  learned monotone schedule and its variance objective (so its cost shows against `fit`), no XLA.

Reported per path: the median s/step over `--steps` steps after the first, images/s, the first
step alone, and the time to the first step (process start to the end of the first step:
imports, model construction, tracing, graph optimisation / compilation and the step), plus the
CPU model and whether oneDNN is on, the page faults per step (the memory a step takes that the
system had to map in again: 77,000 per paper-size trainer step unless `vdm_tf.prepare_process()`
keeps freed memory, see `vdm_tf._startup.keep_freed_memory`), and `other CPUs`: the CPUs that other processes kept busy
during the measurement (run the bench on an otherwise idle machine: one other busy process,
even niced, slows both sides' steps by about 1.6x on 2 cores). Prints a table; writes
bench/results/train_throughput.json, keeping the rows of the configurations not measured in this
run (so `--configs=paper --rounds=2` refreshes only the paper rows).

Rows are kept per CPU kind (`bench.common.cpu_kind`: vendor and family from the CPU model, "AMD EPYC",
"Intel Xeon"): the JSON is {"kinds": {kind: {"machine", "kernels", "results"}}, ...}, a run
replaces only its own kind's rows of the configurations it measured, and the table printed at
the end shows every kind.

Against the machine's limit: before and after the steps (a fresh process each, so the kernels
see the steps' machine load) the `kernels` worker times the network's dominant kernels in
TensorFlow: the 3x3 convolution 128 -> 128 channels at 32x32 (the paper U-Net never downsamples)
forward, and forward + backward (input and filter gradients), at batch 4, 128 and each measured
configuration's batch, and a 2048^3 float32 matrix product; GFLOP/s are 2 x multiply-adds per
second. Each configuration's train-step FLOPs are counted analytically
(`bench.scaling.train_step_flops`: the convolutions, shortcuts and attention products, forward
and backward = 3 x forward), so each row reports its achieved GFLOP/s and their share of the
convolution's forward + backward GFLOP/s at the configuration's batch. `--quick` (tiny, 2 steps,
1 round, fewer kernel repeats) checks the whole run in a few minutes.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from bench import common
from vdm_tf import cli

START = time.time()  # a worker's process start (imports included in the time to first step)

# name: (n_layers, n_embd, batch size)
CONFIGS = {"tiny": (2, 32, 8), "small": (4, 64, 16), "paper": (32, 128, 4)}
IMAGE_SHAPE = (32, 32, 3)
JAX_PACKAGES = ["jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "optax==0.2.8", "chex", "ml_collections"]
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# Workers: one measurement each, in a fresh process; print one JSON line.


def fit_model_and_data(n_layers, n_embd, batch_size, keras_adamw=False):
    """The `fit` path's compiled `vdm_tf.VDM` and its data: one batch of random uint8 images, repeated."""
    import keras
    import numpy as np
    import tensorflow as tf

    import vdm_tf

    keras.utils.set_random_seed(0)
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=n_layers, n_embd=n_embd, fourier_features=True, dropout=0.1)
    model = vdm_tf.VDM(denoiser, vdm_tf.schedules.LearnedLinear(), IMAGE_SHAPE)
    adamw = keras.optimizers.AdamW if keras_adamw else vdm_tf.optimizers.AdamW
    optimizer = adamw(2e-4, beta_2=0.99, weight_decay=0.01, use_ema=True, ema_momentum=0.9999)
    model.compile(optimizer=optimizer, jit_compile=False)
    images = np.random.default_rng(0).integers(0, 256, (batch_size,) + IMAGE_SHAPE, dtype=np.uint8)
    return model, tf.data.Dataset.from_tensors(images).repeat()


def minor_page_faults():
    """Page faults of this process so far that found the page in memory (no disk read)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepClock:
    """Each step's wall-clock seconds and page faults, and when the first step ended."""

    def __init__(self):
        self.seconds, self.page_faults, self.first_done = [], [], None

    def start(self):
        self._started = time.perf_counter(), minor_page_faults()

    def stop(self):
        started, faults = self._started
        self.seconds.append(time.perf_counter() - started)
        self.page_faults.append(minor_page_faults() - faults)
        self.first_done = self.first_done or time.time()


def _worker_fit(n_layers, n_embd, batch_size, steps, keras_adamw=False):
    import keras

    model, data = fit_model_and_data(n_layers, n_embd, batch_size, keras_adamw)
    clock = StepClock()
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: clock.start(), on_train_batch_end=lambda batch, logs: clock.stop()
    )
    model.fit(data, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[timer])
    return clock, model.count_params()


def _worker_trainer(n_layers, n_embd, batch_size, steps):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from trainers import configs, train

    config = configs.Config().replace(
        dataset="cifar10",
        n_layers=n_layers,
        n_embd=n_embd,
        dropout=0.1,
        fourier_exponents=(7, 8),
        batch_size=batch_size,
        train_steps=steps + 1,
        warmup_steps=100,
        jit_compile=False,
        checkpoint_every=10**9,
        log_every=10**9,
        sample_every=10**9,
    )
    clock = StepClock()
    # Random cifar10 examples through the real tfds input code, no download or prepared files.
    random_data = tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE)
    with tempfile.TemporaryDirectory() as model_dir, random_data:
        trainer = train.Trainer(config, model_dir, tf.distribute.get_strategy(), verbose=False)
        step_function = trainer._train_function

        def timed(chunk):
            clock.start()
            step_function(chunk)
            trainer.model.optimizer.iterations.numpy()  # waits for the step
            clock.stop()

        trainer._train_function = timed
        trainer.train()
        params = trainer.model.count_params()
    return clock, params


def conv_macs(batch_size, height=32, width=32, channels=128):
    """Multiply-adds of one 3x3 'same' convolution `channels` -> `channels` at `height` x `width`."""
    return batch_size * height * width * 9 * channels * channels


def _median_seconds(function, arguments, repeats):
    """Median wall-clock seconds of `function(*arguments)` (its outputs copied out) over `repeats` calls, after one."""
    import tensorflow as tf

    def call():
        tf.nest.map_structure(lambda tensor: tensor.numpy(), function(*arguments))

    call()
    return statistics.median(common.timed(call)[1] for _ in range(repeats))


def _worker_kernels(batches, repeats):
    """GFLOP/s of the 3x3 128-channel convolution (forward; forward + both gradients) and a 2048^3 matmul."""
    import tensorflow as tf

    forward = tf.function(lambda x, w, dy: tf.nn.conv2d(x, w, 1, "SAME"))

    @tf.function
    def forward_backward(x, w, dy):
        return (
            tf.nn.conv2d(x, w, 1, "SAME"),
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=w, out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME"
            ),
            tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(w), out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME"
            ),
        )

    rows = []

    def add(kernel, batch, flops, function, arguments):
        seconds = _median_seconds(function, arguments, repeats)
        rows.append(
            {"kernel": kernel, "batch_size": batch, "flops": flops, "seconds": seconds,
             "gflops_per_second": flops / seconds / 1e9}
        )  # fmt: skip

    for batch in batches:
        x, dy = tf.random.normal([batch, 32, 32, 128]), tf.random.normal([batch, 32, 32, 128])
        w = tf.random.normal([3, 3, 128, 128], stddev=0.03)
        add("conv3x3 forward", batch, 2 * conv_macs(batch), forward, (x, w, dy))
        add("conv3x3 forward+backward", batch, 3 * 2 * conv_macs(batch), forward_backward, (x, w, dy))
    a = tf.random.normal([2048, 2048])
    add("matmul 2048^3", None, 2 * 2048**3, tf.function(tf.linalg.matmul), (a, a))
    return rows


def run_worker(args):
    import vdm_tf

    vdm_tf.prepare_process()  # as the README's fit snippet and every command line do: before TensorFlow
    if args.worker == "kernels":
        batches = [int(b) for b in args.config.split(",")]
        print(json.dumps({"kernels": _worker_kernels(batches, args.steps)}))
        return
    n_layers, n_embd, batch_size = CONFIGS[args.config]
    work = {
        "fit": _worker_fit,
        "fit_keras": lambda *a: _worker_fit(*a, keras_adamw=True),
        "trainer": _worker_trainer,
    }[args.worker]
    clock, params = work(n_layers, n_embd, batch_size, args.steps)
    started = float(os.environ.get("BENCH_LAUNCHED", START))
    print(
        json.dumps(
            {
                "first_step_seconds": clock.seconds[0],
                "seconds_per_step": statistics.median(clock.seconds[1:]),
                "step_seconds": clock.seconds[1:],
                "page_faults_per_step": statistics.median(clock.page_faults[1:]),
                "time_to_first_step": clock.first_done - started,
                "params": params,
            }
        )
    )


def train_flops_per_step(name):
    """FLOPs of one train step of configuration `name` (forward and backward, its whole batch).

    Analytic, `bench.scaling.train_step_flops` (the CIFAR-10 ScoreUNet's convolutions, 1x1
    shortcuts and attention products, x 2 per multiply-add, x 3 for forward and backward).
    """
    from bench.scaling import train_step_flops
    from trainers import configs

    n_layers, n_embd, batch_size = CONFIGS[name]
    config = configs.Config().replace(dataset="cifar10", n_layers=n_layers, n_embd=n_embd, fourier_exponents=(7, 8))
    return train_step_flops(config) * batch_size


def kernel_rate(kernels, kernel, batch_size=None):
    """Median GFLOP/s of `kernel` at `batch_size` over the `kernels` rows (both sides of the bracket)."""
    rates = [row["gflops_per_second"] for row in kernels if row["kernel"] == kernel and row["batch_size"] == batch_size]
    return statistics.median(rates) if rates else float("nan")


# ----------------------------------------------------------------------------------------------
# Accelerators, by FLOP arithmetic (no accelerator here).

# Dense peak FLOP/s per device as the vendors state them; "float32" is what TensorFlow runs for
# float32 convolutions and matrix products by default: TF32 tensor cores on A100 / H100
# (`tf.config.experimental.enable_tensor_float_32_execution` is on by default) and bfloat16
# passes on TPU matrix units (XLA's default precision), so float32 is not much slower there in
# FLOPs; it moves twice the bytes, which the estimate ignores.
ACCELERATORS = {
    "TPU v3-8 (8 cores)": {"float32": 420e12, "bfloat16": 420e12},
    "A100 SXM": {"float32": 156e12, "bfloat16": 312e12},
    "H100 SXM": {"float32": 494e12, "bfloat16": 989e12},
}
ASSUMED_UTILISATION = 0.4  # of peak, for a convolutional U-Net with many small ops (as bench/scaling.py)


def accelerator_estimates():
    """Seconds per step of the paper's CIFAR-10 configuration (batch 128) on accelerators.

    FLOPs from `bench.scaling.train_step_flops` (convolutions and attention, forward and
    backward) at `ASSUMED_UTILISATION` of the peak. The float32 figures assume TF32 or bfloat16
    passes in the matrix units (TensorFlow's defaults there); with full-precision float32 the
    A100 would be at 19.5 and the H100 at 67 TFLOP/s, 8x and 7x slower.
    """
    from bench.scaling import train_step_flops
    from trainers.configs import PRESETS

    config = PRESETS["cifar10"]
    step_flops = train_step_flops(config) * config.data.batch_size
    return {
        "config": "cifar10 preset (32 x 128 ScoreUNet, 32x32x3)",
        "batch_size": config.data.batch_size,
        "train_flops_per_step": step_flops,
        "assumed_utilisation": ASSUMED_UTILISATION,
        "seconds_per_step": {
            device: {dtype: step_flops / (peak * ASSUMED_UTILISATION) for dtype, peak in peaks.items()}
            for device, peaks in ACCELERATORS.items()
        },
    }


# ----------------------------------------------------------------------------------------------
# The driver.


def jax_python(venv):
    """The JAX virtual environment's Python, made on first use."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"making the JAX environment {venv} ({' '.join(JAX_PACKAGES)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", *JAX_PACKAGES], check=True)
    return python


def busy_cpu_seconds():
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat; 0 elsewhere."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    with open("/proc/stat") as f:
        user, nice, system, _, _, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def measure(command):
    """Runs one worker; its JSON line (with the time to first step from this launch).

    Adds `other_cpus`: how many CPUs other processes kept busy on average while the worker ran.
    One busy process, even at `nice 19`, slows a 2-core TensorFlow or XLA step by about 1.6x
    here (the intra-op thread pools wait for their slowest thread), so a figure with
    `other_cpus` well above 0 is not an idle machine's.
    """
    env = dict(os.environ, BENCH_LAUNCHED=repr(time.time()), TF_CPP_MIN_LOG_LEVEL="2")
    busy, children, start = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    other = max(0.0, busy_cpu_seconds() - busy - worker_cpu)
    return json.loads(lines[-1]) | {"other_cpus": round(other / (time.time() - start), 3)}


def summary(runs):
    keys = ("seconds_per_step", "first_step_seconds", "time_to_first_step", "other_cpus", "page_faults_per_step")
    return {key: statistics.median(run[key] for run in runs) for key in keys} | {"params": runs[0]["params"]}


PROG = "python -m bench.train_throughput"


def main(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,small,paper")
    parser.add_argument("--paths", default="fit,trainer", help="vdm_tf paths to time: fit, fit_keras, trainer")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the first")
    parser.add_argument("--rounds", type=int, default=1, help="bracketed rounds per configuration")
    parser.add_argument("--kernel_repeats", type=int, default=5, help="timed calls per kernel (after one)")
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 steps, 1 round, 2 kernel repeats")
    parser.add_argument("--official_repo", default=None, help="a checkout of google-research/vdm")
    parser.add_argument("--jax_venv", default=os.path.join(HERE, ".jax-venv"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "train_throughput.json"))
    parser.add_argument("--worker", choices=["fit", "fit_keras", "trainer", "kernels"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.quick:
        args.configs, args.steps, args.rounds, args.kernel_repeats = "tiny", 2, 1, 2
    names = args.configs.split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")
    if min(args.steps, args.rounds, args.kernel_repeats) < 1:
        parser.error("--steps, --rounds and --kernel_repeats take positive integers")
    if args.official_repo and not os.path.exists(os.path.join(args.official_repo, "model_vdm.py")):
        parser.error(f"--official_repo={args.official_repo} holds no model_vdm.py (a google-research/vdm checkout)")
    paths = args.paths.split(",")
    if set(paths) - {"fit", "fit_keras", "trainer"}:
        parser.error(f"unknown --paths {args.paths}; expected some of fit, fit_keras, trainer")
    jax = jax_python(args.jax_venv) if args.official_repo else None
    kernel_batches = ",".join(map(str, sorted({4, 128} | {CONFIGS[name][2] for name in names})))
    kernels_command = [
        sys.executable,
        "-m",
        "bench.train_throughput",
        "--worker=kernels",
        f"--config={kernel_batches}",
        f"--steps={args.kernel_repeats}",
    ]
    print("timing the kernels (before the steps)", flush=True)
    kernel_runs = [measure(kernels_command)]
    measured = {}
    for name in names:
        n_layers, n_embd, batch_size = CONFIGS[name]
        runs = {path: [] for path in ["jax"] * bool(jax) + paths}
        for _ in range(args.rounds):
            jax_command = [
                jax,
                os.path.join(HERE, "official_jax_step.py"),
                f"--official_repo={args.official_repo}",
                f"--n_layers={n_layers}",
                f"--n_embd={n_embd}",
                f"--batch_size={batch_size}",
                f"--steps={args.steps}",
            ]
            if jax:
                runs["jax"].append(measure(jax_command))
            for path in paths:
                worker = [sys.executable, "-m", "bench.train_throughput", f"--worker={path}", f"--config={name}"]
                runs[path].append(measure(worker + [f"--steps={args.steps}"]))
            if jax:  # the bracket's other side
                runs["jax"].append(measure(jax_command))
        measured[name] = runs
        print(f"measured {name}", flush=True)
    print("timing the kernels (after the steps)", flush=True)
    kernel_runs.append(measure(kernels_command))
    kernels = [row | {"other_cpus": run["other_cpus"]} for run in kernel_runs for row in run["kernels"]]

    results = []
    for name, runs in measured.items():
        n_layers, n_embd, batch_size = CONFIGS[name]
        flops = train_flops_per_step(name)
        conv_rate = kernel_rate(kernels, "conv3x3 forward+backward", batch_size)
        figures = {path: summary(runs_of_path) for path, runs_of_path in runs.items()}
        for path, figure in figures.items():
            rate = flops / figure["seconds_per_step"] / 1e9
            results.append(
                dict(
                    config=name,
                    path=path,
                    n_layers=n_layers,
                    n_embd=n_embd,
                    batch_size=batch_size,
                    steps=args.steps,
                    rounds=args.rounds,
                    images_per_second=batch_size / figure["seconds_per_step"],
                    speed_vs_jax=figures["jax"]["seconds_per_step"] / figure["seconds_per_step"] if jax else None,
                    train_flops_per_step=flops,
                    gflops_per_second=rate,
                    conv_gflops_per_second=conv_rate,
                    share_of_conv=rate / conv_rate,
                    runs=runs[path],
                    **figure,
                )
            )
    machine = common.machine()
    kind = common.cpu_kind(machine["cpu"])
    estimates = accelerator_estimates()
    section = {"machine": machine, "kernels": kernels, "results": results}
    kinds = common.merge_kind(
        common.read_kinds(args.out, SHARED_KEYS), kind, section, CONFIGS
    )  # read before the rewrite
    print_kernels(kind, kernels)
    print_table(kinds)
    print(
        f"paper configuration on accelerators (FLOP arithmetic, {estimates['train_flops_per_step'] / 1e12:.1f} "
        f"TFLOP per step at batch {estimates['batch_size']}, {ASSUMED_UTILISATION:.0%} of peak):"
    )
    for device, seconds in estimates["seconds_per_step"].items():
        print(f"  {device:<20} " + "  ".join(f"{dtype} {value:.3f} s/step" for dtype, value in seconds.items()))
    common.write_json(args.out, {"kinds": kinds, "accelerator_estimates": estimates})
    print(f"wrote {args.out}")


SHARED_KEYS = ("accelerator_estimates",)  # top-level entries of the JSON that belong to no CPU kind


def print_kernels(kind, kernels):
    """The kernels' GFLOP/s of this run, both sides of the bracket."""
    print(f"\n{kind}: kernels, GFLOP/s before / after the steps (other CPUs)")
    for kernel in dict.fromkeys(row["kernel"] for row in kernels):
        for batch in dict.fromkeys(row["batch_size"] for row in kernels if row["kernel"] == kernel):
            rows = [row for row in kernels if row["kernel"] == kernel and row["batch_size"] == batch]
            label = f"{kernel}" + (f", batch {batch}" if batch else "")
            figures = " / ".join(f"{row['gflops_per_second']:.1f} ({row['other_cpus']:.2f})" for row in rows)
            print(f"  {label:<38}{figures}")


def print_table(kinds):
    """Every kind's rows: s/step, against JAX, first step, GFLOP/s and share of the convolution kernel's."""
    for kind, section in kinds.items():
        print(f"\n{kind} ({section['machine']['cpu']}, {section['machine'].get('cpus')} CPUs)")
        print(
            f"{'config':<7}{'path':<10}{'params':>12}{'s/step':>9}{'img/s':>8}{'vs jax':>8}{'1st step s':>12}"
            f"{'to 1st step s':>15}{'other CPUs':>12}{'faults/step':>13}{'GFLOP/s':>9}{'of conv':>9}"
        )
        for row in section["results"]:
            ratio = f"{row['speed_vs_jax']:.2f}x" if row.get("speed_vs_jax") else "-"
            rate = f"{row['gflops_per_second']:.1f}" if "gflops_per_second" in row else "-"  # rows before the count
            share = f"{row['share_of_conv']:.0%}" if "share_of_conv" in row else "-"
            print(
                f"{row['config']:<7}{row['path']:<10}{row['params']:>12,}{row['seconds_per_step']:>9.3f}"
                f"{row['images_per_second']:>8.1f}{ratio:>8}{row['first_step_seconds']:>12.1f}"
                f"{row['time_to_first_step']:>15.1f}{row['other_cpus']:>12.2f}{row['page_faults_per_step']:>13.0f}"
                f"{rate:>9}{share:>9}"
            )


if __name__ == "__main__":
    cli.run(main, prog=PROG)
