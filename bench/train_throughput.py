"""Train-step throughput on the CPU, against the official JAX VDM on the same machine kind.

    python -m bench.train_throughput                       # tiny, small, paper; XLA on and off
    python -m bench.train_throughput --configs=tiny,small --steps=10

Each configuration is the VDM CIFAR-10 setup at 32x32x3 (continuous time, Fourier features,
learnable linear schedule, dropout 0.1, AdamW b2 0.99 with weight decay 0.01 and EMA 0.9999
updated in the step) with a smaller or larger U-Net. A step is one `model.fit` step on random
uint8 images; the figure is the median over `--steps` steps after `--warmup` steps (which
include tracing and, with XLA, compilation). The JAX figures are from ../shared/BENCHMARKS.md
(google-research/vdm at dc27b98, jax 0.10.2, plain `jax.jit`, 2-core CPU of this machine kind).

Prints a table and writes bench/results/train_throughput.json.
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # before TensorFlow is imported: see vdm_tf/__init__.py

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import vdm_tf  # noqa: E402

# name: (n_layers, n_embd, batch size, JAX params, JAX seconds per step)
CONFIGS = {
    "tiny": (2, 32, 8, 223_557, 0.254),
    "small": (4, 64, 16, 1_331_717, 1.80),
    "paper": (32, 128, 4, 30_578_181, 4.97),
}
IMAGE_SHAPE = (32, 32, 3)

flags.DEFINE_list("configs", list(CONFIGS), "Configurations to time.")
flags.DEFINE_list("jit", ["1", "0"], "XLA settings to time: 1 (jit_compile=True) and/or 0.")
flags.DEFINE_integer("steps", 10, "Timed steps per configuration.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, compilation).")
flags.DEFINE_string("out", "bench/results/train_throughput.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step."""

    def __init__(self):
        super().__init__()
        self.durations = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.durations.append(time.perf_counter() - self._start)


def time_config(name, jit):
    n_layers, n_embd, batch_size, jax_params, jax_seconds = CONFIGS[name]
    keras.utils.set_random_seed(0)
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=n_layers, n_embd=n_embd, fourier_features=True, dropout=0.1)
    model = vdm_tf.VDM(denoiser, vdm_tf.schedules.LearnedLinear(), IMAGE_SHAPE)
    optimizer = keras.optimizers.AdamW(2e-4, beta_2=0.99, weight_decay=0.01, use_ema=True, ema_momentum=0.9999)
    model.compile(optimizer=optimizer, jit_compile=jit)
    images = np.random.default_rng(0).integers(0, 256, (batch_size,) + IMAGE_SHAPE, dtype=np.uint8)
    data = tf.data.Dataset.from_tensors(images).repeat()
    timer = StepTimer()
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=FLAGS.warmup + FLAGS.steps, epochs=1, verbose=0, callbacks=[timer])
    first_step = timer.durations[0]
    seconds = float(np.median(timer.durations[FLAGS.warmup :]))
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    return {
        "config": name,
        "xla": bool(jit),
        "n_layers": n_layers,
        "n_embd": n_embd,
        "batch_size": batch_size,
        "params": params,
        "jax_params": jax_params,
        "seconds_per_step": seconds,
        "images_per_second": batch_size / seconds,
        "first_step_seconds": first_step,
        "total_seconds": time.perf_counter() - start,
        "jax_seconds_per_step": jax_seconds,
        "speedup_vs_jax": jax_seconds / seconds,
    }


def main(argv):
    del argv
    results = []
    header = (
        f"{'config':<7}{'xla':>5}{'params':>12}{'jax params':>12}{'batch':>7}"
        f"{'s/step':>9}{'img/s':>8}{'jax s/step':>12}{'vs jax':>8}{'1st step s':>12}"
    )
    print(header)
    for name in FLAGS.configs:
        for jit in FLAGS.jit:
            r = time_config(name, jit == "1")
            results.append(r)
            print(
                f"{r['config']:<7}{str(r['xla']):>5}{r['params']:>12,}{r['jax_params']:>12,}{r['batch_size']:>7}"
                f"{r['seconds_per_step']:>9.3f}{r['images_per_second']:>8.1f}{r['jax_seconds_per_step']:>12.3f}"
                f"{r['speedup_vs_jax']:>7.2f}x{r['first_step_seconds']:>12.1f}",
                flush=True,
            )
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__},
                "steps": FLAGS.steps,
                "warmup": FLAGS.warmup,
                "results": results,
            },
            f,
            indent=2,
        )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
