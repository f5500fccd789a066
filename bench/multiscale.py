"""Multi-scale (Haar) vs uniform diffusion: sampling time per image, and bpd on digits.

    python -m bench.multiscale                                 # 32x32 and 64x64, digits 300 steps
    python -m bench.multiscale --resolutions=32,64,128 --sample_steps=32 --train_steps=600

1. Sampling speed. At each resolution R (RGB), a uniform `vdm_tf.VDM` and a
   `vdm_tf.multiscale.MultiScaleVDM` with the same `ScoreUNet` (one network shared by every
   stage, so the parameter counts are equal; random weights: the speed does not depend on
   them) draw `--num_samples` images in `--sample_steps` ancestral steps each. The multi-scale
   model has log2(R / 8) Haar levels (its coarsest stage runs at 8x8) and stages of equal
   length. Every figure is the fastest of `--repeats` timed calls, the two models taking turns,
   after one untimed call each (tracing). "pixel ratio" is the speed-up if a step cost were proportional to its pixels:
   steps / sum over steps of 4^-stage; the mid-block attention of the ScoreUNet grows with the
   square of the pixels, so the measured ratio can exceed it at high resolution.
2. Likelihood. Both models, with the digits preset's network, schedule and optimizer, train
   `--train_steps` steps on the embedded digits (8x8; the multi-scale model as the
   `digits_multiscale` preset builds it: one Haar level, its end time; same batches, same
   seed), then the test split's bpd (8 time samples per image) is reported
   with its standard error. A third model has one network per stage (twice the parameters).

Prints two tables and writes bench/results/multiscale.json.
"""

import math
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

import vdm_tf  # noqa: E402
from trainers import configs  # noqa: E402
from vdm_tf.multiscale import MultiScaleVDM  # noqa: E402

