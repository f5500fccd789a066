"""Training throughput with 1 vs 2 replicas and steps_per_execution 1 vs 16, plus a FLOP count.

    python -m bench.scaling                       # digits preset model, batch 64
    python -m bench.scaling --steps=48

The replicas are logical CPU devices of this machine (`MirroredStrategy`), so the comparison
measures tf.distribute's overhead on one host, not added compute. Every figure is the median
time of a call into the trainer's compiled step function (`steps_per_execution` steps each),
after one untimed call (tracing). The FLOP count of one training step of the ImageNet64 preset
(multiply-adds of every convolution, dense layer and attention product, times 2, times 3 for
the backward pass) turns into an estimate of its step time on a TPU v3-8.

Prints a table and writes bench/results/scaling.json.
"""

import tempfile
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import vdm_tf  # noqa: E402
from trainers import configs, distribute, train  # noqa: E402

flags.DEFINE_integer("steps", 32, "Timed optimizer steps per setting (a multiple of 16).")
flags.DEFINE_string("out", "bench/results/scaling.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS

TPU_V3_8_PEAK_FLOPS = 420e12  # 4 chips x 2 cores, bfloat16 matrix units
ASSUMED_UTILISATION = 0.4


def time_setting(strategy, steps_per_execution):
    config = configs.PRESETS["digits"].replace(steps_per_execution=steps_per_execution)
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = train.Trainer(config, model_dir, strategy, verbose=False)
        calls = FLAGS.steps // steps_per_execution
        trainer._train_function(trainer._distribute(next(trainer.data)))  # tracing
        durations = []
        for _ in range(calls):
            chunk = trainer._distribute(next(trainer.data))
            start = time.perf_counter()
            trainer._train_function(chunk)
            trainer.model.optimizer.iterations.numpy()  # wait for the work to finish
            durations.append(time.perf_counter() - start)
    seconds_per_step = float(np.median(durations)) / steps_per_execution
    return {
        "replicas": strategy.num_replicas_in_sync,
        "steps_per_execution": steps_per_execution,
        "batch_size": config.data.batch_size,
        "seconds_per_step": seconds_per_step,
        "images_per_second": config.data.batch_size / seconds_per_step,
    }


def train_step_flops(config):
    """FLOPs of one training step per image of a config's ScoreUNet: 2 x multiply-adds x 3.

    Counts the 3x3 convolutions, the 1x1 shortcuts of the up path, and the attention products;
    the time embedding, normalisations and activations are negligible at these sizes.
    """
    network = config.network
    height, width, channels = vdm_tf.datasets.info(config.data.dataset).image_shape
    positions, c = height * width, network.n_embd
    conv3x3 = lambda c_in, c_out: 9 * positions * c_in * c_out  # noqa: E731
    resnet_block = lambda c_in: conv3x3(c_in, c) + conv3x3(c, c) + (positions * c_in * c if c_in != c else 0)  # noqa: E731
    attention = 4 * positions * c * c + 2 * positions * positions * c  # q, k, v, out; q k^T and weights v
    in_channels = channels * (1 + 2 * len(network.fourier_exponents)) if network.fourier_features else channels
    macs = (
        conv3x3(in_channels, c)
        + network.n_layers * resnet_block(c)
        + 2 * resnet_block(c)
        + attention
        + (network.n_layers + 1) * resnet_block(2 * c)
        + conv3x3(c, channels)
        + (2 * network.n_layers + 1) * attention * network.attention
    )
    return 2 * macs * 3  # forward, and a backward pass of about twice its cost


def main(argv):
    del argv
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    keras.utils.set_random_seed(0)
    strategies = {1: tf.distribute.get_strategy(), 2: distribute.make_strategy("mirrored")}
    results = []
    print(f"{'replicas':>8}{'steps/exec':>12}{'batch':>7}{'s/step':>9}{'images/s':>10}{'vs 1x1':>8}")
    for replicas, steps_per_execution in [(1, 1), (1, 16), (2, 1), (2, 16)]:
        r = time_setting(strategies[replicas], steps_per_execution)
        r["speedup"] = r["images_per_second"] / results[0]["images_per_second"] if results else 1.0
        results.append(r)
        print(
            f"{r['replicas']:>8}{r['steps_per_execution']:>12}{r['batch_size']:>7}{r['seconds_per_step']:>9.3f}"
            f"{r['images_per_second']:>10.1f}{r['speedup']:>7.2f}x",
            flush=True,
        )
    imagenet64 = configs.PRESETS["imagenet64"]
    flops = train_step_flops(imagenet64)
    step_flops = flops * imagenet64.data.batch_size
    tpu_seconds = step_flops / (TPU_V3_8_PEAK_FLOPS * ASSUMED_UTILISATION)
    tpu = {
        "preset": "imagenet64",
        "train_flops_per_image": flops,
        "batch_size": imagenet64.data.batch_size,
        "train_flops_per_step": step_flops,
        "tpu_v3_8_peak_flops": TPU_V3_8_PEAK_FLOPS,
        "assumed_utilisation": ASSUMED_UTILISATION,
        "tpu_v3_8_seconds_per_step": tpu_seconds,
        "tpu_v3_8_days_for_train_steps": tpu_seconds * imagenet64.trainer.train_steps / 86400,
    }
    print(
        f"imagenet64 preset: {flops / 1e12:.2f} TFLOP per image per training step, "
        f"{step_flops / 1e15:.2f} PFLOP per step at batch {imagenet64.data.batch_size}; TPU v3-8 at "
        f"{ASSUMED_UTILISATION:.0%} of {TPU_V3_8_PEAK_FLOPS / 1e12:.0f} TFLOP/s: {tpu_seconds:.1f} s per step"
    )
    common.write_json(
        FLAGS.out,
        {
            "machine": common.machine(),
            "model": "digits preset",
            "results": results,
            "tpu_estimate": tpu,
        },
    )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