flags.DEFINE_list("resolutions", ["32", "64"], "Image sizes R (R x R x 3) of the sampling-speed comparison.")
flags.DEFINE_integer("sample_steps", 32, "Ancestral steps per sample (the same for both models).")
flags.DEFINE_integer("num_samples", 2, "Images per sampling call.")
flags.DEFINE_integer("repeats", 5, "Timed sampling calls per model (the fastest counts).")
flags.DEFINE_integer("n_layers", 2, "ScoreUNet blocks of the speed comparison.")
flags.DEFINE_integer("n_embd", 64, "ScoreUNet channels of the speed comparison.")
flags.DEFINE_integer("train_steps", 300, "Training steps of each digits model.")
flags.DEFINE_string("out", "bench/results/multiscale.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS

COARSEST = 8  # resolution of the multi-scale model's last stage


def seconds_per_sample(models, num_samples, num_steps, repeats):
    """Best-of-`repeats` seconds per image of each model's `sample(num_samples, num_steps)`, the
    models timed in turn, after one untimed (tracing) call each.

    Taking turns and the fastest call keep other processes on a shared CPU from favouring one.
    """
    for model in models:
        model.sample(num_samples, num_steps, seed=0)  # tracing
    durations = [[] for _ in models]
    for repeat in range(repeats):
        for model, times in zip(models, durations):
            start = time.perf_counter()
            model.sample(num_samples, num_steps, seed=repeat).numpy()
            times.append(time.perf_counter() - start)
    return [min(times) / num_samples for times in durations]


def pixel_ratio(model, num_steps):
    """num_steps / sum over the sampler's steps of 4^-stage, on the grid MultiScaleVDM._sample uses."""
    num_stages = len(model.stages)
    num_steps = max(num_steps, num_stages)
    starts = [start for _, start, _ in model.stages]
    boundaries = [m + round((num_steps - num_stages) * start) for m, start in enumerate(starts)] + [num_steps]
    cost = sum((boundaries[m + 1] - boundaries[m]) * 4.0**-stage for m, (stage, _, _) in enumerate(model.stages))
    return num_steps / cost


def speed(resolution):
    def network():
        return vdm_tf.networks.ScoreUNet(n_layers=FLAGS.n_layers, n_embd=FLAGS.n_embd, dropout=0.0)

    image_shape = (resolution, resolution, 3)
    levels = int(math.log2(resolution // COARSEST))
    uniform = vdm_tf.VDM(network(), vdm_tf.schedules.FixedLinear(), image_shape)
    multiscale = MultiScaleVDM(network(), vdm_tf.schedules.FixedLinear(), image_shape, levels=levels)
    uniform_seconds, multiscale_seconds = seconds_per_sample(
        [uniform, multiscale], FLAGS.num_samples, FLAGS.sample_steps, FLAGS.repeats
    )
    return {
        "resolution": resolution,
        "levels": levels,
        "end_times": list(multiscale.end_times),
        "parameters": {"uniform": uniform.count_params(), "multiscale": multiscale.count_params()},
        "seconds_per_sample": {"uniform": uniform_seconds, "multiscale": multiscale_seconds},
        "speedup": uniform_seconds / multiscale_seconds,
        "pixel_ratio": pixel_ratio(multiscale, FLAGS.sample_steps),
    }


def train_and_evaluate(model_fields=None):
    """Trains the digits preset's model, with `model_fields` changed, on digits with the preset's
    optimizer for --train_steps; returns its test bpd and times."""
    config = configs.PRESETS["digits"].replace(train_steps=FLAGS.train_steps, model=model_fields or {})
    trainer = config.trainer
    model = vdm_tf.runs.compiled_model(config, seed=trainer.seed)
    train = vdm_tf.datasets.load("digits", "train", config.data.batch_size, seed=trainer.seed)
    step_ends = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: step_ends.append(time.perf_counter()))
    start = time.perf_counter()
    model.fit(train, steps_per_epoch=trainer.train_steps, epochs=1, verbose=0, callbacks=[clock])
    seconds, first = time.perf_counter() - start, step_ends[0] - start
    test = vdm_tf.datasets.load("digits", "test", 128, shuffle=False, repeat=False, drop_remainder=False)
    result = vdm_tf.evaluation.dataset_bpd(model, test, num_time_samples=8)
    return {
        "bpd": result["bpd"],
        "stderr": result["stderr"],
        "terms": {name: result[name] for name in ("diffusion", "prior", "reconstruction")},
        "train_seconds": seconds,
        "first_step_seconds": first,
        "seconds_per_step_after_the_first": (seconds - first) / max(trainer.train_steps - 1, 1),
        "parameters": model.count_params(),
    }


def multiscale_fields(stage_networks=False):
    """The model fields that make the digits preset's model the `digits_multiscale` preset's (one
    Haar level: 8x8 and 4x4, the preset's end time): same network, schedule and decoder alphabet."""
    preset = configs.PRESETS["digits_multiscale"].model
    fields = ("multiscale_levels", "multiscale_end_times")
    return {"multiscale_stage_networks": stage_networks, **{name: getattr(preset, name) for name in fields}}


def main(argv):
    del argv
    keras.utils.set_random_seed(0)
    speeds = []
    print(f"sampling, {FLAGS.sample_steps} steps, {FLAGS.num_samples} images per call")
    print(f"{'size':>8}{'levels':>8}{'params':>10}{'uniform s':>11}{'multi s':>9}{'speedup':>9}{'pixel ratio':>13}")
    for resolution in map(int, FLAGS.resolutions):
        r = speed(resolution)
        speeds.append(r)
        print(
            f"{resolution:>5}x{resolution:<2}{r['levels']:>8}{r['parameters']['uniform']:>10}"
            f"{r['seconds_per_sample']['uniform']:>11.3f}{r['seconds_per_sample']['multiscale']:>9.3f}"
            f"{r['speedup']:>8.2f}x{r['pixel_ratio']:>12.2f}x",
            flush=True,
        )
    likelihood = {
        "uniform": train_and_evaluate(),
        "multiscale": train_and_evaluate(multiscale_fields()),
        "multiscale_stage_networks": train_and_evaluate(multiscale_fields(stage_networks=True)),
    }
    print(f"\ndigits, {FLAGS.train_steps} training steps (digits preset), test bpd with 8 time samples per image")
    print(
        f"{'model':>26}{'bpd':>8}{'+-':>7}{'diffusion':>11}{'prior':>8}{'recon':>8}"
        f"{'train s':>9}{'s/step':>8}{'params':>9}"
    )
    for name, r in likelihood.items():
        print(
            f"{name:>26}{r['bpd']:>8.3f}{r['stderr']:>7.3f}{r['terms']['diffusion']:>11.3f}"
            f"{r['terms']['prior']:>8.4f}{r['terms']['reconstruction']:>8.3f}{r['train_seconds']:>9.1f}"
            f"{r['seconds_per_step_after_the_first']:>8.3f}{r['parameters']:>9}"
        )
    common.write_json(
        FLAGS.out,
        {
            "machine": common.machine(),
            "sampling": {
                "steps": FLAGS.sample_steps,
                "num_samples": FLAGS.num_samples,
                "network": {"n_layers": FLAGS.n_layers, "n_embd": FLAGS.n_embd, "shared_by_all_stages": True},
                "results": speeds,
            },
            "digits": {
                "train_steps": FLAGS.train_steps,
                "preset": "digits",
                "levels": 1,
                "end_times": list(configs.PRESETS["digits_multiscale"].model.multiscale_end_times),
                **likelihood,
            },
        },
    )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
